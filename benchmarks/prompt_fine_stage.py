"""Where does the distilled default lose context benefit against its teacher: in the sentences it
keeps, in the words it drops inside them, or in how the kept words are joined?

Same documents, target LM and metric as `prompt_quality.py` (10 held-out `pydoc_data.topics`
pieces, 512-token contexts, SmolLM2, pooled context benefit on the continuation and recall
targets). Variants at each rate, all at the same token budget:

* `student-collapse` - the default classifier, kept words joined the anchor's way (one space /
  line break per gap, `whitespace="collapse"`);
* `student` - the default classifier as shipped (`whitespace="keep"`: original gaps between
  neighbouring kept words);
* `student-sents+teacher-words` - the student's sentence stage, but words inside the kept
  sentences ranked by the teacher's mean token self-information instead of the student's
  probability (whitespace kept);
* `student-sents+teacher-tokens` - the student's sentence stage, then the teacher's
  highest-self-information LM *tokens* inside the kept sentences (one static scoring pass, the
  tokens decoded as they are: sub-word pieces and the exact whitespace tokens survive);
* `teacher` - `PerplexityCompressor(sentence_filter=True, token_budget_ratio=1.0)`, the
  distillation teacher.

Also recorded: the Spearman correlation between the student's word probabilities and the
teacher's per-word mean self-information, over the document and within sentences.

    python benchmarks/prompt_fine_stage.py            # ~10 min on 2 cores
    python benchmarks/prompt_fine_stage.py --docs 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"


def _rank01(x):
    import numpy as np

    r = np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)
    return r / max(len(x) - 1, 1)


def _spearman(a, b) -> float:
    import numpy as np

    return float(np.corrcoef(_rank01(a), _rank01(b))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--rates", type=float, nargs="*", default=[0.5, 0.33])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "prompt_fine_stage.json"))
    args = ap.parse_args()

    import numpy as np
    import torch
    from prompt_quality import heldout_cases

    from ctxzip.budget import Budget
    from ctxzip.eval import ContextEvaluator, pooled_benefit
    from ctxzip.prompt import PerplexityCompressor, TokenClassifierCompressor
    from ctxzip.prompt.perplexity import split_sentences
    from ctxzip.prompt.token_classifier import WordScores

    torch.set_num_threads(args.threads)
    ev = ContextEvaluator(None)
    tok = ev.tokenizer
    cases = heldout_cases(ev, args.docs, 512)
    st = TokenClassifierCompressor(tokenizer=tok)
    st_collapse = TokenClassifierCompressor(tokenizer=tok, whitespace="collapse")
    te = PerplexityCompressor(tokenizer=tok, sentence_filter=True, token_budget_ratio=1.0)
    _, ltok = te.lm()
    rows: list[dict] = []
    corr: list[dict] = []
    for d, case in cases:
        text = case.context_text
        ws = st.score_words(text)
        # teacher: one static self-information pass over the LM tokens, mapped to words by the
        # token's last character (a leading space belongs to the word after it)
        enc = ltok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offs = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
        info, _ = te.token_scores(ids, None)
        info = np.asarray(info, dtype=np.float64)
        tw = np.clip(np.searchsorted(ws.spans[:, 0], np.maximum(offs[:, 1] - 1, offs[:, 0]), side="right") - 1, 0, len(ws.prob) - 1)
        n_tok = np.bincount(tw, minlength=len(ws.prob))
        word_info = np.bincount(tw, weights=info, minlength=len(ws.prob)) / np.maximum(n_tok, 1)
        sents = np.searchsorted([a for a, _ in split_sentences(text)], ws.spans[:, 0], side="right")
        within = [_spearman(ws.prob_raw[sents == s], word_info[sents == s])
                  for s in np.unique(sents) if (sents == s).sum() >= 5]
        corr.append({"doc": d.id, "spearman_document": _spearman(ws.prob_raw, word_info),
                     "spearman_within_sentence_median": float(np.nanmedian(within)) if within else None})
        for rate in args.rates:
            n = len(case.context_ids)
            target = Budget(rate=rate).resolve(n)
            staged, _ = st._sentence_stage(text, ws, target)
            in_kept = staged.prob >= ws.prob  # the stage lowers words of dropped sentences by 2
            texts = {
                "student-collapse": st_collapse.compress(text, budget=Budget(rate=rate)).text,
                "student": st.compress(text, budget=Budget(rate=rate)).text,
            }
            p = _rank01(word_info)
            ws2 = WordScores(ws.spans, np.where(in_kept, p, p - 2.0), ws.prob_raw, ws.chunk, ws.weight, ws.forced, ws.words)
            keep = st.select(ws2, Budget(rate=rate), n)
            texts["student-sents+teacher-words"] = st._fit_budget(text, ws2, keep, st.render(text, ws.spans, keep), target)[1]
            order = np.argsort(-np.where(in_kept[tw], info, -np.inf), kind="stable")[:target]
            mask = np.zeros(len(ids), dtype=bool)
            mask[order] = True
            texts["student-sents+teacher-tokens"] = ltok.decode([i for i, k in zip(ids, mask) if k])
            texts["teacher"] = te.compress(text, budget=Budget(rate=rate)).text
            for name, t in texts.items():
                b = ev.benefit(case, t)
                rows.append({"doc": d.id, "variant": name, "rate": rate, "tokens": len(ev.encode(t)), "budget": target,
                             "continuation": b["continuation"], "recall": b["recall"],
                             "nll": {k: b[f"nll_{k}"] for k in ("continuation", "recall")}})
                print(f"{d.id} {rate} {name:30s} cont {b['continuation']:.3f} recall {b['recall']:.3f}", flush=True)

    summary = {}
    for rate in args.rates:
        for name in dict.fromkeys(r["variant"] for r in rows):
            rs = [r for r in rows if r["variant"] == name and r["rate"] == rate]
            summary[f"{name}@{rate}"] = {
                t: pooled_benefit((r["nll"][t]["none"], r["nll"][t]["full"], r["nll"][t]["compressed"]) for r in rs)
                for t in ("continuation", "recall")
            } | {"tokens_mean": float(np.mean([r["tokens"] for r in rs]))}
            print(f"{rate} {name:30s} " + " ".join(f"{k} {v:.3f}" for k, v in summary[f"{name}@{rate}"].items()))
    info_out = {
        "summary": summary,
        "correlation": corr,
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info_out, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
