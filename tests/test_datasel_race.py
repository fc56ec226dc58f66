"""ZipFitRace (ZIP-FIT fast mode): exactness in the limits, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from ctxzip.budget import topk_indices
from ctxzip.datasel import ZipFit, ZipFitRace
from tests.test_datasel import _prose_chunks, _stdlib_chunks


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    docs = _stdlib_chunks(50, size=500) + _prose_chunks(30, size=500)
    targets = _stdlib_chunks(8, size=500, skip=400)
    return docs, targets


def test_no_early_decisions_is_exact_mode(corpus):
    docs, targets = corpus
    exact = ZipFit(targets).score(docs)
    # z huge: nothing is kept or dropped early; no prefilter: everyone races to the end
    res = ZipFitRace(targets, prefilter=None, z=1e9).select(docs, 10)
    assert set(res.selected.tolist()) == set(topk_indices(exact, 10).tolist())
    assert (res.stage == 2).all()
    np.testing.assert_array_equal(res.scores, exact)
    assert res.exact_pairs == len(docs) * len(targets)
    assert res.pairs_fraction == pytest.approx(1.0)


def test_prefilter_pool_and_race_spend_fewer_pairs(corpus):
    docs, targets = corpus
    exact = ZipFit(targets).score(docs)
    res = ZipFitRace(targets, prefilter="isal-0", prefilter_targets=3, pool=2.0, z=1.0,
                     schedule=(0.25, 0.5, 1.0)).select(docs, 10)
    assert len(res.selected) == len(set(res.selected.tolist())) == 10
    assert res.exact_pairs < len(docs) * len(targets)
    assert res.prefilter_pairs == len(docs) * 3
    assert (res.stage[res.targets_used == 0] == 0).all()
    full = res.stage == 2
    np.testing.assert_array_equal(res.scores[full], exact[full])
    # the code targets pull code documents (the first 50) ahead of prose
    assert np.mean(res.selected < 50) >= 0.8


def test_deterministic_and_pool_equals_in_process(corpus):
    docs, targets = corpus
    race = ZipFitRace(targets, prefilter_targets=2, pool=2.0, schedule=(0.5, 1.0))
    a = race.select(docs, 8)
    b = race.select(docs, 8, workers=2, chunk_pairs=20)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_k_at_least_n_keeps_everything(corpus):
    docs, targets = corpus
    res = ZipFitRace(targets).select(docs[:5], 9)
    assert sorted(res.selected.tolist()) == list(range(5))


@pytest.mark.parametrize("kw", [
    dict(z=-1), dict(z=float("nan")), dict(pool=0.5), dict(prefilter_targets=0),
    dict(schedule=(0.5,)), dict(schedule=(0.5, 0.4, 1.0)), dict(schedule=()),
    dict(prefilter="nope"), dict(codec="gzip", level=0),
])
def test_bad_params(corpus, kw):
    with pytest.raises(ValueError):
        ZipFitRace(corpus[1], **kw)


def test_bad_select_input(corpus):
    race = ZipFitRace(corpus[1])
    for k in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="k must"):
            race.select(corpus[0], k)
    with pytest.raises(ValueError, match="list of strings"):
        race.select("one string", 1)
    with pytest.raises(ValueError, match="text 1"):
        race.select(["a", b"bytes"], 1)
    with pytest.raises(ValueError, match="workers"):
        race.select(corpus[0], 1, workers=-2)
    with pytest.raises(ValueError, match="at least one target"):
        ZipFitRace([])


def test_select_pipeline_fast_mode_matches_in_memory(corpus, tmp_path):
    import json

    from ctxzip.datasel import select

    docs, targets = corpus
    src = tmp_path / "src.jsonl"
    with open(src, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": d}) + "\n")
        f.write("{broken\n")
    race = ZipFitRace(targets, prefilter_targets=3, pool=2.0, schedule=(0.5, 1.0))
    want = set(race.select(docs, 8).selected.tolist())
    summ = select(str(src), race, tmp_path / "out", keep=8, workers=1, shard_size=25,
                  progress=False)
    assert (summ.selected, summ.rejected, summ.malformed) == (8, len(docs) - 8, 1)
    got = set()
    for p in (tmp_path / "out" / "selected").glob("*.jsonl"):
        got |= {int(json.loads(line)["id"][1:]) for line in p.read_text().splitlines()}
    assert got == want
    with pytest.raises(ValueError, match="keep"):
        select(str(src), race, tmp_path / "o2", threshold=0.5, progress=False)


def test_cli_fast(corpus, tmp_path, capsys):
    import json

    from ctxzip.cli import main

    docs, targets = corpus
    for name, rows in (("t.jsonl", targets), ("d.jsonl", docs)):
        with open(tmp_path / name, "w") as f:
            for r in rows:
                f.write(json.dumps({"text": r}) + "\n")
    rc = main(["select", "zipfit", "--target", str(tmp_path / "t.jsonl"), "--input",
               str(tmp_path / "d.jsonl"), "--keep", "10%", "--out", str(tmp_path / "o"),
               "--fast", "--workers", "1", "-q"])
    assert rc in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["selected"] == 8 and out["cascade"]["race"] is True
