"""HTTP compression service (FastAPI): ``POST /v1/compress``, ``GET /healthz``.

``ctxzip serve --host 127.0.0.1 --port 8000`` runs it with uvicorn. Design points:

* **models loaded once** per process and shared by all requests: each method's compressor is
  built on first use (or at start-up with ``preload``) under a lock, and every call into a model
  runs under that method's lock - HF fast tokenizers are not safe to call from several threads
  at once ("Already borrowed"), and on CPU parallel forwards only fight over the same cores.
  Requests for different methods still run concurrently;
* endpoints are plain ``def`` functions, so FastAPI runs them in its thread pool and the event
  loop keeps accepting connections while a model works;
* request bodies above ``max_body_bytes`` get **413** before they are parsed (checked on
  ``Content-Length`` and again while reading, so a chunked client cannot get around it);
* malformed bodies get **422** with a one-line ``error`` message plus pydantic's ``detail``;
* optional **bearer-token auth** (``token=`` or ``$CTXZIP_TOKEN``) guards ``/v1/compress``;
  ``/healthz`` stays open for load balancers. Tokens are compared in constant time.

Memory (measured for one process serving ``extractive``, see ``docs/rag.md``): ~220 MB is
``import torch``, ~290 MB the transformers + sentence-transformers imports, 90 MB MiniLM, ~45 MB
the target LM's tokenizer (token budgets) - only the methods actually requested are loaded, and
every request shares the one loaded copy (one process; run more processes only for more cores,
each pays the above). What used to grow under load was the allocator, not the models: each
thread of the server's pool got its own glibc malloc arena and kept the activations of the
requests it served. The service therefore caps malloc arenas (``malloc_arena_max``), encodes in
small batches, sets torch's thread count (``threads``) and returns freed memory to the OS every
``trim_every`` model requests (default: after each one; a trim costs far less than a request).
"""

import contextlib
import hmac
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ServiceConfig", "create_app", "CompressRequest", "METHODS", "rss_mb"]

METHODS = ("extractive", "abstractive", "truncate", "random")


@dataclass
class ServiceConfig:
    """Settings of the HTTP service.

    Args:
        token: bearer token required on ``/v1/compress`` (``None`` = no auth; the CLI reads
            ``$CTXZIP_TOKEN``).
        max_body_bytes: largest accepted request body (413 above).
        max_documents: most documents per request.
        encoder: extractive encoder id/path or trained compressor directory.
        abstractive_model: abstractive model id/path (default SmolLM2).
        counting_tokenizer: tokenizer for budgets/stats (default: the target LM's).
        methods: methods this server offers.
        preload: build these methods' compressors at start-up instead of on first request.
        compressors: ready-made compressor objects by method name (tests, embedding apps).
        threads: torch intra-op threads for the models (``None`` = leave torch's default).
        malloc_arena_max: cap on glibc malloc arenas (``None`` = leave the default of 8 per
            core); with the default many pool threads each keep their own freed activations.
        trim_every: call glibc ``malloc_trim`` after this many model requests (0 = never).
    """

    token: str | None = None
    max_body_bytes: int = 1_000_000
    max_documents: int = 100
    encoder: str | None = None
    abstractive_model: str | None = None
    counting_tokenizer: Any = None
    methods: tuple[str, ...] = METHODS
    preload: tuple[str, ...] = ()
    compressors: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    malloc_arena_max: int | None = 2
    trim_every: int = 1


def _glibc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _tune_process(cfg: "ServiceConfig") -> None:
    """Process-wide settings that keep one server's memory flat (glibc only; no-op elsewhere)."""
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(int(cfg.threads))
    if cfg.malloc_arena_max:
        libc = _glibc()
        if libc is not None:
            libc.mallopt(-8, int(cfg.malloc_arena_max))  # M_ARENA_MAX


