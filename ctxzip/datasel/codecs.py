"""Compressed-length functions ``C(x)`` for compression-based similarity (ZIP-FIT's NCD).

Every codec is a small picklable object (so it travels to process-pool and Ray workers) whose
``length(data: bytes) -> int`` returns a compressed size in bytes. Only lengths matter for NCD.

``"gzip"`` is defined as ``len(gzip.compress(x, compresslevel=level))`` -- what the ZIP-FIT
reference code (``zip_fit/zipfit.py``, ``ZIPFIT.compress``) measures. ``gzip.compress`` is a
10-byte header + a raw deflate stream (``zlib.compress(x, level, wbits=-15)``) + an 8-byte
CRC/size trailer, so we compute ``len(raw deflate) + 18``: identical lengths, without building
the header, the CRC pass and the concatenated output (checked by the tests byte-for-byte).

Fast codecs (``"isal"``, ``"zlib-ng"``, ``"lz4"``, ``"zstd"``) are optional: they need the
PyPI packages ``isal``, ``zlib-ng``, ``lz4``, ``zstandard``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Codec", "get_codec", "CODECS"]

_GZIP_OVERHEAD = 18  # gzip member header (10) + trailer CRC32/ISIZE (8); gzip.compress adds no name

# name -> (valid levels, default level, pip package, description)
CODECS: dict[str, tuple[range, int, str | None, str]] = {
    "gzip": (range(0, 10), 6, None, "len(gzip.compress(x, level)) (stdlib zlib deflate + 18 B)"),
    "zlib": (range(0, 10), 6, None, "len(zlib.compress(x, level)) (zlib container, 6 B overhead)"),
    "isal": (range(0, 4), 0, "isal", "ISA-L deflate (gzip-compatible stream + 18 B), levels 0-3"),
    "zlib-ng": (range(0, 10), 1, "zlib-ng", "zlib-ng deflate (gzip-compatible stream + 18 B)"),
    "lz4": (range(0, 17), 0, "lz4", "len(lz4.frame.compress(x, level)) (the ZIP-FIT default codec)"),
    "zstd": (range(-7, 23), 3, "zstandard", "len(zstd.compress(x, level))"),
}


def _missing(pkg: str, name: str) -> ImportError:
    return ImportError(
        f"codec {name!r} needs the PyPI package {pkg!r}: pip install {pkg} "
        f"(or pip install 'ctxzip[datasel]')"
    )


@dataclass(frozen=True)
class Codec:
    """A compressed-length function.

    Args:
        name: one of ``CODECS`` (``gzip``, ``zlib``, ``isal``, ``zlib-ng``, ``lz4``, ``zstd``).
        level: compression level; ``None`` takes the codec's default. Note: gzip level 0 is
            "stored" (no compression) -- the ZIP-FIT package default -- and turns NCD into a
            length ratio; it is allowed only with ``allow_stored=True``.
        allow_stored: permit gzip/zlib/zlib-ng level 0 (stored blocks, no compression).
    """

    name: str = "gzip"
    level: int | None = None
    allow_stored: bool = False
    _fn: Callable[[bytes], int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; choose one of {sorted(CODECS)}")
        levels, default, _, _ = CODECS[self.name]
        level = default if self.level is None else self.level
        if isinstance(level, bool) or not isinstance(level, int) or level not in levels:
            raise ValueError(
                f"codec {self.name!r} takes an integer level in "
                f"[{levels.start}, {levels.stop - 1}], got {self.level!r}"
            )
        if self.name in ("gzip", "zlib", "zlib-ng") and level == 0 and not self.allow_stored:
            raise ValueError(
                f"{self.name} level 0 stores the data without compressing it, so NCD degenerates "
                "into a length ratio (the ZIP-FIT package default's defect); use level >= 1, or "
                "allow_stored=True if you really mean it"
            )
        object.__setattr__(self, "level", level)

    # pickling: drop the bound function, rebuild lazily in the worker
    def __getstate__(self) -> dict:
        return {"name": self.name, "level": self.level, "allow_stored": self.allow_stored}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "name", state["name"])
        object.__setattr__(self, "level", state["level"])
        object.__setattr__(self, "allow_stored", state["allow_stored"])
        object.__setattr__(self, "_fn", None)

    @property
    def length(self) -> Callable[[bytes], int]:
        """``length(data) -> int``: the compressed size of ``data`` in bytes."""
        fn = self._fn
        if fn is None:
            fn = self._build()
            object.__setattr__(self, "_fn", fn)
        return fn

    def _build(self) -> Callable[[bytes], int]:
        lvl = int(self.level)  # type: ignore[arg-type]
        if self.name == "gzip":
            comp = zlib.compress

            def gz(data: bytes) -> int:
                return len(comp(data, lvl, -15)) + _GZIP_OVERHEAD

            return gz
        if self.name == "zlib":
            comp = zlib.compress
            return lambda data: len(comp(data, lvl))
        if self.name == "isal":
            try:
                from isal import isal_zlib
            except ImportError:
                raise _missing("isal", self.name) from None
            icomp = isal_zlib.compress
            return lambda data: len(icomp(data, lvl, -15)) + _GZIP_OVERHEAD
        if self.name == "zlib-ng":
            try:
                from zlib_ng import zlib_ng
            except ImportError:
                raise _missing("zlib-ng", self.name) from None
            ncomp = zlib_ng.compress
            return lambda data: len(ncomp(data, lvl, -15)) + _GZIP_OVERHEAD
        if self.name == "lz4":
            try:
                import lz4.frame
            except ImportError:
                raise _missing("lz4", self.name) from None
            lcomp = lz4.frame.compress
            return lambda data: len(lcomp(data, compression_level=lvl))
        if self.name == "zstd":
            try:
                import zstandard
            except ImportError:
                raise _missing("zstandard", self.name) from None
            zc = zstandard.ZstdCompressor(level=lvl)
            return lambda data: len(zc.compress(data))
        raise AssertionError(self.name)

    def __str__(self) -> str:
        return f"{self.name}-{self.level}"


def get_codec(codec: str | Codec = "gzip", level: int | None = None) -> Codec:
    """Build a :class:`Codec` from a name (``"gzip"``) or ``"name-level"`` (``"gzip-6"``)."""
    if isinstance(codec, Codec):
        if level is not None and level != codec.level:
            return Codec(codec.name, level, codec.allow_stored)
        return codec
    if not isinstance(codec, str):
        raise ValueError(f"codec must be a name such as 'gzip', got {codec!r}")
    name = codec.strip().lower()
    if name not in CODECS and "-" in name:
        base, _, lv = name.rpartition("-")
        if base in CODECS and lv.lstrip("-").isdigit():
            if level is not None and level != int(lv):
                raise ValueError(f"codec {codec!r} names level {lv} but level={level} was given")
            name, level = base, int(lv)
    return Codec(name, level)
