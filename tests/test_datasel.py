"""ctxzip.datasel: corpus I/O, ZipFit, global-budget selection, local engine, CLI."""

from __future__ import annotations

import gzip
import json
import pickle
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxzip.budget import topk_indices
from ctxzip.datasel import Codec, ZipFit, decide, get_codec, iter_records, plan_shards, select
from ctxzip.datasel.io import read_shard


# ------------------------------------------------------------------ real local text (stdlib)
def _stdlib_chunks(n: int, size: int = 600, skip: int = 0) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for name in ("textwrap.py", "shlex.py", "fractions.py", "argparse.py", "difflib.py"):
        text = (root / name).read_text(encoding="utf-8")
        out += [text[i:i + size] for i in range(0, len(text) - size, size)]
    out = out[skip:]
    assert len(out) >= n
    return out[:n]


def _prose_chunks(n: int, size: int = 600) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return [text[i:i + size] for i in range(0, n * size, size)]


def _ref_alignment(texts: list[str], targets: list[str], level: int = 6) -> np.ndarray:
    """The ZIP-FIT reference's arithmetic (zip_fit/zipfit.py), written out with gzip.compress."""
    def c(s: str) -> int:
        return len(gzip.compress(s.encode("utf-8"), compresslevel=level))

    out = []
    for s1 in texts:
        c1 = c(s1)
        sims = []
        for s2 in targets:
            c2 = c(s2)
            sims.append(1 - (c(s1 + s2) - min(c1, c2)) / max(c1, c2))
        out.append(np.mean(sims))
    return np.array(out)


MALFORMED_LINES = [
    b'{"text": broken\n',             # invalid JSON
    b'{"text": "caf\xe9 au lait"}\n',  # not UTF-8
    b'{"body": "no text field"}\n',   # missing text field
    b'{"text": "   "}\n',             # empty text
    b"\n",                            # blank line
    b"[1, 2, 3]\n",                   # not an object
    b'{"text": 42}\n',                # text not a string
    b'{"text": null}\n',              # null text
]


def _write_corpus(d: Path, texts: list[str], *, malformed: bool = True, files: int = 2) -> list[str]:
    """JSONL files with ids; malformed lines interleaved in the first file. Returns valid texts
    in corpus order."""
    d.mkdir(parents=True, exist_ok=True)
    per = (len(texts) + files - 1) // files
    order: list[str] = []
    for k in range(files):
        part = texts[k * per:(k + 1) * per]
        with open(d / f"part{k}.jsonl", "wb") as f:
            for i, t in enumerate(part):
                f.write((json.dumps({"id": f"p{k}-{i}", "text": t}) + "\n").encode())
                order.append(t)
                if malformed and k == 0 and i < len(MALFORMED_LINES):
                    f.write(MALFORMED_LINES[i])
    return order


# ----------------------------------------------------------------------------- codecs
@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 9))
def test_gzip_codec_length_equals_gzip_compress(data: bytes, level: int) -> None:
    assert Codec("gzip", level).length(data) == len(gzip.compress(data, compresslevel=level))


def test_codec_parsing_and_errors() -> None:
    assert get_codec("gzip").level == 6
    assert get_codec("gzip-3") == Codec("gzip", 3)
    assert get_codec("zlib-ng-1") == Codec("zlib-ng", 1)
    with pytest.raises(ValueError, match="stores the data"):
        Codec("gzip", 0)
    assert Codec("gzip", 0, allow_stored=True).length(b"abc") > 0
    with pytest.raises(ValueError, match="unknown codec"):
        Codec("bzip9")
    with pytest.raises(ValueError, match="level"):
        Codec("gzip", 12)
    with pytest.raises(ValueError, match="level"):
        get_codec("gzip-3", level=5)
    c = pickle.loads(pickle.dumps(Codec("zstd", 1)))
    assert c.length(b"hello hello hello") > 0


@pytest.mark.parametrize("name", ["zlib", "isal", "zlib-ng", "lz4", "zstd"])
def test_optional_codecs_compress(name: str) -> None:
    pytest.importorskip({"isal": "isal", "zlib-ng": "zlib_ng", "lz4": "lz4",
                         "zstd": "zstandard"}.get(name, "zlib"))
    c = get_codec(name)
    rep, rnd = b"abcabcabc" * 200, np.random.default_rng(0).bytes(1800)
    assert c.length(rep) < c.length(rnd)