def _trim() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_mb() -> float | None:
    """Resident memory of this process in MB (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _models() -> Any:
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Doc(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str
        metadata: dict[str, Any] = Field(default_factory=dict)

    class CompressRequest(BaseModel):
        """Body of ``POST /v1/compress``: exactly one of ``text``/``documents``; at most one of
        ``rate``/``tokens``/``budget`` (default ``rate=0.2``)."""

        model_config = ConfigDict(extra="forbid")
        text: str | None = None
        documents: list[str | Doc] | None = None
        query: str | None = None
        method: Literal["extractive", "abstractive", "truncate", "random"] = "extractive"
        rate: float | None = Field(default=None, gt=0.0, le=1.0)
        tokens: int | None = Field(default=None, ge=0)
        budget: str | None = None
        unit: Literal["tokens", "sentences"] = "tokens"
        details: bool = False

        @model_validator(mode="after")
        def _check(self) -> "CompressRequest":
            if (self.text is None) == (self.documents is None):
                raise ValueError("give exactly one of 'text' or 'documents'")
            if self.documents is not None and not self.documents:
                raise ValueError("'documents' is empty")
            if sum(x is not None for x in (self.rate, self.tokens, self.budget)) > 1:
                raise ValueError("give at most one of 'rate', 'tokens' or 'budget'")
            if self.method in ("extractive", "abstractive") and not (self.query or "").strip():
                raise ValueError(f"method {self.method!r} needs a non-empty 'query'")
            return self

    return CompressRequest


CompressRequest: Any = None  # the pydantic model, built lazily (pydantic is an optional extra)


class _Registry:
    """One compressor per method, built once and used under a per-method lock."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self._objs: dict[tuple[str, str], Any] = {}
        self._locks: dict[str, threading.Lock] = {m: threading.Lock() for m in METHODS}
        self._build_lock = threading.Lock()
        self.loaded_at: dict[str, float] = {}

    def lock(self, method: str) -> threading.Lock:
        return self._locks[method]

    def get(self, method: str, unit: str = "tokens") -> Any:
        key = (method, unit if method == "extractive" else "")
        obj = self._objs.get(key)
        if obj is not None:
            return obj
        with self._build_lock:
            if key not in self._objs:
                self._objs[key] = self._build(method, unit)
                self.loaded_at.setdefault(method, time.time())
            return self._objs[key]

    def _build(self, method: str, unit: str) -> Any:
        cfg = self.cfg
        if method in cfg.compressors:
            c = cfg.compressors[method]
            if method == "extractive" and getattr(c, "unit", unit) != unit:
                import dataclasses

                c = dataclasses.replace(c, unit=unit)
                c._model = cfg.compressors[method]._model
            return c
        tok = cfg.counting_tokenizer
        if method == "extractive":
            from pathlib import Path

            from ctxzip.prompt.extractive import CONFIG_NAME, ExtractiveCompressor

            if cfg.encoder and (Path(cfg.encoder) / CONFIG_NAME).is_file():
                return ExtractiveCompressor.from_pretrained(cfg.encoder, unit=unit, tokenizer=tok)
            return ExtractiveCompressor(encoder=cfg.encoder, unit=unit, tokenizer=tok)
        if method == "abstractive":
            from ctxzip.prompt.abstractive import AbstractiveCompressor

            return AbstractiveCompressor(model=cfg.abstractive_model, tokenizer=tok)
        if method == "truncate":
            from ctxzip.prompt.baselines import TruncationCompressor

            return TruncationCompressor("tail", tokenizer=tok)
        if method == "random":
            from ctxzip.prompt.baselines import RandomDropCompressor

            return RandomDropCompressor(0, tokenizer=tok)
        raise ValueError(f"unknown method {method!r}")


