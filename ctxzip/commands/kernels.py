"""``ctxzip kernels``: backend info, a correctness self-check, and per-token attention scores."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="attention kernels: info, self-check, per-token scores")
    sub = p.add_subparsers(dest="kernels_cmd", metavar="ACTION")

    info = sub.add_parser("info", help="which backend runs where (torch reference / Triton)")
    info.set_defaults(func=_info)

    chk = sub.add_parser("check", help="compare the dispatched kernels with a naive full-matrix computation")
    chk.add_argument("--tokens", type=int, default=257, help="sequence length (default 257)")
    chk.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    chk.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    chk.set_defaults(func=_check)

    sc = sub.add_parser(
        "scores",
        help="attention mass each token of a text receives (what H2O/SnapKV/FastV rank by), "
        "computed without eager attention",
    )
    src = sc.add_mutually_exclusive_group()
    src.add_argument("--file", help="UTF-8 text file (default: stdin)")
    src.add_argument("--text", help="the text itself")
    sc.add_argument("--model", default=None, help="HF model id or path (default: offline SmolLM2-135M)")
    sc.add_argument("--window", type=int, default=32, help="last W queries vote (default 32; 0 = all queries)")
    sc.add_argument("--max-tokens", type=int, default=2048, help="truncate the text to this many tokens")
    sc.add_argument("--top", type=int, default=20, help="show the top N tokens")
    sc.add_argument("--json", action="store_true", help="print JSON (all tokens) instead of a table")
    sc.set_defaults(func=_scores)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _info(args: argparse.Namespace) -> int:
    import torch

    import ctxzip.kernels as K

    print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"  {dev}: backend {K.backend_for(dev)} (triton usable: {K.triton_available(dev)})")
    print("override with CTXZIP_KERNELS=torch|triton; Triton on CPU needs TRITON_INTERPRET=1")
    print('transformers attention implementation registered as "ctxzip"')
    return 0


def _check(args: argparse.Namespace) -> int:
    import math

    import torch

    import ctxzip.kernels as K

    if args.tokens < 1 or args.tokens > 1 << 16:
        raise ValueError("--tokens must be in [1, 65536]")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = None if args.backend == "auto" else args.backend
    print(f"device {dev}, backend {K.backend_for(dev, backend)}")
    g = torch.Generator().manual_seed(0)
    T, Hq, Hkv, d = args.tokens, 6, 2, 64
    q, k, v = (torch.randn(1, h, T, d, generator=g).to(dev) for h in (Hq, Hkv, Hkv))
    out, lse = K.attention(q, k, v, return_lse=True, backend=backend)
    mass = K.attention_mass(q, k, lse=lse, gqa="per_head", backend=backend)
    kk, vv = k.repeat_interleave(3, 1).double(), v.repeat_interleave(3, 1).double()
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=dev).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    errs = {
        "out": float((out.double() - p @ vv).abs().max()),
        "lse": float((lse.double() - torch.logsumexp(s, -1)).abs().max()),
        "mass": float((mass.double() - p.sum(2)).abs().max()),
    }
    ok = errs["out"] < 1e-3 and errs["lse"] < 1e-3 and errs["mass"] < 1e-3 * T
    print(json.dumps({"max_abs_error": errs, "ok": ok}))
    return 0 if ok else 1


def _scores(args: argparse.Namespace) -> int:
    import torch

    import ctxzip.kernels as K
    from ctxzip.compressor import ensure_text
    from ctxzip.models import load_causal_lm

    if args.window < 0:
        raise ValueError("--window must be >= 0")
    if args.max_tokens < 1 or args.top < 1:
        raise ValueError("--max-tokens and --top must be positive")
    if args.text is not None:
        text = args.text
    elif args.file:
        with open(args.file, "rb") as f:
            text = ensure_text(f.read())
    else:
        text = ensure_text(sys.stdin.buffer.read())
    if not text.strip():
        raise ValueError("empty text")
    model, tok = load_causal_lm(args.model)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.max_tokens]
    ids = ids.to(model.device)
    with torch.no_grad(), K.record_attention(model, window=args.window or None, gqa="mean") as rec:
        model(ids)
    # mean over layers and KV heads, normalised by the number of voting queries
    total = torch.stack([rec.scores[i][0].mean(0) for i in sorted(rec.scores)]).mean(0)
    total = total / (min(args.window, ids.shape[1]) if args.window else ids.shape[1])
    pieces = [tok.decode([t]) for t in ids[0].tolist()]
    if args.json:
        print(json.dumps({"tokens": pieces, "scores": total.tolist(), "window": args.window}))
        return 0
    order = torch.argsort(total, descending=True)[: args.top].tolist()
    print(f"{ids.shape[1]} tokens, window {args.window or 'all'}; top {len(order)} by attention mass:")
    for i in order:
        print(f"{i:>6}  {float(total[i]):.4f}  {pieces[i]!r}")
    return 0
