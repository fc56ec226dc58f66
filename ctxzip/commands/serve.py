"""``ctxzip serve``: run the HTTP compression service (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the HTTP compression service (POST /v1/compress)",
                       description="Serve ctxzip compressors over HTTP. Auth: set $CTXZIP_TOKEN "
                       "(or --token-file) to require 'Authorization: Bearer <token>'.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token (else $CTXZIP_TOKEN; unset = no auth)")
    p.add_argument("--max-body", type=int, default=1_000_000,
                   help="largest request body in bytes (default 1000000; 413 above)")
    p.add_argument("--max-documents", type=int, default=100)
    p.add_argument("--encoder", default=None,
                   help="extractive encoder id/path or trained compressor directory")
    p.add_argument("--abstractive-model", default=None, help="abstractive model (default SmolLM2)")
    p.add_argument("--methods", default="extractive,abstractive,truncate,random",
                   help="comma-separated methods to offer")
    p.add_argument("--preload", default="extractive",
                   help="comma-separated methods whose models load at start-up (default "
                   "extractive; '' = load on first request)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the models (default: $OMP_NUM_THREADS, else torch's)")
    p.add_argument("--malloc-arena-max", type=int, default=2,
                   help="cap glibc malloc arenas so pool threads do not each keep freed "
                   "activations (default 2; 0 = leave the default)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ctxzip.rag.service import ServiceConfig, serve

    token = os.environ.get("CTXZIP_TOKEN") or None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip() or None
    threads = args.threads
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    preload = tuple(m for m in (x.strip() for x in args.preload.split(",")) if m in methods)
    cfg = ServiceConfig(token=token, max_body_bytes=args.max_body,
                        max_documents=args.max_documents, encoder=args.encoder,
                        abstractive_model=args.abstractive_model, methods=methods,
                        preload=preload, threads=threads,
                        malloc_arena_max=args.malloc_arena_max or None)
    serve(args.host, args.port, cfg, log_level=args.log_level)
    return 0
