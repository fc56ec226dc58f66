"""The Ray Data engine on a local Ray instance selects exactly what the local engine selects.

Same data as zipfit_speed.py (a subset: 2,000 stdlib chunks, 20 held-out test-suite targets),
ZIP-FIT exact (gzip-6), keep 10%, 2 workers each; compares the score files, the selected and
rejected files byte for byte, and reports wall times (Ray's include its startup).

    python benchmarks/ray_vs_local.py [--quick] [--workers 2]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _datasel_data as data  # noqa: E402


def main() -> None:
    a = data.parse_args(__doc__, "400 docs")
    import ray

    from ctxzip.datasel import RayEngine, ZipFit, select

    source, targets = data.build(20, max_source=400 if a.quick else 2000)
    work = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    # 4 files, one with malformed lines, so accounting is compared too
    for i in range(4):
        data.write_jsonl(work / f"part{i}.jsonl", source[i::4])
    with open(work / "part0.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": broken\n{"no_text": 1}\n{"text": ""}\n')
    z = ZipFit([t["text"] for t in targets])
    kw = dict(keep="10%", shard_size=100, progress=False)
    t0 = time.perf_counter()
    loc = select(str(work / "*.jsonl"), z, work / "local", workers=a.workers, **kw)
    t1 = time.perf_counter()
    try:
        rs = select(str(work / "*.jsonl"), z, work / "ray",
                    engine=RayEngine(workers=a.workers, num_cpus=a.workers), **kw)
        t2 = time.perf_counter()
    finally:
        ray.shutdown()
    same = {}
    for sub in ("scores", "selected", "rejected"):
        fa = sorted((work / "local" / sub).glob("*.jsonl"))
        fb = sorted((work / "ray" / sub).glob("*.jsonl"))
        same[sub] = [f.name for f in fa] == [f.name for f in fb] and all(
            x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    same["malformed"] = ((work / "local" / "malformed.jsonl").read_bytes()
                         == (work / "ray" / "malformed.jsonl").read_bytes())
    res = {"machine": data.machine(), "quick": a.quick, "records": loc.records,
           "shards": loc.shards, "workers": a.workers,
           "local": {k: getattr(loc, k) for k in ("selected", "rejected", "malformed")}
           | {"wall_s": t1 - t0},
           "ray": {k: getattr(rs, k) for k in ("selected", "rejected", "malformed")}
           | {"wall_s_including_ray_start": t2 - t1},
           "identical_files": same, "identical": all(same.values())}
    print(json.dumps(res, indent=1))
    name = "ray_vs_local_quick" if a.quick else "ray_vs_local"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
