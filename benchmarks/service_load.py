"""Load test of one ``ctxzip serve`` process over real HTTP on 127.0.0.1.

Starts the server as a subprocess (extractive method preloaded, packaged MiniLM, one torch
thread), sends ``--requests`` POST /v1/compress requests with ``--concurrency`` in flight (each:
five 100-word pydoc passages and a query, rate 0.2), and reports failures, throughput, p50/p99
latency and the server's resident memory (idle after start-up, peak during the load, kernel
high-water mark). Anchor, side by side: the same requests through
``ExtractiveCompressor.compress`` called directly in this process, one at a time - the ratio
shows what HTTP + JSON + queueing cost. With ``--allocator-ab`` (default on) a second server
runs the same load with glibc's default malloc arenas (``--malloc-arena-max 0``), the setting
behind the first session's 1.46 GB peak.

    python benchmarks/service_load.py            # 200 requests, 8 concurrent (~4 min idle)
    python benchmarks/service_load.py --quick    # 40 requests, 4 concurrent
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(n: int) -> list[dict]:
    from pydoc_data.topics import topics

    from ctxzip.rag.index import chunk_words

    passages = [p for k in sorted(topics) for p in chunk_words(topics[k], 100)]
    rng = np.random.default_rng(0)
    reqs = []
    for _ in range(n):
        idx = rng.choice(len(passages), 5, replace=False)
        docs = [passages[i] for i in idx]
        words = docs[0].split()
        q = " ".join(words[: min(12, len(words))])
        reqs.append({"documents": docs, "query": q, "method": "extractive", "rate": 0.2})
    return reqs


def run_server(reqs: list[dict], concurrency: int, extra: list[str]) -> dict:
    """Start one ``ctxzip serve`` process, load it, stop it; latencies and memory."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CTXZIP_TOKEN", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ctxzip", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--preload", "extractive",
                             "--methods", "extractive,abstractive,truncate,random", *extra],
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                h = httpx.get(url + "/healthz", timeout=2)
                if h.status_code == 200 and "extractive" in h.json()["loaded"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        startup = time.perf_counter() - t0
        rss_idle = rss_mb(proc.pid)
        peak = [rss_idle]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak.append(rss_mb(proc.pid))
                except OSError:
                    break
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        with httpx.Client(timeout=600, limits=limits) as client:
            client.post(url + "/v1/compress", json=reqs[0])  # warm-up

            def one(body):
                t = time.perf_counter()
                try:
                    r = client.post(url + "/v1/compress", json=body)
                    ok = r.status_code == 200 and "text" in r.json()
                    code = r.status_code
                except httpx.HTTPError as e:
                    ok, code = False, repr(e)
                return ok, code, time.perf_counter() - t

            t1 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                res = list(pool.map(one, reqs))
            wall = time.perf_counter() - t1
            health = client.get(url + "/healthz").json()
        stop.set()
        sampler.join()
        hwm = rss_mb(proc.pid, "VmHWM")
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lat = np.array([t for _, _, t in res])
    fails = [c for ok, c, _ in res if not ok]
    return {
        "server_args": extra, "requests": len(reqs), "concurrency": concurrency,
        "failures": len(fails), "failure_codes": sorted({str(c) for c in fails}),
        "throughput_rps": len(reqs) / wall, "wall_seconds": wall,
        "latency_ms": {"p50": float(np.percentile(lat, 50) * 1e3),
                       "p90": float(np.percentile(lat, 90) * 1e3),
                       "p99": float(np.percentile(lat, 99) * 1e3),
                       "max": float(lat.max() * 1e3)},
        "server_rss_mb": {"idle_after_startup": rss_idle, "peak_sampled": float(max(peak)),
                          "after_load": rss_after, "high_water_mark": hwm},
        "models_loaded": health.get("loaded"),
        "startup_seconds": startup,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="40 requests, 4 concurrent")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--allocator-ab", action=argparse.BooleanOptionalAction, default=True,
                    help="also run a server with glibc's default malloc arenas")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrency = 40, 4
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "service_load_quick.json" if args.quick else "service_load.json")
    reqs = workload(args.requests)
    main_run = run_server(reqs, args.concurrency, [])
    ab = run_server(reqs, args.concurrency, ["--malloc-arena-max", "0"]) \
        if args.allocator_ab else None

    # anchor: the library called directly, sequentially, same requests
    import torch

    torch.set_num_threads(1)
    from ctxzip.prompt import ExtractiveCompressor

    comp = ExtractiveCompressor()
    comp.compress(reqs[0]["documents"], query=reqs[0]["query"], budget=0.2)
    direct = []
    t2 = time.perf_counter()
    for body in reqs:
        t = time.perf_counter()
        comp.compress(body["documents"], query=body["query"], budget=body["rate"])
        direct.append(time.perf_counter() - t)
    direct_wall = time.perf_counter() - t2
    direct = np.array(direct)

    out = {
        **main_run,
        "anchor_direct_library_sequential": {
            "throughput_rps": args.requests / direct_wall,
            "latency_ms_p50": float(np.percentile(direct, 50) * 1e3),
            "latency_ms_p99": float(np.percentile(direct, 99) * 1e3)},
        "ratio_service_throughput_vs_direct": main_run["throughput_rps"] /
        (args.requests / direct_wall),
        "allocator_ab_default_glibc_arenas": ab,
        "workload": "5 x 100-word pydoc passages per request, extractive, rate 0.2",
        "command": "python benchmarks/service_load.py" + (" --quick" if args.quick else ""),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg(), "server_threads": 1},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