# ----------------------------------------------------------------------------- ZipFit
def test_zipfit_matches_reference_exactly_gzip6() -> None:
    targets = _stdlib_chunks(6, skip=40)
    texts = _stdlib_chunks(10) + _prose_chunks(5)
    z = ZipFit(targets, codec="gzip", level=6)
    got = z.score(texts)
    assert isinstance(got, np.ndarray) and got.shape == (15,)
    np.testing.assert_array_equal(got, _ref_alignment(texts, targets, 6))


def test_zipfit_prefers_in_domain_text() -> None:
    targets = _stdlib_chunks(8, skip=40)
    code, prose = _stdlib_chunks(10), _prose_chunks(10)
    s = ZipFit(targets).score(code + prose)
    assert s[:10].mean() > s[10:].mean()
    assert np.all((s > -0.5) & (s < 1.0))


def test_zipfit_order_workers_and_pickle() -> None:
    targets = _stdlib_chunks(4, skip=40)
    texts = _stdlib_chunks(12) + _prose_chunks(6)
    z = ZipFit(targets)
    a = z.score(texts)
    np.testing.assert_array_equal(z.score(texts[::-1]), a[::-1])
    np.testing.assert_array_equal(z.score(texts, workers=2), a)
    z2 = pickle.loads(pickle.dumps(z))
    np.testing.assert_array_equal(z2.score(texts), a)
    assert z.score([]).shape == (0,)


def test_zipfit_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one target"):
        ZipFit([])
    with pytest.raises(ValueError, match="list of strings"):
        ZipFit("just one string")
    with pytest.raises(ValueError, match="empty"):
        ZipFit(["ok", ""])
    with pytest.raises(ValueError, match="not a string"):
        ZipFit(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="stores the data"):
        ZipFit(["ok"], level=0)
    z = ZipFit(["some target text"])
    with pytest.raises(ValueError, match="not a string"):
        z.score(["fine", b"bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="list of strings"):
        z.score("one string")


# ----------------------------------------------------------------------------- I/O
def test_plan_and_read_jsonl_offsets(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 7)}) for i in range(23)]
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(lines))  # no trailing newline
    for size in (1, 3, 5, 23, 100):
        specs = list(plan_shards(str(p), size))
        assert sum(s.size for s in specs) == 23
        assert [s.start for s in specs] == list(range(0, 23, size))
        recs = [r for s in specs for r in read_shard(s)]
        assert [r.text for r in recs] == [json.loads(x)["text"] for x in lines]
        assert [r.pos for r in recs] == list(range(23))


def test_compressed_parquet_hf_and_memory_inputs(tmp_path: Path) -> None:
    texts = [f"document number {i}" for i in range(11)]
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body))
    zstd = pytest.importorskip("zstandard")
    (tmp_path / "b.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(body))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts[:5] + [None] + texts[6:]}), tmp_path / "c.parquet",
                   row_group_size=4)
    for name in ("a.jsonl.gz", "b.jsonl.zst", "c.parquet"):
        recs = list(iter_records(str(tmp_path / name), shard_size=3))
        assert len(recs) == 11
        got = [r.text for r in recs]
        if name == "c.parquet":
            assert got[5] is None and recs[5].reason == "missing text field 'text'"
            got[5] = texts[5]
        assert got == texts
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": texts, "id": [f"d{i}" for i in range(11)]})
    recs = list(iter_records(ds, shard_size=4))
    assert [r.id for r in recs] == [f"d{i}" for i in range(11)]
    assert [r.text for r in iter_records(texts + ["  "], shard_size=5)][:11] == texts


