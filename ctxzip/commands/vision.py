"""``ctxzip vision``: visual-token pruning for VLMs.

``ctxzip vision bench --method visionzip --keep 64`` measures one method at one budget against the
unpruned model (prefill FLOPs, wall time, LLM sequence length, wrapper overhead, output agreement)
on a random-weight model with LLaVA-1.5's token geometry (no VLM weights needed);
``ctxzip vision methods`` lists the methods and their hyperparameters.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

METHOD_NAMES = ("fastv", "visionzip", "tome", "prumerge", "globalcom2", "correlation")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("vision", help="prune/merge visual tokens of vision-language models")
    sub = p.add_subparsers(dest="vision_command", metavar="SUBCOMMAND")

    b = sub.add_parser("bench", help="prefill cost of one method/budget vs the unpruned model")
    b.add_argument("--method", default="visionzip", choices=METHOD_NAMES)
    b.add_argument("--keep", default="64", help="visual tokens kept per image: count ('64'), rate ('0.25', '25%%') or ratio ('4x')")
    b.add_argument("--size", default="cpu", choices=("cpu", "tiny"),
                   help="'cpu': LLaVA-1.5 token geometry (576 visual tokens) at CPU-sized widths; 'tiny': seconds-fast smoke run")
    b.add_argument("--reps", type=int, default=3, help="timed prefill runs per side (median reported)")
    b.add_argument("--batch", type=int, default=1, help="rows in the batch (one image each)")
    b.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method hyperparameter, e.g. --param k=3 for FastV (repeatable)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=_bench)

    m = sub.add_parser("methods", help="list the methods and their hyperparameters")
    m.set_defaults(func=_methods)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        val: Any = v
        for conv in (int, float):
            try:
                val = conv(v)
                break
            except ValueError:
                continue
        if v.lower() in ("true", "false"):
            val = v.lower() == "true"
        out[k.strip()] = val
    return out


def _bench(args: argparse.Namespace) -> int:
    import torch

    from ctxzip.budget import Budget
    from ctxzip.vision import prune, unprune
    from ctxzip.vision.profile import (
        agreement,
        count_prefill_flops,
        llava15_cpu,
        llava15_prompt,
        median,
        time_prefill,
    )

    if args.reps < 1:
        raise ValueError("--reps must be >= 1")
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    budget = Budget.parse(args.keep)
    params = _parse_params(args.param)
    if args.size == "tiny":
        model = llava15_cpu(vision_layers=4, vision_hidden=64, vision_heads=2, text_layers=4, text_hidden=64,
                            text_heads=2, vocab_size=32064)
    else:
        model = llava15_cpu(vision_layers=24, vision_hidden=128, vision_heads=4, text_layers=8, text_hidden=256,
                            text_heads=4)
    inputs = llava15_prompt(model, batch=args.batch)
    base = count_prefill_flops(model, inputs)
    with torch.no_grad():
        ref = model(**inputs, logits_to_keep=1).logits[:, -1]
    t_base = time_prefill(model, inputs, reps=args.reps)
    prune(model, args.method, budget, **params)
    cost = count_prefill_flops(model, inputs)
    stats = model.ctxzip_vision.last_stats
    model.ctxzip_vision.hook_seconds = 0.0
    t_pruned = time_prefill(model, inputs, reps=args.reps)
    hooks = model.ctxzip_vision.hook_seconds / (args.reps + 1)
    with torch.no_grad():
        out = model(**inputs, logits_to_keep=1).logits[:, -1]
    unprune(model)
    result = {
        "method": args.method,
        "budget": str(budget),
        "params": params,
        "model": "random-weight LLaVA-1.5 token geometry (no real weights: agreement is a mechanism check only)",
        "visual_tokens_per_image": [list(s) for s in stats],
        "llm_seq_len": {"unpruned": base.llm_tokens, "pruned": cost.llm_tokens},
        "llm_prefill_flops": {"unpruned": base.llm_flops, "pruned": cost.llm_flops, "ratio": cost.llm_flops / base.llm_flops},
        "total_prefill_flops": {"unpruned": base.total_flops, "pruned": cost.total_flops,
                                "ratio": cost.total_flops / base.total_flops},
        "prefill_seconds_median": {"unpruned": median(t_base), "pruned": median(t_pruned),
                                   "ratio": median(t_pruned) / median(t_base)},
        "wrapper_hook_seconds_per_prefill": hooks,
        "mechanism_check_vs_unpruned": agreement(ref, out),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"method {args.method} ({budget}) on {result['model']}")
    print(f"  visual tokens per image (before, after): {stats}")
    print(f"  LLM sequence: {base.llm_tokens} -> {cost.llm_tokens}" + ("  (FastV prunes after layer K)" if args.method == "fastv" else ""))
    for key in ("llm_prefill_flops", "total_prefill_flops"):
        r = result[key]
        print(f"  {key}: {r['unpruned'] / 1e9:.2f} G -> {r['pruned'] / 1e9:.2f} G  (x{r['ratio']:.3f})")
    r = result["prefill_seconds_median"]
    print(f"  prefill time (median of {args.reps}): {r['unpruned']:.3f} s -> {r['pruned']:.3f} s  (x{r['ratio']:.3f})")
    print(f"  wrapper hooks: {hooks * 1e3:.1f} ms per prefill")
    a = result["mechanism_check_vs_unpruned"]
    print(f"  mechanism check vs unpruned: top-1 agree {a['top1_agree']:.2f}, cosine {a['cosine']:.3f}, KL {a['kl']:.4f}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    import dataclasses

    from ctxzip.vision import METHODS

    for name in METHOD_NAMES:
        cls = METHODS[name]
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}\n{'':12s} {fields}")
    return 0
