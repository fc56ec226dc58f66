"""The HTTP service over real HTTP on 127.0.0.1: compress, 422s, size limit, auth, shared
models, and a bounded load test (200 requests, 8 concurrent)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _rag_helpers import DOCS, minilm_tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from ctxzip.prompt import ExtractiveCompressor  # noqa: E402
from ctxzip.prompt.baselines import TruncationCompressor  # noqa: E402
from ctxzip.rag.service import ServiceConfig, create_app  # noqa: E402

TOKEN = "s3cret-token"


class ExclusiveEncoder:
    """Wraps the real MiniLM and records overlapping calls (there must be none: the service
    serialises model use per method) and how many calls it served."""

    def __init__(self, inner):
        self.inner = inner
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self._lock = threading.Lock()

    @property
    def device(self):
        return self.inner.device

    def encode(self, *a, **k):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(0.001)  # widen the race window
            return self.inner.encode(*a, **k)
        finally:
            with self._lock:
                self.active -= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, cfg: ServiceConfig):
        self.app = create_app(cfg)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def encoder():
    from ctxzip.models import load_encoder

    return ExclusiveEncoder(load_encoder())


@pytest.fixture(scope="module")
def server(encoder):
    tok = minilm_tokenizer()
    cfg = ServiceConfig(
        max_body_bytes=20_000, max_documents=10, methods=("extractive", "truncate"),
        preload=("extractive",), trim_every=16,
        compressors={"extractive": ExtractiveCompressor(encoder=encoder, tokenizer=tok),
                     "truncate": TruncationCompressor("tail", tokenizer=tok)},
    )
    with _Server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def auth_server(encoder):
    tok = minilm_tokenizer()
    cfg = ServiceConfig(token=TOKEN, methods=("extractive",),
                        compressors={"extractive": ExtractiveCompressor(encoder=encoder,
                                                                        tokenizer=tok)})
    with _Server(cfg) as s:
        yield s


def test_healthz_and_compress_documents(server):
    h = httpx.get(server.url + "/healthz").json()
    assert h["status"] == "ok" and "extractive" in h["loaded"]  # preloaded at start-up
    body = {"documents": DOCS, "query": "How does a while loop end?", "method": "extractive",
            "rate": 0.3}
    r = httpx.post(server.url + "/v1/compress", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["text"] and "loop" in d["text"]
    assert 0 < d["rate"] <= 0.3 + 1e-9 and d["original_tokens"] > d["compressed_tokens"] > 0
    assert len(d["documents"]) == 3 and d["documents"][1]["kept_sentences"]


def test_compress_text_and_other_forms(server):
    r = httpx.post(server.url + "/v1/compress",
                   json={"text": " ".join(DOCS), "query": "tuples", "tokens": 12,
                         "unit": "tokens"})
    assert r.status_code == 200 and r.json()["compressed_tokens"] <= 12
    r = httpx.post(server.url + "/v1/compress",
                   json={"documents": [{"text": DOCS[0], "metadata": {"url": "u0"}}],
                         "query": "assert", "budget": "2", "unit": "sentences", "details": True})
    d = r.json()
    assert r.status_code == 200 and d["details"]["kept_sentences"] == 2
    assert d["details"]["documents"][0]["metadata"] == {"url": "u0"}
    r = httpx.post(server.url + "/v1/compress", json={"text": DOCS[1], "method": "truncate",
                                                      "rate": 0.5})
    assert r.status_code == 200 and DOCS[1].endswith(r.json()["text"].strip()[-10:])


@pytest.mark.parametrize("body, fragment", [
    ({"query": "q"}, "exactly one of 'text' or 'documents'"),
    ({"text": "a", "documents": ["b"], "query": "q"}, "exactly one"),
    ({"documents": [], "query": "q"}, "empty"),
    ({"documents": ["a"], "query": "q", "rate": 1.5}, "rate"),
    ({"documents": ["a"], "query": "q", "rate": 0.2, "tokens": 5}, "at most one"),
    ({"documents": ["a"], "query": "q", "method": "nope"}, "method"),
    ({"documents": ["a"]}, "needs a non-empty 'query'"),
    ({"documents": [{"txt": "a"}], "query": "q"}, "documents"),
    ({"documents": ["a"], "query": "q", "bogus": 1}, "bogus"),
    ({"documents": ["a"], "query": "q", "budget": "ten"}, "budget"),
    ({"documents": ["a"], "query": "q", "method": "abstractive"}, "not enabled"),
    ({"documents": ["a"] * 11, "query": "q"}, "too many documents"),
])
def test_422_with_clear_message(server, body, fragment):
    r = httpx.post(server.url + "/v1/compress", json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"] + str(r.json().get("detail", ""))


def test_422_on_non_json_and_wrong_types(server):
    r = httpx.post(server.url + "/v1/compress", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]
    r = httpx.post(server.url + "/v1/compress", content=b"\xff\xfe\x00",
                   headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = httpx.post(server.url + "/v1/compress", json=["a list"])
    assert r.status_code == 422
    r = httpx.post(server.url + "/v1/compress", json={"documents": "not a list", "query": "q"})
    assert r.status_code == 422


def test_request_size_limit(server):
    big = {"documents": ["word " * 5000], "query": "q"}
    r = httpx.post(server.url + "/v1/compress", json=big)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(50):
            yield b" " * 1000

    r = httpx.post(server.url + "/v1/compress", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url + "/healthz").status_code == 200  # server still fine


def test_bearer_auth(auth_server):
    body = {"documents": DOCS, "query": "assert", "rate": 0.3}
    assert httpx.post(auth_server.url + "/v1/compress", json=body).status_code == 401
    r = httpx.post(auth_server.url + "/v1/compress", json=body,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(auth_server.url + "/v1/compress", json=body,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["text"]
    assert httpx.get(auth_server.url + "/healthz").json()["auth"] is True


def test_load_200_requests_8_concurrent(server, encoder):
    from ctxzip.rag.service import create_app  # noqa: F401 - the server object stays the same

    reg = server.app.state.registry
    before = reg.get("extractive")
    queries = ["assert condition", "while loop break", "tuples immutable", "lists mutable"]
    calls0 = encoder.calls

    def one(i):
        body = {"documents": DOCS, "query": queries[i % 4], "rate": 0.3}
        t = time.perf_counter()
        r = client.post(server.url + "/v1/compress", json=body)
        return r.status_code, time.perf_counter() - t, r.json().get("text", "")

    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(one, range(200)))
        wall = time.perf_counter() - t0
    codes = [c for c, _, _ in results]
    lat = np.array([t for _, t, _ in results])
    assert codes.count(200) == 200, {c: codes.count(c) for c in set(codes)}
    # same query -> same answer under concurrency (no cross-talk between requests)
    for q in range(4):
        assert len({txt for i, (_, _, txt) in enumerate(results) if i % 4 == q}) == 1
    assert encoder.max_active == 1  # never two requests inside the model at once
    assert encoder.calls - calls0 == 200
    assert reg.get("extractive") is before  # built once, shared
    print(f"\nload test: 200 requests, 8 concurrent: p50 {np.percentile(lat, 50) * 1e3:.1f} ms, "
          f"p99 {np.percentile(lat, 99) * 1e3:.1f} ms, {200 / wall:.1f} req/s")


def test_healthz_reports_memory_and_loads_only_requested_methods(server):
    h = httpx.get(server.url + "/healthz").json()
    assert h["rss_mb"] is None or h["rss_mb"] > 50
    assert "abstractive" not in h["loaded"]  # never requested: its LM is never loaded
    assert "extractive" in h["loaded"]


@pytest.mark.parametrize("kw, fragment", [
    ({"threads": 0}, "threads"),
    ({"trim_every": -1}, "trim_every"),
    ({"preload": ("nope",)}, "unknown methods"),
])
def test_bad_service_config(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        create_app(ServiceConfig(**kw))