def create_app(config: ServiceConfig | None = None) -> Any:
    """Build the FastAPI app (models are loaded once, on first use or at start-up)."""
    global CompressRequest
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from ctxzip import __version__
    from ctxzip.compressor import Budget, check_budget
    from ctxzip.rag.pipeline import compress_documents

    cfg = config or ServiceConfig()
    bad = [m for m in (*cfg.methods, *cfg.preload) if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {METHODS}")
    if cfg.max_body_bytes < 1:
        raise ValueError("max_body_bytes must be >= 1")
    if cfg.threads is not None and int(cfg.threads) < 1:
        raise ValueError("threads must be >= 1 or None")
    if int(cfg.trim_every) < 0:
        raise ValueError("trim_every must be >= 0")
    _tune_process(cfg)
    if CompressRequest is None:
        CompressRequest = _models()
    Req = CompressRequest
    reg = _Registry(cfg)
    stats = {"requests": 0, "errors": 0, "started": time.time()}
    stats_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        for m in cfg.preload:  # load models before the first request
            c = reg.get(m)
            with reg.lock(m):
                _warm(c, m)
        yield

    app = FastAPI(title="ctxzip", version=__version__, lifespan=lifespan,
                  description="Compress prompts and retrieved documents (RECOMP and baselines).")
    app.state.registry = reg
    app.state.config = cfg

    # --- request-size limit: a pure ASGI middleware (counts streamed bytes too) -------------
    limit = int(cfg.max_body_bytes)

    class _SizeLimit:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            for k, v in scope.get("headers", []):
                if k == b"content-length":
                    try:
                        if int(v) > limit:
                            return await _too_large(send)
                    except ValueError:
                        return await _send_json(send, 400, {"error": "bad Content-Length"})
            # read the whole body first (it is small by construction), so an over-long
            # streamed body is refused before the app sees a byte of it
            chunks: list[bytes] = []
            seen = 0
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # client went away
                body = msg.get("body", b"")
                seen += len(body)
                if seen > limit:
                    return await _too_large(send)
                chunks.append(body)
                if not msg.get("more_body", False):
                    break
            data = b"".join(chunks)
            sent = False

            async def replay() -> Any:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": data, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)

    async def _send_json(send: Any, status: int, body: dict) -> None:
        import json

        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _too_large(send: Any) -> None:
        await _send_json(send, 413, {"error": f"request body exceeds {limit} bytes"})

    app.add_middleware(_SizeLimit)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        with stats_lock:
            stats["errors"] += 1
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")}
                  for e in errs]
        return JSONResponse(status_code=422, content={
            "error": f"{loc}: {msg}" if loc else msg, "detail": detail})

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 to a body it cannot decode (e.g. not UTF-8); that is a malformed
        # body like any other, so it gets the same 422 as a schema error.
        status = 422 if exc.status_code == 400 else exc.status_code
        with stats_lock:
            stats["errors"] += 1
        return JSONResponse(status_code=status, content={"error": str(exc.detail)},
                            headers=getattr(exc, "headers", None))

    def _auth(request: Request) -> JSONResponse | None:
        if not cfg.token:
            return None
        h = request.headers.get("authorization", "")
        scheme, _, tok = h.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(tok.strip().encode(),
                                                                 cfg.token.encode()):
            return JSONResponse(status_code=401, content={"error": "missing or wrong bearer token"},
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "methods": list(cfg.methods),
                "loaded": sorted(reg.loaded_at), "requests": stats["requests"],
                "rss_mb": rss_mb(),
                "uptime_s": time.time() - stats["started"], "auth": bool(cfg.token)}

    @app.post("/v1/compress")
    def compress(req: Req, request: Request) -> Any:
        denied = _auth(request)
        if denied is not None:
            return denied
        if req.method not in cfg.methods:
            return _err(422, f"method {req.method!r} is not enabled on this server "
                        f"(enabled: {', '.join(cfg.methods)})")
        if req.documents is not None and len(req.documents) > cfg.max_documents:
            return _err(422, f"too many documents ({len(req.documents)} > {cfg.max_documents})")
        try:
            if req.budget is not None:
                budget = check_budget(req.budget)
            elif req.tokens is not None:
                budget = Budget(tokens=req.tokens)
            else:
                budget = Budget(rate=req.rate if req.rate is not None else 0.2)
        except ValueError as e:
            return _err(422, f"budget: {e}")
        if req.documents is not None:
            docs = [d if isinstance(d, str) else {"text": d.text, "metadata": d.metadata}
                    for d in req.documents]
        else:
            docs = [req.text]
        t0 = time.perf_counter()
        comp = reg.get(req.method, req.unit)
        try:
            with reg.lock(req.method):
                t_lock = time.perf_counter() - t0
                if req.method in ("extractive", "abstractive"):
                    res = compress_documents(comp, docs, query=req.query, budget=budget)
                else:
                    text = docs[0] if req.text is not None else "\n\n".join(
                        d if isinstance(d, str) else d["text"] for d in docs)
                    res = comp.compress(text, query=req.query, budget=budget)
        except (ValueError, TypeError) as e:
            return _err(422, str(e))
        with stats_lock:
            stats["requests"] += 1
            trim = bool(cfg.trim_every) and stats["requests"] % int(cfg.trim_every) == 0
        if trim and req.method in ("extractive", "abstractive"):
            with reg.lock(req.method):
                _trim()
        out = res.to_dict(with_details=req.details)
        out.pop("kept", None)
        if req.details and req.method == "extractive":
            out["details"].pop("sentences", None)
        if not req.details and "documents" in res.details:
            out["documents"] = [{"index": d["index"], "metadata": d.get("metadata", {}),
                                 **({"kept_sentences": d["kept_sentences"],
                                     "kept_tokens": d["kept_tokens"]}
                                    if "kept_tokens" in d else {})}
                                for d in res.details["documents"]]
        out["selective_empty"] = bool(res.details.get("selective_empty", False))
        out["timings"] = {**out.get("timings", {}), "queue": t_lock,
                          "request": time.perf_counter() - t0}
        return out

    def _err(status: int, msg: str) -> JSONResponse:
        with stats_lock:
            stats["errors"] += 1
        return JSONResponse(status_code=status, content={"error": msg})

    return app


def _warm(comp: Any, method: str) -> None:
    """Load a compressor's models by running it once on a tiny input."""
    doc = "Warm-up sentence one. Warm-up sentence two."
    if method in ("extractive", "abstractive"):
        comp.compress([doc], query="warm-up", budget=5)
    else:
        comp.compress(doc, budget=0.5)


def serve(host: str = "127.0.0.1", port: int = 8000, config: ServiceConfig | None = None, *,
          log_level: str = "warning") -> None:
    """Run the service with uvicorn (blocking)."""
    import uvicorn

    cfg = config or ServiceConfig(token=os.environ.get("CTXZIP_TOKEN") or None)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level, workers=1)
