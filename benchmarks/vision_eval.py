"""Task accuracy of visual-token pruning on a real VLM, lmms-eval style (needs real weights).

No VLM weights are reachable on the machine this project is developed on, so this script has
only been run in its ``--smoke`` mode (tiny random model: it checks the loop, not quality).
With weights (any Hugging Face id or local path of a LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL /
Qwen2.5-VL checkpoint) it evaluates the unpruned model and every method x budget on the same
examples and writes one JSON:

    # POPE (yes/no hallucination benchmark, as lmms-eval's `pope` task): accuracy and F1
    python benchmarks/vision_eval.py --model llava-hf/llava-1.5-7b-hf \\
        --data lmms-lab/POPE --split test --task pope --limit 500 \\
        --methods fastv,visionzip,tome,prumerge,globalcom2,correlation --keep 192,128,64

    # any JSONL with {"image": path, "question": str, "answer": str} (exact match / contains)
    python benchmarks/vision_eval.py --model /path/to/llava-v1.6-vicuna-7b-hf --data my_vqa.jsonl

Data: a local ``.jsonl`` file, or a Hugging Face dataset id loaded with ``datasets`` (fields
``image``, ``question``, ``answer``, as lmms-lab's POPE/GQA/TextVQA exports have them).
Scoring follows lmms-eval: POPE parses yes/no from the first word of the answer; "vqa" counts
normalised exact match and answer-contained-in-output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctxzip.budget import Budget  # noqa: E402
from ctxzip.vision import prune, unprune  # noqa: E402


def normalise(s: str) -> str:
    s = s.lower().strip()
    s = re.sub(r"[^\w\s]", " ", s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def pope_label(text: str) -> str:
    words = normalise(text).split()
    if not words:
        return "other"
    if "no" in words[:3] or "not" in words[:3]:
        return "no"
    return "yes" if "yes" in words[:3] else "other"


def score(task: str, predictions: list[str], answers: list[str]) -> dict[str, float]:
    if not predictions:
        return {"n": 0}
    if task == "pope":
        pred = [pope_label(p) for p in predictions]
        gold = [normalise(a) for a in answers]
        tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
        fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold))
        fn = sum(p != "yes" and g == "yes" for p, g in zip(pred, gold))
        acc = sum(p == g for p, g in zip(pred, gold)) / len(gold)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        return {"n": len(gold), "accuracy": acc, "f1": f1, "yes_ratio": pred.count("yes") / len(pred)}
    em = sum(normalise(p) == normalise(a) for p, a in zip(predictions, answers)) / len(answers)
    contains = sum(normalise(a) in normalise(p) for p, a in zip(predictions, answers)) / len(answers)
    return {"n": len(answers), "exact_match": em, "contains": contains}


def run_eval(
    model: Any,
    examples: list[dict],
    build_inputs: Callable[[dict], dict],
    decode: Callable[[Any], str],
    *,
    task: str,
    methods: Iterable[str],
    keeps: Iterable[int],
    max_new_tokens: int = 16,
    method_params: dict[str, dict] | None = None,
) -> list[dict]:
    """Unpruned baseline + every method x keep on the same examples (greedy decoding)."""
    from tqdm import tqdm

    method_params = method_params or {}
    answers = [str(e["answer"]) for e in examples]
    configs: list[tuple[str, int | None]] = [("none", None)] + [(m, k) for m in methods for k in keeps]
    results = []
    for method, keep in configs:
        if method != "none":
            prune(model, method, Budget(tokens=keep), **method_params.get(method, {}))
        preds, kept, secs = [], [], 0.0
        try:
            for ex in tqdm(examples, desc=f"{method}@{keep}"):
                inputs = build_inputs(ex)
                t0 = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                secs += time.perf_counter() - t0
                preds.append(decode(out[0, inputs["input_ids"].shape[1]:]))
                if method != "none":
                    kept.extend(a for _, a in model.ctxzip_vision.last_stats)
        finally:
            if method != "none":
                unprune(model)
        results.append({
            "method": method,
            "keep": keep,
            "scores": score(task, preds, answers),
            "mean_visual_tokens_kept": sum(kept) / len(kept) if kept else None,
            "generate_seconds": secs,
            "predictions": preds[:20],
        })
    return results


def load_examples(data: str, split: str, limit: int | None) -> list[dict]:
    path = Path(data)
    if path.suffix == ".jsonl" and path.exists():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for r in rows:
            if isinstance(r.get("image"), str):
                from PIL import Image

                r["image"] = Image.open(path.parent / r["image"]).convert("RGB")
    else:
        import datasets

        rows = list(datasets.load_dataset(data, split=split))
    if limit:
        rows = rows[:limit]
    for r in rows:
        if "question" not in r or "answer" not in r or "image" not in r:
            raise ValueError("each example needs 'image', 'question' and 'answer' fields")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lmms-eval-style accuracy of visual-token pruning (real weights)")
    ap.add_argument("--model", help="HF id or local path of a LLaVA / LLaVA-NeXT / Qwen2(.5)-VL checkpoint")
    ap.add_argument("--data", help="JSONL file or HF dataset id (fields image, question, answer)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--task", default="vqa", choices=("pope", "vqa"))
    ap.add_argument("--methods", default="fastv,visionzip,tome,prumerge,globalcom2,correlation")
    ap.add_argument("--keep", default="192,128,64")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/vision_eval.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny random model + random images: checks the loop only")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    keeps = [int(k) for k in args.keep.split(",")]

    if args.smoke:
        import torch

        from ctxzip.testing import tiny_llava
        from ctxzip.vision.testing import make_vlm_inputs

        model = tiny_llava()
        examples = [{"image": None, "question": "q", "answer": "yes" if i % 2 else "no", "seed": i} for i in range(4)]

        def build_inputs(ex: dict) -> dict:
            return make_vlm_inputs(model, [1], seed=ex["seed"])

        def decode(ids: torch.Tensor) -> str:
            return "yes" if int(ids[0]) % 2 else "no"

        keeps = [k for k in keeps if k < 16] or [4, 8]
        results = run_eval(model, examples, build_inputs, decode, task="pope", methods=methods, keeps=keeps,
                           max_new_tokens=2, method_params={"fastv": {"k": 1}})
        out = Path(args.out).with_name("vision_eval_smoke.json")
        model_name = "tiny random LLaVA (smoke: mechanism only, no quality meaning)"
    else:
        if not args.model or not args.data:
            ap.error("--model and --data are required (or use --smoke)")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ctxzip.models import resolve_device

        device = resolve_device(args.device)
        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(
            args.model, dtype=torch.float16 if device.type == "cuda" else torch.float32, attn_implementation="sdpa"
        ).to(device).eval()
        examples = load_examples(args.data, args.split, args.limit)

        def build_inputs(ex: dict) -> dict:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex["question"]}]}]
            prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
            enc = processor(images=[ex["image"]], text=[prompt], return_tensors="pt")
            return {k: v.to(device) for k, v in enc.items()}

        def decode(ids: Any) -> str:
            return processor.decode(ids, skip_special_tokens=True)

        results = run_eval(model, examples, build_inputs, decode, task=args.task, methods=methods, keeps=keeps,
                           max_new_tokens=args.max_new_tokens)
        out = Path(args.out)
        model_name = args.model
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model_name, "task": "pope" if args.smoke else args.task, "results": results},
                              indent=2))
    for r in results:
        print(f"{r['method']:12s} keep={r['keep']!s:5s} {r['scores']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
