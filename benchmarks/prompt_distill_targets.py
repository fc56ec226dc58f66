"""Does the distilled student reproduce its teacher's sentence choice? Targets and capacity.

The default classifier's quality comes from its coarse stage: sentences ranked by the mean
keep probability of their words, kept up to the budget (docs/prompt.md). The teacher
(``PerplexityCompressor(sentence_filter=True)``) ranks them by mean token self-information.
This diagnostic trains students on the cached teacher labels with different targets and
numbers of trained layers and measures, on held-out samples (every 10th), how much of the
teacher's coarse-stage choice the student reproduces:

* ``overlap@r`` - LM tokens in sentences both keep / tokens in the teacher's sentences, when
  each keeps sentences (best first) up to a fraction ``r`` of the sample's tokens;
* ``sent_spearman`` - rank correlation of the student's and teacher's sentence scores.

Rows: the shipped default, the classifiers in ``--assets`` folders (``export_partial`` output,
e.g. a ``ctxzip prompt distill --default --asset-dir DIR`` run), and students trained here on
``--n`` samples per spec ``target:trained_layers[:sentence_loss]``. Targets (``distill.mix_targets``):
``rank`` (0.5 x sentence percentile + 0.5 x word percentile, the default until the eighth
session), ``score`` (regression-like: the word's own self-information / 12, clipped to [0, 1],
soft labels), ``abs`` (the same mixed 50/50 with the sentence mean / 8); ``sentence_loss`` > 0
adds the pairwise sentence-ranking loss (``DistillConfig.sentence_loss``). Plus the upper bound
of word-level targets (the teacher's own word scores, aggregated like the student's). Rows of an
earlier run in ``--out`` are kept (``--students ""`` only adds the shipped, asset and oracle rows).

Needs the teacher-label cache of the full corpus (made once, ~1 h CPU)::

    ctxzip prompt distill --default --max-samples 1632 --labels-only --labels-cache ~/.cache/ctxzip/distill/labels-1632.pkl
    python benchmarks/prompt_distill_targets.py     # ~60 min CPU (6 students x 7-15 min)
    python benchmarks/prompt_distill_targets.py --students "" --assets /tmp/asset   # a candidate, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_LABELS = Path.home() / ".cache" / "ctxzip" / "distill" / "labels-1632.pkl"
RATES = (0.5, 0.33)


def prepare(rec: dict, enc_tok, lm_tok) -> dict:
    """Sentence index of every word, LM tokens per word and per sentence, teacher sentence ranks."""
    from ctxzip.prompt import distill as D
    from ctxzip.prompt.perplexity import split_sentences

    text = rec["text"]
    _, _, spans = D.word_spans(enc_tok, text)
    sents = split_sentences(text)
    starts = np.asarray([a for a, _ in sents])
    n = len(sents)
    wsent = D._sentence_of(starts, spans[:, 0], n)
    surface = [text[a:b] for a, b in spans.tolist()]
    w = np.asarray([max(len(e), 1) for e in lm_tok(surface, add_special_tokens=False)["input_ids"]], dtype=np.float64)
    offs = rec["lm_offsets"].astype(np.int64)
    tsent = D._sentence_of(starts, np.maximum(offs[:, 1] - 1, offs[:, 0]), n)
    srank = np.full(n, -1.0)
    srank[wsent] = rec["sent_rank"]
    return {"wsent": wsent, "w": w, "tcnt": np.bincount(tsent, minlength=n), "srank": srank, "n": n}


def agreement(word_scores: list[np.ndarray], preps: list[dict]) -> dict:
    from ctxzip.budget import fill_until

    out: dict = {}
    sp = []
    for rate in RATES:
        both, teacher = 0.0, 0.0
        for s, p in zip(word_scores, preps):
            if p["n"] < 3:
                continue
            cnt = p["tcnt"]
            cap = float(np.ceil(rate * cnt.sum()))
            t_keep = fill_until(p["srank"] - 9 * (cnt == 0), cnt, cap)
            wc = np.bincount(p["wsent"], weights=p["w"], minlength=p["n"])
            ss = np.where(wc > 0, np.bincount(p["wsent"], weights=s * p["w"], minlength=p["n"]) / np.maximum(wc, 1e-9), -np.inf)
            s_keep = fill_until(ss, cnt, cap)
            both += cnt[t_keep & s_keep].sum()
            teacher += cnt[t_keep].sum()
            if rate == RATES[0]:
                m = (wc > 0) & (p["srank"] >= 0)
                if m.sum() > 2:
                    sp.append(np.corrcoef(np.argsort(np.argsort(ss[m])), np.argsort(np.argsort(p["srank"][m])))[0, 1])
        out[f"overlap@{rate}"] = float(both / max(teacher, 1.0))
    out["sent_spearman"] = float(np.mean(sp)) if sp else None
    return out


def word_probs(model, tok, recs: list[dict]) -> list[np.ndarray]:
    import torch

    preds = []
    with torch.inference_mode():
        for r in recs:
            ids = torch.tensor([[tok.cls_token_id, *r["ids"][:510].tolist(), tok.sep_token_id]])
            p = torch.softmax(model(input_ids=ids).logits[0, 1:-1].float(), -1)[:, 1].numpy()
            wid = r["word_of_token"][: len(p)]
            n_w = len(r["word_rank"])
            cnt = np.bincount(wid, minlength=n_w)
            preds.append(np.where(cnt > 0, np.bincount(wid, weights=p, minlength=n_w) / np.maximum(cnt, 1), 0.0))
    return preds


def with_target(recs: list[dict], kind: str) -> list[dict]:
    from ctxzip.prompt import distill as D

    if kind == "rank":  # the shipped target until the eighth session
        return D.mix_targets(recs, 0.5)
    if kind == "score":
        return D.mix_targets(recs, 0.0, word_target="score")
    if kind == "abs":
        return D.mix_targets(recs, 0.5, word_target="score")
    raise ValueError(kind)


def _describe(meta: dict) -> str:
    """'score + 0.5 sentence, 4 layers, 1468 samples' from an asset's meta.json."""
    log = meta.get("distill_log", {})
    t = log.get("teacher", {})
    target = t.get("word_target", "rank") + (f" + {t['sentence_weight']:g} sentence" if t.get("sentence_weight") else "")
    return f"{target}, {len(meta.get('trained_layers', []))} layers, {log.get('n_train', '?')} samples"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="teacher-label cache (pickle)")
    ap.add_argument("--n", type=int, default=600, help="train on samples with index < n (every 10th held out)")
    ap.add_argument("--students", default="rank:2,score:2,abs:2,rank:4,score:2:1,score:4:1",
                    help="target:trained_layers[:sentence_loss], comma-separated")
    ap.add_argument("--assets", type=Path, nargs="*", default=[],
                    help="also measure the classifiers in these asset folders (export_partial output)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_distill_targets.json")
    args = ap.parse_args()
    if not args.labels.is_file():
        raise SystemExit(f"no teacher-label cache at {args.labels}; make it with: ctxzip prompt distill --default "
                         f"--max-samples 1632 --labels-only --labels-cache {args.labels}")
    import torch
    from transformers import AutoTokenizer

    from ctxzip.models import encoder_path, load_tokenizer
    from ctxzip.prompt import distill as D

    torch.set_num_threads(args.threads)
    with open(args.labels, "rb") as fh:
        recs = pickle.load(fh)["records"]
    ev = [r for r in recs if r["sample"] % 10 == 0]
    tr = [r for r in recs if r["sample"] % 10 != 0 and r["sample"] < args.n]
    enc_tok = AutoTokenizer.from_pretrained(encoder_path())
    preps = [prepare(r, enc_tok, load_tokenizer()) for r in ev]
    result: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "threads": args.threads, "loadavg": os.getloadavg()},
        "labels": str(args.labels), "n_eval": len(ev), "n_train": len(tr), "epochs": args.epochs, "rows": {},
    }
    if args.out.is_file():  # keep the rows of an earlier run (e.g. other students)
        result["rows"] = json.loads(args.out.read_text()).get("rows", {})
    model, tok = D.load_default_classifier()
    meta = json.loads((D.default_asset_dir() / "meta.json").read_text())
    result["rows"][f"shipped default ({_describe(meta)})"] = agreement(word_probs(model, tok, ev), preps)
    for a in args.assets:
        model, tok = D.load_partial(a)
        row = agreement(word_probs(model, tok, ev), preps)
        result["rows"][f"asset {a.name} ({_describe(json.loads((a / 'meta.json').read_text()))})"] = row
        print(a, json.dumps(row), flush=True)
    # upper bound of any word-level target: the teacher's own word scores, aggregated the same way
    result["rows"]["oracle: the teacher's word scores"] = agreement([r["word_score"].astype(float) for r in ev], preps)
    print(json.dumps(result["rows"]), flush=True)
    for spec in filter(None, args.students.split(",")):
        kind, layers, *rest = spec.split(":")
        sl = float(rest[0]) if rest else 0.0
        t0 = time.process_time()
        cfg = D.DistillConfig(train_layers=int(layers), epochs=args.epochs, lr=3e-4, batch_size=8, sentence_loss=sl)
        model, tok, _ = D.train(with_target(tr, kind), config=cfg, progress=False)
        row = agreement(word_probs(model, tok, ev), preps) | {"train_cpu_s": time.process_time() - t0}
        name = f"{kind}, {layers} layers, {len(tr)} samples" + (f", sentence loss {sl:g}" if sl else "")
        result["rows"][name] = row
        print(spec, json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
