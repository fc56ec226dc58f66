"""Corpus I/O for data selection: plan shards, stream records, account for every record.

Inputs: JSONL (plain, ``.gz``, ``.zst``), Parquet, a Hugging Face ``datasets.Dataset``, or an
in-memory list of strings / dicts. A corpus is cut into **shards** of at most ``shard_size``
records; a shard is described by a small picklable :class:`ShardSpec` (file + record range, and
for plain JSONL the byte offset where it starts), so a worker -- in a local process pool or on a
Ray cluster -- reads its shard itself and memory is bounded by the shard, not by the corpus.

Every input record comes out of :func:`read_shard` as a :class:`Record` that either has a text
or a ``reason`` saying why it is malformed (invalid JSON, not UTF-8, missing/non-string text
field, empty text, blank line, not an object), so ``selected + rejected + malformed == records``
always holds downstream.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Record",
    "ShardSpec",
    "expand_inputs",
    "plan_shards",
    "read_shard",
    "open_binary",
    "input_format",
]

_JSONL_EXT = (".jsonl", ".json", ".ndjson")


@dataclass
class Record:
    """One input record.

    ``pos`` is the record number inside its source (0-based line or row); ``id`` the record's id
    (its ``id_field`` value, else ``"<source>:<line>"``); ``text`` is ``None`` exactly when
    ``reason`` says why the record is malformed. ``raw`` is the parsed object (dict) or the plain
    string, kept so the selected records can be written back unchanged.
    """

    pos: int
    id: str
    text: str | None
    reason: str | None = None
    raw: Any = None


@dataclass(frozen=True)
class ShardSpec:
    """A unit of work: records ``[start, stop)`` of one source.

    ``fmt`` is ``jsonl``, ``jsonl.gz``, ``jsonl.zst``, ``parquet`` or ``rows`` (in-memory
    records carried in ``rows``). ``offset`` is the byte offset of record ``start`` for plain
    JSONL (so the shard is read with one seek).
    """

    index: int
    source: str
    fmt: str
    start: int
    stop: int
    offset: int = 0
    rows: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def key(self) -> dict:
        """What identifies this shard in a manifest (resume checks it)."""
        return {"index": self.index, "source": self.source, "start": self.start, "stop": self.stop}


def input_format(path: str) -> str:
    """``jsonl``, ``jsonl.gz``, ``jsonl.zst`` or ``parquet`` from a file name."""
    p = path.lower()
    if p.endswith(".parquet") or p.endswith(".pq"):
        return "parquet"
    for ext in _JSONL_EXT:
        if p.endswith(ext):
            return "jsonl"
        if p.endswith(ext + ".gz"):
            return "jsonl.gz"
        if p.endswith(ext + ".zst") or p.endswith(ext + ".zstd"):
            return "jsonl.zst"
    raise ValueError(
        f"cannot tell the format of {path!r}: use .jsonl/.json/.ndjson (optionally .gz/.zst) "
        f"or .parquet"
    )


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand globs / directories into a sorted, de-duplicated list of files (order matters:
    it fixes shard numbering and tie-breaking)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[str] = []
    for item in inputs:
        s = os.fspath(item)
        if os.path.isdir(s):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(s)
                for f in names
                if _is_data_file(f)
            )
        elif any(ch in s for ch in "*?["):
            found = sorted(glob.glob(s, recursive=True))
            found = [f for f in found if os.path.isfile(f)]
        else:
            if not os.path.isfile(s):
                raise FileNotFoundError(f"input file not found: {s}")
            found = [s]
        if not found:
            raise FileNotFoundError(f"no input files match {s!r}")
        files.extend(found)
    seen: set[str] = set()
    out = []
    for f in files:
        if f not in seen:
            seen.add(f)
            input_format(f)  # validate early
            out.append(f)
    return out


def _is_data_file(name: str) -> bool:
    try:
        input_format(name)
        return True
    except ValueError:
        return False


def open_binary(path: str, fmt: str | None = None) -> io.BufferedIOBase:
    """Open a JSONL file for binary line reading, decompressing ``.gz`` / ``.zst`` on the fly."""
    fmt = fmt or input_format(path)
    if fmt == "jsonl":
        return open(path, "rb")  # noqa: SIM115
    if fmt == "jsonl.gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if fmt == "jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise ImportError(
                f"reading {path} needs the PyPI package 'zstandard' (pip install 'ctxzip[datasel]')"
            ) from None
        raw = open(path, "rb")  # noqa: SIM115
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    raise ValueError(f"not a JSONL format: {fmt}")


# ---------------------------------------------------------------------------- planning
def plan_shards(
    inputs: Any,
    shard_size: int = 10_000,
) -> Iterator[ShardSpec]:
    """Yield the shards of ``inputs`` in a deterministic order.

    ``inputs``: a path, glob, directory or list of them; a ``datasets.Dataset``; or a list of
    strings / dicts (in-memory records). Plain JSONL is scanned once for line offsets (no JSON
    parsing); compressed JSONL is decompressed once to count lines; Parquet uses its metadata.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    index = 0
    if _is_hf_dataset(inputs):
        if type(inputs).__name__ != "Dataset":
            raise ValueError("pass a map-style datasets.Dataset (not an IterableDataset)")
        n = len(inputs)
        file_backed = bool(getattr(inputs, "cache_files", None))
        for start in range(0, n, shard_size):
            stop = min(n, start + shard_size)
            if file_backed:  # pickles as a reference to its Arrow files: ship the dataset
                yield ShardSpec(index, "<dataset>", "hf", start, stop, rows=(inputs,))
            else:  # in memory: ship just this shard's rows
                rows = tuple(_hf_rows(inputs, start, stop))
                yield ShardSpec(index, "<dataset>", "rows", start, stop, rows=rows)
            index += 1
        return
    if isinstance(inputs, (list, tuple)) and (not inputs or not _looks_like_path(inputs[0])):
        n = len(inputs)
        for start in range(0, n, shard_size):
            stop = min(n, start + shard_size)
            yield ShardSpec(index, "<memory>", "rows", start, stop, rows=tuple(inputs[start:stop]))
            index += 1
        return
    for path in expand_inputs(inputs):
        fmt = input_format(path)
        if fmt == "parquet":
            n = _parquet_rows(path)
            for start in range(0, n, shard_size):
                yield ShardSpec(index, path, fmt, start, min(n, start + shard_size))
                index += 1
        elif fmt == "jsonl":
            for start, stop, off in _jsonl_line_ranges(path, shard_size):
                yield ShardSpec(index, path, fmt, start, stop, offset=off)
                index += 1
        else:
            n = _count_lines(path, fmt)
            for start in range(0, n, shard_size):
                yield ShardSpec(index, path, fmt, start, min(n, start + shard_size))
                index += 1


