"""Select the stdlib code most aligned with a target task (ZIP-FIT): exact, cascade, fast mode.

Source: ~2,000-char chunks of a few CPython standard-library modules; target: chunks of a
stdlib test file. Writes JSONL shards to a temporary folder and keeps 10% of them.

    python examples/datasel_zipfit.py
"""

from __future__ import annotations

import json
import sysconfig
import tempfile
from pathlib import Path

from ctxzip.datasel import ZipFit, ZipFitRace, select


def chunks(path: Path, size: int = 2000) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [text[i:i + size] for i in range(0, len(text), size)]


def main() -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])
    work = Path(tempfile.mkdtemp(prefix="ctxzip_datasel_"))
    (work / "data").mkdir()
    for name in ("argparse.py", "textwrap.py", "difflib.py", "fractions.py", "shlex.py"):
        with open(work / "data" / f"{name}.jsonl", "w") as f:
            for i, c in enumerate(chunks(lib / name)):
                f.write(json.dumps({"id": f"{name}#{i}", "text": c}) + "\n")
    test_file = lib / "test" / "test_textwrap.py"
    if not test_file.exists():  # some distributions strip the test suite
        test_file = lib / "textwrap.py"
    targets = chunks(test_file)[:20]

    # exact ZIP-FIT (gzip level 6: the same scores as the reference implementation)
    summary = select(str(work / "data" / "*.jsonl"), ZipFit(targets, codec="gzip", level=6),
                     work / "out", keep="10%", workers=2, shard_size=50)
    print(json.dumps({k: summary.to_dict()[k] for k in
                      ("records", "selected", "rejected", "malformed", "threshold")}, indent=1))
    for f in sorted((work / "out" / "selected").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            print(f"  {rec['zipfit_score']:.4f}  {rec['id']}")

    # fast mode: a cheap ISA-L prefilter on everything, exact gzip-6 on 3x the budget
    try:
        fast = ZipFit(targets, codec="isal", level=0)
    except ImportError:
        return
    s2 = select(str(work / "data" / "*.jsonl"), ZipFit(targets), work / "out_cascade",
                keep="10%", workers=2, shard_size=50, prefilter=fast, margin=3)
    print("cascade:", s2.cascade, "selected", s2.selected)

    # fast mode proper: exact gzip-6 pairs, raced over the targets after an ISA-L-0 prefilter
    s3 = select(str(work / "data" / "*.jsonl"), ZipFitRace(targets), work / "out_fast",
                keep="10%", workers=2, shard_size=50)
    c = s3.cascade or {}
    print(f"fast mode: selected {s3.selected}, exact pairs "
          f"{c.get('exact_pairs_fraction_of_exact_mode', 0):.0%} of exact mode's")


if __name__ == "__main__":
    main()
