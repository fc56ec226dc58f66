"""Benchmark of ctxzip.kernels: memory of attention scoring without the N x N matrix, and speed.

On a machine without a GPU (this one) it says so and runs the torch paths only:

* **peak memory** (extra resident bytes over the inputs, measured in a fresh subprocess per
  point with ``ru_maxrss``) of getting per-key attention scores for every key of a prompt of
  4k / 8k / 16k tokens — the job H2O-, SnapKV- and FastV-style methods need — three ways:

  - ``eager``: what those methods do today (and what ``output_attentions=True`` forces):
    ``softmax(q kᵀ / √d + causal)`` as a full ``[B, Hq, T, T]`` tensor, ``@ v`` for the
    output, then column sums;
  - ``ctxzip``: :func:`ctxzip.kernels.attention_and_mass` — output, LSE and per-key mass in
    one pass blocked over queries (what ``record_attention`` runs inside a model);
  - ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` output only (no scores) —
    the floor that any attention needs.

  Geometry: one GQA group of SmolLM2-135M (3 query heads sharing 1 KV head, head dim 64),
  fp32, batch 1; memory scales linearly with the number of heads for every method. Eager
  points whose score tensor alone would exceed ``--eager-max-gb`` are not run (the
  shared machine has 23 GB for 8 jobs); the JSON gives their analytic lower bound.
* wall time of each point (ratios vs eager and vs SDPA in the same script).

On CUDA it additionally measures the Triton kernels against SDPA (FlashAttention backend):
prefill tokens/s for attention and attention+mass, and achieved memory bandwidth of decode over
a ragged fp16 cache and a 2/4-bit quantized cache against SDPA decode over the full fp16 cache.

    python benchmarks/attention_kernels.py            # 4k, 8k, 16k tokens
    python benchmarks/attention_kernels.py --quick    # 1k, 2k tokens

Writes ``benchmarks/results/attention_kernels.json`` (+ ``attention_kernels.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HQ, HKV, D = 3, 1, 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(method: str, T: int) -> dict:
    """Run one method at one length in this (fresh) process; report extra peak bytes and time."""
    import torch

    sys.path.insert(0, str(ROOT))
    import ctxzip.kernels as K

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HQ, T, D, generator=g)
    k = torch.randn(1, HKV, T, D, generator=g)
    v = torch.randn(1, HKV, T, D, generator=g)
    scale = 1 / math.sqrt(D)

    def eager():
        kk = k.repeat_interleave(HQ // HKV, dim=1)
        vv = v.repeat_interleave(HQ // HKV, dim=1)
        s = (q @ kk.transpose(-1, -2)) * scale
        causal = torch.ones(T, T, dtype=torch.bool).triu_(1)
        s = s.masked_fill(causal, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out = p @ vv
        mass = p.sum(dim=2).view(1, HKV, HQ // HKV, T).sum(2)
        return out, mass

    def ctxzip():
        out, _, mass = K.attention_and_mass(q, k, v, causal=True, backend="torch")
        return out, mass

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), None

    fn = {"eager": eager, "ctxzip": ctxzip, "sdpa": sdpa}[method]
    # warm up code paths at a tiny size so lazy initialisation does not count as peak memory
    small = (q[:, :, :64].clone(), k[:, :, :64].clone(), v[:, :, :64].clone())
    K.attention(*small, return_lse=True, backend="torch")
    K.attention_mass(small[0], small[1], backend="torch")
    torch.nn.functional.scaled_dot_product_attention(*small, is_causal=True, enable_gqa=True)
    base_rss = _rss_bytes()
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out, mass = fn()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {
        "method": method,
        "tokens": T,
        # high-water mark over the resident size before the call; if the mark was already
        # above that (slack > 0), peaks below the old mark would be under-reported
        "peak_extra_bytes": max(0, peak - base_rss),
        "baseline_slack_bytes": max(0, base_max - base_rss),
        "seconds": dt,
        "input_bytes": (q.numel() + k.numel() + v.numel()) * 4,
    }
    if mass is not None:
        res["mass_total"] = float(mass.sum())  # = Hq * T for full-query mass (sanity)
    return res


def _run_child(method: str, T: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--child", method, str(T)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"child {method} T={T} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    return info


def _cuda_bench(lengths: list[int], quick: bool) -> dict:  # pragma: no cover - needs a GPU
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    import ctxzip.kernels as K
    from ctxzip.kernels import quant

    dev = "cuda"
    Hq, Hkv, d = 32, 8, 128  # Llama-3-8B geometry
    dt = torch.float16

    def timeit(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        return statistics.median(ts)

    out = {"geometry": {"Hq": Hq, "Hkv": Hkv, "d": d, "dtype": "float16"}, "prefill": [], "decode": []}
    for T in lengths:
        q = torch.randn(1, Hq, T, d, device=dev, dtype=dt)
        k = torch.randn(1, Hkv, T, d, device=dev, dtype=dt)
        v = torch.randn(1, Hkv, T, d, device=dev, dtype=dt)
        t_sdpa = timeit(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        t_attn = timeit(lambda q=q, k=k, v=v: K.attention(q, k, v, backend="triton"))

        def both(q=q, k=k, v=v):
            o, lse = K.attention(q, k, v, return_lse=True, backend="triton")
            return K.attention_mass(q, k, lse=lse, backend="triton")

        t_both = timeit(both)
        out["prefill"].append({
            "tokens": T, "sdpa_s": t_sdpa, "ctxzip_attention_s": t_attn, "ctxzip_attention_plus_mass_s": t_both,
            "sdpa_tokens_per_s": T / t_sdpa, "ctxzip_tokens_per_s": T / t_attn,
            "attention_vs_sdpa_time_ratio": t_attn / t_sdpa, "with_mass_vs_sdpa_time_ratio": t_both / t_sdpa,
        })
    for T in lengths:
        B = 8
        q = torch.randn(B, Hq, d, device=dev, dtype=dt)
        k = torch.randn(B, Hkv, T, d, device=dev, dtype=dt)
        v = torch.randn(B, Hkv, T, d, device=dev, dtype=dt)
        full_bytes = 2 * k.numel() * 2
        t_sdpa = timeit(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
        lengths_t = torch.randint(T // 4, T + 1, (B, Hkv), device=dev)
        t_rag = timeit(lambda q=q, k=k, v=v, L=lengths_t: K.decode_ragged(q, k, v, L, backend="triton"))
        rag_bytes = int(lengths_t.sum()) * d * 2 * 2
        row = {
            "tokens": T, "batch": B,
            "sdpa_full_s": t_sdpa, "sdpa_bandwidth_GBps": full_bytes / t_sdpa / 1e9,
            "ragged_s": t_rag, "ragged_bandwidth_GBps": rag_bytes / t_rag / 1e9,
        }
        Tq = (T // 64) * 64
        for bits in (2, 4):
            kq = quant.quantize(k[:, :, :Tq], bits=bits, group_size=64, axis="channel")
            vq = quant.quantize(v[:, :, :Tq], bits=bits, group_size=64, axis="token")
            t_q = timeit(lambda q=q, kq=kq, vq=vq: K.decode_quantized(q, kq, vq, backend="triton"))
            nb = kq.nbytes() + vq.nbytes()
            row[f"int{bits}_s"] = t_q
            row[f"int{bits}_bandwidth_GBps"] = nb / t_q / 1e9
            row[f"int{bits}_vs_sdpa_time_ratio"] = t_q / t_sdpa
            row[f"int{bits}_cache_bytes_ratio"] = nb / full_bytes
        out["decode"].append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (1k, 2k tokens)")
    ap.add_argument("--eager-max-gb", type=float, default=1.0,
                    help="skip eager points whose score tensor alone exceeds this many GB")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "attention_kernels.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]))))
        return

    import torch

    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        print("no GPU found: running the torch paths on CPU only (Triton speed needs CUDA)")
    lengths = [1024, 2048] if args.quick else [4096, 8192, 16384]
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    points = [(T, m) for T in lengths for m in ("sdpa", "ctxzip", "eager")]
    for T, m in tqdm(points, desc="memory points"):
        score_bytes = HQ * T * T * 4
        if m == "eager" and score_bytes > args.eager_max_gb * 2**30:
            rows.append({"method": m, "tokens": T, "skipped": True,
                         "analytic_min_bytes": score_bytes,
                         "why": f"score tensor alone is {score_bytes / 2**30:.1f} GiB > --eager-max-gb"})
            continue
        r = _run_child(m, T)
        r["skipped"] = False
        r["analytic_score_tensor_bytes"] = score_bytes
        rows.append(r)
        print(f"  T={T:>6} {m:>7}: peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB, {r['seconds']:.2f} s")

    summary = []
    for T in lengths:
        by = {r["method"]: r for r in rows if r["tokens"] == T}
        c, e, s = by["ctxzip"], by["eager"], by["sdpa"]
        e_bytes = e["analytic_min_bytes"] if e["skipped"] else e["peak_extra_bytes"]
        summary.append({
            "tokens": T,
            "ctxzip_peak_MiB": c["peak_extra_bytes"] / 2**20,
            "eager_peak_MiB": e_bytes / 2**20,
            "eager_measured": not e["skipped"],
            "sdpa_peak_MiB": s["peak_extra_bytes"] / 2**20,
            "eager_over_ctxzip_memory": e_bytes / max(c["peak_extra_bytes"], 1),
            "ctxzip_over_eager_time": None if e["skipped"] else c["seconds"] / e["seconds"],
            "ctxzip_over_sdpa_time": c["seconds"] / s["seconds"],
        })
    result = {
        "benchmark": "kernels",
        "machine": _machine(),
        "gpu": has_gpu,
        "note": ("no GPU: torch paths only" if not has_gpu else "CUDA: Triton kernels vs SDPA"),
        "geometry": {"batch": 1, "Hq": HQ, "Hkv": HKV, "d": D, "dtype": "float32",
                     "what": "one GQA group of SmolLM2-135M; memory scales linearly with heads"},
        "memory": rows,
        "summary": summary,
    }
    if has_gpu:  # pragma: no cover
        result["cuda"] = _cuda_bench([1024, 4096] if args.quick else [1024, 4096, 16384], args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m, style in (("ctxzip", "o-"), ("eager", "s--"), ("sdpa", "^:")):
            xs, ys = [], []
            for r in rows:
                if r["method"] == m:
                    xs.append(r["tokens"])
                    ys.append((r["analytic_min_bytes"] if r["skipped"] else r["peak_extra_bytes"]) / 2**20)
            ax.plot(xs, ys, style, label=m + (" (scores; hollow = analytic)" if m == "eager" else
                                             " (scores)" if m == "ctxzip" else " (no scores)"))
        for r in rows:
            if r["method"] == "eager" and r["skipped"]:
                ax.plot([r["tokens"]], [r["analytic_min_bytes"] / 2**20], "s", mfc="white", mec="C1")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("peak extra memory (MiB)")
        ax.set_title("Per-key attention scores: memory (CPU, 1 GQA group)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":
    main()