def _looks_like_path(x: Any) -> bool:
    if isinstance(x, os.PathLike):
        return True
    if not isinstance(x, str):
        return False
    if "\n" in x or len(x) > 4096:
        return False
    return os.path.exists(x) or any(ch in x for ch in "*?[") or _is_data_file(x)


def _is_hf_dataset(x: Any) -> bool:
    t = type(x)
    return t.__name__ in ("Dataset", "IterableDataset") and t.__module__.startswith("datasets")


def _hf_rows(ds: Any, start: int, stop: int) -> Iterator[dict]:
    cols = ds[start:stop]
    names = list(cols.keys())
    for i in range(stop - start):
        yield {k: cols[k][i] for k in names}


def _jsonl_line_ranges(path: str, shard_size: int) -> Iterator[tuple[int, int, int]]:
    """(start_line, stop_line, byte_offset) for each shard of a plain JSONL file."""
    import numpy as np

    lines = 0  # newlines seen so far
    shard_start_line, shard_off = 0, 0
    off = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            buf = f.read(1 << 22)
            if not buf:
                break
            nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10)
            # newline number (lines + i + 1) closes a shard when it is a multiple of shard_size
            first = (-lines - 1) % shard_size  # index in nl of the first shard-closing newline
            for i in range(first, nl.shape[0], shard_size):
                end_line = lines + i + 1
                yield shard_start_line, end_line, shard_off
                shard_start_line, shard_off = end_line, off + int(nl[i]) + 1
            lines += int(nl.shape[0])
            off += len(buf)
            last = buf[-1:]
    if last != b"\n":
        lines += 1  # final line without a trailing newline
    if lines > shard_start_line:
        yield shard_start_line, lines, shard_off


def _count_lines(path: str, fmt: str) -> int:
    n = 0
    last = b"\n"
    with open_binary(path, fmt) as f:
        while True:
            buf = f.read(1 << 22)
            if not buf:
                break
            n += buf.count(b"\n")
            last = buf[-1:]
    if last != b"\n":
        n += 1
    return n


def _parquet_rows(path: str) -> int:
    pq = _pyarrow_parquet()
    return int(pq.ParquetFile(path).metadata.num_rows)


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "reading Parquet needs the PyPI package 'pyarrow' (pip install 'ctxzip[datasel]')"
        ) from None
    return pq


# ---------------------------------------------------------------------------- reading
def read_shard(
    spec: ShardSpec, text_field: str = "text", id_field: str | None = "id"
) -> Iterator[Record]:
    """Yield every record of ``spec`` (valid or malformed, in order, exactly ``spec.size``)."""
    if spec.fmt == "hf":
        assert spec.rows is not None
        for i, row in enumerate(_hf_rows(spec.rows[0], spec.start, spec.stop)):
            yield _from_object(row, spec.start + i, spec.source, text_field, id_field)
    elif spec.fmt == "rows":
        assert spec.rows is not None
        for i, row in enumerate(spec.rows):
            yield _from_object(row, spec.start + i, spec.source, text_field, id_field)
    elif spec.fmt == "parquet":
        yield from _read_parquet(spec, text_field, id_field)
    else:
        yield from _read_jsonl(spec, text_field, id_field)