def test_input_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(plan_shards(str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError, match="no input files"):
        list(plan_shards(str(tmp_path / "*.jsonl")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="cannot tell the format"):
        list(plan_shards(str(tmp_path / "x.csv")))
    with pytest.raises(ValueError, match="shard_size"):
        list(plan_shards(["a"], 0))


# ----------------------------------------------------------------------------- selection
def test_select_counts_add_up_and_threshold_is_global(tmp_path: Path) -> None:
    texts = _stdlib_chunks(30) + _prose_chunks(30)
    order = _write_corpus(tmp_path / "D", texts, files=3)
    targets = _stdlib_chunks(5, skip=40)
    z = ZipFit(targets)
    summ = select(str(tmp_path / "D" / "*.jsonl"), z, tmp_path / "OUT", keep="10%",
                  shard_size=7, workers=1, progress=False)
    assert summ.records == 60 + len(MALFORMED_LINES)
    assert summ.malformed == len(MALFORMED_LINES)
    assert summ.selected == 6 and summ.selected + summ.rejected + summ.malformed == summ.records
    assert set(summ.malformed_reasons) == {"invalid JSON", "not valid UTF-8", "empty text",
                                           "missing text field 'text'", "blank line",
                                           "not a JSON object", "text field 'text' is not a string"}
    expected = {order[i] for i in topk_indices(z.score(order), 6).tolist()}
    got = [json.loads(line) for f in sorted((tmp_path / "OUT" / "selected").glob("*.jsonl"))
           for line in f.read_text().splitlines()]
    assert {g["text"] for g in got} == expected
    assert all("zipfit_score" in g and g["id"].startswith("p") for g in got)
    assert min(g["zipfit_score"] for g in got) == summ.threshold
    rej = [json.loads(line) for f in (tmp_path / "OUT" / "rejected").glob("*.jsonl")
           for line in f.read_text().splitlines()]
    assert len(rej) == summ.rejected and all(r["score"] <= summ.threshold for r in rej)
    mal = (tmp_path / "OUT" / "malformed.jsonl").read_text().splitlines()
    assert len(mal) == summ.malformed and all(json.loads(m)["reason"] for m in mal)
    on_disk = json.loads((tmp_path / "OUT" / "summary.json").read_text())
    assert on_disk["selected"] == 6


def test_select_budgets(tmp_path: Path) -> None:
    texts = _stdlib_chunks(20, size=300) + _prose_chunks(20, size=500)
    z = ZipFit(_stdlib_chunks(3, skip=40))
    s = select(texts, z, tmp_path / "a", keep="7", progress=False, workers=1)
    assert s.selected == 7 and s.records == 40
    s = select(texts, z, tmp_path / "b", keep_tokens=3000, token_unit="chars", progress=False,
               workers=1)
    assert s.total_tokens == sum(len(t) for t in texts)
    assert s.selected_tokens <= 3000 and s.selected_tokens > 3000 - 600
    s = select(texts, z, tmp_path / "c", threshold=0.2, progress=False, workers=1)
    assert s.selected == int((z.score(texts) >= 0.2).sum())
    with pytest.raises(ValueError, match="exactly one"):
        select(texts, z, tmp_path / "d", keep="10%", threshold=0.1)
    with pytest.raises(ValueError, match="budget"):
        select(texts, z, tmp_path / "e", keep="150%")


def test_decide_ties_and_token_prefix() -> None:
    s = np.array([0.5, 0.9, 0.5, 0.1, 0.9])
    assert decide(s, keep=2).tolist() == [False, True, False, False, True]
    assert decide(s, keep=3).tolist() == [True, True, False, False, True]
    toks = np.array([10, 10, 10, 10, 30])
    # score order: 1, 4, 0, 2, 3 -> prefix sums 10, 40, 50, 60 -> budget 45 keeps 2 docs
    assert decide(s, keep_tokens=45, tokens=toks).tolist() == [False, True, False, False, True]
    assert not decide(s, keep_tokens=5, tokens=toks).any()
    assert decide(np.zeros(0), keep="10%").shape == (0,)


def test_select_resume_and_settings_guard(tmp_path: Path) -> None:
    texts = _stdlib_chunks(25)
    z = ZipFit(_stdlib_chunks(3, skip=40))
    out = tmp_path / "OUT"
    first = select(texts, z, out, keep="20%", shard_size=5, progress=False, workers=1)
    sel1 = sorted((out / "selected").glob("*"))
    (out / "scores" / "000002.jsonl").unlink()
    again = select(texts, z, out, keep="20%", shard_size=5, progress=False, workers=1)
    assert again.shards_resumed == 4 and again.selected == first.selected
    assert [p.read_text() for p in sorted((out / "selected").glob("*"))] == \
        [p.read_text() for p in sel1]
    with pytest.raises(ValueError, match="other settings"):
        select(texts, ZipFit(_stdlib_chunks(2, skip=40)), out, keep="20%", shard_size=5,
               progress=False, workers=1)
    s = select(texts, ZipFit(_stdlib_chunks(2, skip=40)), out, keep="20%", shard_size=5,
               progress=False, workers=1, overwrite=True)
    assert s.shards_resumed == 0


def test_local_pool_equals_single_process(tmp_path: Path) -> None:
    texts = _stdlib_chunks(24) + _prose_chunks(8)
    _write_corpus(tmp_path / "D", texts, files=2)
    z = ZipFit(_stdlib_chunks(4, skip=40))
    a = select(str(tmp_path / "D"), z, tmp_path / "A", keep="25%", shard_size=6, workers=1,
               progress=False)
    b = select(str(tmp_path / "D"), z, tmp_path / "B", keep="25%", shard_size=6, workers=2,
               progress=False)
    assert (a.selected, a.rejected, a.malformed) == (b.selected, b.rejected, b.malformed)
    for sub in ("scores", "selected", "rejected"):
        fa = sorted((tmp_path / "A" / sub).glob("*"))
        fb = sorted((tmp_path / "B" / sub).glob("*"))
        assert [f.read_text() for f in fa] == [f.read_text() for f in fb]


# ----------------------------------------------------------------------------- CLI
def test_cli_select_zipfit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ctxzip.cli import main

    _write_corpus(tmp_path / "D", _stdlib_chunks(20) + _prose_chunks(20), files=2)
    with open(tmp_path / "T.jsonl", "w") as f:
        for t in _stdlib_chunks(4, skip=40):
            f.write(json.dumps({"text": t}) + "\n")
    rc = main(["select", "zipfit", "--target", str(tmp_path / "T.jsonl"), "--input",
               str(tmp_path / "D" / "*.jsonl"), "--keep", "10%", "--out", str(tmp_path / "OUT"),
               "--workers", "1", "-q"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selected"] == 4 and out["malformed"] == len(MALFORMED_LINES)
    assert out["selected"] + out["rejected"] + out["malformed"] == out["records"]
    rc = main(["select", "zipfit", "--target", str(tmp_path / "T.jsonl"), "--input",
               str(tmp_path / "D" / "*.jsonl"), "--keep", "4", "--out", str(tmp_path / "C"),
               "--workers", "1", "-q", "--prefilter", "zlib-1", "--prefilter-targets", "2",
               "--margin", "2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selected"] == 4 and out["cascade"]["candidates"] == 8
    rc = main(["select", "zipfit", "--target", str(tmp_path / "T.jsonl"), "--input",
               str(tmp_path / "D" / "*.jsonl"), "--keep", "lots", "--out", str(tmp_path / "X")])
    assert rc == 2
    assert "cannot parse budget" in capsys.readouterr().err
    rc = main(["select", "zipfit", "--target", str(tmp_path / "nope.jsonl"), "--input",
               str(tmp_path / "D"), "--keep", "10%", "--out", str(tmp_path / "Y")])
    assert rc == 2


def test_prefilter_cascade(tmp_path: Path) -> None:
    pytest.importorskip("isal")
    texts = _stdlib_chunks(30) + _prose_chunks(20)
    targets = _stdlib_chunks(4, skip=40)
    exact, fast = ZipFit(targets), ZipFit(targets, codec="isal", level=0)
    select(texts, exact, tmp_path / "ref", keep="6", shard_size=9, workers=1,
           progress=False)
    ref_sel = (tmp_path / "ref" / "selected").glob("*.jsonl")
    ref_text = sorted(line for f in ref_sel for line in f.read_text().splitlines())
    # a candidate pool as large as the corpus: identical to exact selection
    big = select(texts, exact, tmp_path / "big", keep="6", shard_size=9, workers=1,
                 progress=False, prefilter=fast, margin=50)
    big_text = sorted(line for f in (tmp_path / "big" / "selected").glob("*.jsonl")
                      for line in f.read_text().splitlines())
    assert big_text == ref_text and big.cascade["candidates"] == 50
    # margin 1: the prefilter's top 6, written with their exact scores
    one = select(texts, exact, tmp_path / "one", keep="6", shard_size=9, workers=1,
                 progress=False, prefilter=fast, margin=1)
    assert one.selected == 6 and one.cascade["candidates"] == 6
    fast_top = {texts[i] for i in topk_indices(fast.score(texts), 6).tolist()}
    got = [json.loads(line) for f in (tmp_path / "one" / "selected").glob("*.jsonl")
           for line in f.read_text().splitlines()]
    assert {g["text"] for g in got} == fast_top
    ex = dict(zip(texts, exact.score(texts)))
    assert all(g["zipfit_score"] == ex[g["text"]] for g in got)
    stages = Counter(json.loads(line)["stage"] for f in (tmp_path / "one" / "rejected").glob("*")
                     for line in f.read_text().splitlines())
    assert stages == {"prefilter": 44}
    again = select(texts, exact, tmp_path / "one", keep="6", shard_size=9, workers=1,
                   progress=False, prefilter=fast, margin=1)
    assert again.shards_resumed == again.shards
    with pytest.raises(ValueError, match="threshold"):
        select(texts, exact, tmp_path / "x", threshold=0.1, prefilter=fast)
    with pytest.raises(ValueError, match="margin"):
        select(texts, exact, tmp_path / "x", keep="6", prefilter=fast, margin=0.5)
