"""The Ray Data engine on a small local Ray instance gives the same selection as the local
engine (slow-ish: starting Ray takes ~10-30 s; one test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxzip.datasel import RayEngine, ZipFit, select

ray = pytest.importorskip("ray")


def test_ray_engine_equals_local(tmp_path: Path) -> None:
    from test_datasel import MALFORMED_LINES, _prose_chunks, _stdlib_chunks, _write_corpus

    _write_corpus(tmp_path / "D", _stdlib_chunks(24) + _prose_chunks(12), files=2)
    z = ZipFit(_stdlib_chunks(4, skip=40))
    kw = dict(keep="20%", shard_size=8, progress=False)
    local = select(str(tmp_path / "D"), z, tmp_path / "L", workers=1, **kw)
    try:
        remote = select(str(tmp_path / "D"), z, tmp_path / "R",
                        engine=RayEngine(workers=2, num_cpus=2), **kw)
        # resume on Ray: nothing left to score
        again = select(str(tmp_path / "D"), z, tmp_path / "R",
                       engine=RayEngine(workers=2, num_cpus=2), **kw)
    finally:
        ray.shutdown()
    assert remote.engine == "RayEngine" and again.shards_resumed == again.shards
    assert (local.selected, local.rejected, local.malformed) == \
        (remote.selected, remote.rejected, remote.malformed)
    assert local.malformed == len(MALFORMED_LINES)
    for sub in ("scores", "selected", "rejected"):
        a = [f.read_text() for f in sorted((tmp_path / "L" / sub).glob("*"))]
        b = [f.read_text() for f in sorted((tmp_path / "R" / sub).glob("*"))]
        assert a == b and a
    assert json.loads((tmp_path / "R" / "summary.json").read_text())["selected"] == local.selected