def _read_jsonl(spec: ShardSpec, text_field: str, id_field: str | None) -> Iterator[Record]:
    with open_binary(spec.source, spec.fmt) as f:
        if spec.fmt == "jsonl":
            f.seek(spec.offset)
            pos = spec.start
        else:
            pos = 0
            while pos < spec.start:  # compressed streams cannot seek: skip lines
                if not f.readline():
                    break
                pos += 1
        while pos < spec.stop:
            line = f.readline()
            if not line:
                # the file shrank since planning: report the missing records, keep counts exact
                yield Record(pos, _default_id(spec.source, pos), None, "record missing (file changed)")
                pos += 1
                continue
            yield _parse_line(line, pos, spec.source, text_field, id_field)
            pos += 1


def _default_id(source: str, pos: int) -> str:
    return f"{source}:{pos + 1}"


def _parse_line(
    line: bytes, pos: int, source: str, text_field: str, id_field: str | None
) -> Record:
    did = _default_id(source, pos)
    body = line.rstrip(b"\r\n")
    if not body.strip():
        return Record(pos, did, None, "blank line")
    try:
        s = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(pos, did, None, f"not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r})")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return Record(pos, did, None, f"invalid JSON ({e.msg} at column {e.colno})")
    return _from_object(obj, pos, source, text_field, id_field)


def _from_object(
    obj: Any, pos: int, source: str, text_field: str, id_field: str | None
) -> Record:
    did = _default_id(source, pos)
    if isinstance(obj, str):  # a bare string record (in-memory lists)
        if not obj.strip():
            return Record(pos, did, None, "empty text", obj)
        return Record(pos, did, obj, None, obj)
    if not isinstance(obj, dict):
        return Record(pos, did, None, f"not a JSON object ({type(obj).__name__})", obj)
    if id_field and obj.get(id_field) is not None:
        did = str(obj[id_field])
    if text_field not in obj or obj[text_field] is None:
        return Record(pos, did, None, f"missing text field {text_field!r}", obj)
    text = obj[text_field]
    if not isinstance(text, str):
        return Record(pos, did, None, f"text field {text_field!r} is not a string "
                      f"({type(text).__name__})", obj)
    if not text.strip():
        return Record(pos, did, None, "empty text", obj)
    return Record(pos, did, text, None, obj)


def _read_parquet(spec: ShardSpec, text_field: str, id_field: str | None) -> Iterator[Record]:
    pq = _pyarrow_parquet()
    pf = pq.ParquetFile(spec.source)
    md = pf.metadata
    row0 = 0
    pos = spec.start
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        lo, hi = row0, row0 + n
        row0 = hi
        if hi <= spec.start or lo >= spec.stop:
            continue
        table = pf.read_row_group(g)
        a, b = max(spec.start, lo) - lo, min(spec.stop, hi) - lo
        for row in table.slice(a, b - a).to_pylist():
            yield _from_object(row, pos, spec.source, text_field, id_field)
            pos += 1


def iter_records(
    inputs: Any, shard_size: int = 10_000, text_field: str = "text", id_field: str | None = "id"
) -> Iterable[Record]:
    """All records of ``inputs`` in order (convenience for small corpora and tests)."""
    for spec in plan_shards(inputs, shard_size):
        yield from read_shard(spec, text_field, id_field)


@dataclass
class TextLength:
    """How a token budget counts a document: ``"chars"``, ``"bytes"`` (UTF-8), ``"words"``
    (whitespace-separated) or any Hugging Face tokenizer id/path (``"default"`` = the ctxzip
    default LM's tokenizer, SmolLM2). The tokenizer loads lazily in the worker that needs it."""

    unit: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.unit, str) or not self.unit:
            raise ValueError(f"token unit must be a name, got {self.unit!r}")
        self._tok: Any = None

    def __getstate__(self) -> dict:
        return {"unit": self.unit}

    def __setstate__(self, state: dict) -> None:
        self.unit = state["unit"]
        self._tok = None

    def count(self, texts: Sequence[str]) -> list[int]:
        if self.unit == "chars":
            return [len(t) for t in texts]
        if self.unit == "bytes":
            return [len(t.encode("utf-8")) for t in texts]
        if self.unit == "words":
            return [len(t.split()) for t in texts]
        if self._tok is None:
            from ctxzip.models import load_tokenizer

            self._tok = load_tokenizer(None if self.unit == "default" else self.unit)
        enc = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        return [len(e) for e in enc]
