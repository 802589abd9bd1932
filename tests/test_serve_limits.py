"""The server's guard rails, without a model: auth, sizes, rates, admission, timeouts, errors.

A program that only sleeps (tests.serve_fixtures.Sleeper) stands in for a compiled one, so
every limit is exercised in milliseconds against a real uvicorn on loopback.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import httpx
import pytest

from plait.errors import ContextLengthError, EngineOverloadedError, RequestCancelledError
from plait.serve.app import create_app
from plait.serve.bridge import ScopedRun
from plait.serve.commands import add_commands, build_runtime, config_from_args, parse_artifact
from plait.serve.config import ServeConfig, ServeConfigError, is_loopback
from plait.serve.errors import api_error_for
from plait.serve.limits import RateLimiter
from plait.serve.programs import ServedProgram
from plait.serve.runtime import ServeRuntime, program_name
from tests.serve_fixtures import ListStore, ServerThread, Sleeper

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def serve(**settings) -> ServerThread:
    store = ListStore()
    runtime = ServeRuntime(ServeConfig(**{"api_keys": (KEY,), **settings}), store=store)
    runtime.add_program(ServedProgram("sleep", Sleeper(), lm=None))
    server = ServerThread(create_app(runtime))
    server.runtime, server.store = runtime, store
    return server


@pytest.fixture(scope="module")
def server():
    with serve(max_body_bytes=4096, request_timeout=2.0, max_inflight=2) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def test_health_is_public_everything_else_needs_the_key(server):
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    for method, path in [
        ("GET", "/metrics"),
        ("GET", "/v1/programs"),
        ("POST", "/v1/programs/sleep"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/nowhere"),
    ]:
        missing = httpx.request(method, server.url + path, json={"seconds": 0})
        wrong = httpx.request(
            method, server.url + path, json={"seconds": 0}, headers={"Authorization": "Bearer nope"}
        )
        for response in (missing, wrong):
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"


def test_a_call_with_the_key_runs_the_program(client):
    response = client.post("/v1/programs/sleep", json={"seconds": 0.01})
    assert response.status_code == 200
    body = response.json()
    assert (
        body["outputs"] == {"slept": 0.01} and body["program"] == "sleep" and body["id"].startswith("prog-")
    )
    assert client.post("/v1/programs/sleep", json={"inputs": {"seconds": 0}}).status_code == 200


def test_malformed_json_is_400_and_bad_inputs_422(client):
    for raw in (b"{not json", b"", b"\xff\xfe"):
        response = client.post("/v1/programs/sleep", content=raw)
        assert response.status_code == 400 and response.json()["error"]["code"] == "malformed_json"
    cases = [
        ({}, "seconds: Field required"),
        ({"seconds": "soon"}, "seconds"),
        ({"seconds": 0, "extra": 1}, "extra: Extra inputs are not permitted"),
        ([1, 2], "JSON object"),
    ]
    for body, message in cases:
        response = client.post("/v1/programs/sleep", json=body)
        assert response.status_code == 422, body
        assert message in response.json()["error"]["message"]


def test_unknown_program_and_route_are_404_json(client):
    response = client.post("/v1/programs/nope", json={})
    assert response.status_code == 404 and "sleep" in response.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_oversized_bodies_are_413(client, server):
    big = b'{"seconds": 0, "pad": "' + b"x" * 10_000 + b'"}'
    response = client.post("/v1/programs/sleep", content=big)  # Content-Length says too big
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies while the body is read
        for _ in range(10):
            yield b"x" * 1000

    response = client.post("/v1/programs/sleep", content=chunks())
    assert response.status_code == 413
    assert client.post("/v1/programs/sleep", json={"seconds": 0}).status_code == 200  # still serving


def test_admission_gate_answers_503_at_once_when_full(client, server):
    results: list[int] = []

    def slow() -> None:
        results.append(client.post("/v1/programs/sleep", json={"seconds": 1.0}).status_code)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    started = time.monotonic()
    refused = client.post("/v1/programs/sleep", json={"seconds": 0})
    assert refused.status_code == 503 and time.monotonic() - started < 0.5
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "overloaded_error"
    for t in threads:
        t.join()
    assert results == [200, 200]
    assert client.post("/v1/programs/sleep", json={"seconds": 0}).status_code == 200  # slots came back
    assert server.runtime.traces.flush()
    assert "503" in [row["status"] for row in server.store.rows]  # refusals are traced too


def test_slow_calls_get_504_and_program_failures_500(client):
    started = time.monotonic()
    response = client.post("/v1/programs/sleep", json={"seconds": 2.5})
    assert response.status_code == 504 and time.monotonic() - started < 2.4
    assert response.json()["error"]["code"] == "request_timeout"
    failed = client.post("/v1/programs/sleep", json={"seconds": 0, "fail": True})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "program_error"
    assert "the program broke" in failed.json()["error"]["message"]
    wait_idle(client)  # the timed-out call runs to its end, then frees its slot


def wait_idle(client: httpx.Client, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while client.get("/healthz").json()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/healthz").json()["inflight"] == 0


def test_stream_slot_is_released_when_the_client_leaves(client):
    with client.stream("POST", "/v1/programs/sleep?stream=true", json={"seconds": 0.5}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
    wait_idle(client)


def test_rate_limit_is_429_with_retry_after():
    with serve(rate_limit=1.0, rate_burst=3) as srv, httpx.Client(base_url=srv.url, headers=AUTH) as c:
        codes = [c.get("/v1/programs").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        limited = c.get("/v1/programs")
        assert (
            int(limited.headers["retry-after"]) >= 1 and limited.json()["error"]["type"] == "rate_limit_error"
        )
        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # probes are never limited
        other = httpx.get(f"{srv.url}/v1/programs", headers={"Authorization": "Bearer other"})
        assert other.status_code == 401  # a wrong key is refused before it costs anyone's budget


def test_rate_limiter_refills():
    limiter = RateLimiter(rate=2.0, burst=1)
    assert limiter.retry_after("a", now=0.0) is None
    assert limiter.retry_after("a", now=0.1) == pytest.approx(0.4)
    assert limiter.retry_after("b", now=0.1) is None  # per client
    assert limiter.retry_after("a", now=0.6) is None


def test_metrics_count_every_answer_including_rejections(client):
    client.post("/v1/programs/sleep", json={"seconds": 0})
    httpx.get(f"{client.base_url}/metrics")  # 401, counted too
    text = client.get("/metrics").text
    assert 'plait_http_requests_total{method="POST",route="/v1/programs/{name}",status="200"}' in text
    assert 'status="401"' in text and "# TYPE plait_http_request_duration_seconds histogram" in text
    assert 'plait_program_calls_total{outcome="ok",program="sleep"}' in text
    assert "plait_inflight_calls 0" in text


def test_engine_errors_map_to_retryable_or_client_statuses():
    overloaded = api_error_for(EngineOverloadedError("full"))
    assert overloaded.status == 503 and overloaded.headers["Retry-After"] == "1"
    wrapped = RuntimeError("LM failed")
    wrapped.__cause__ = ContextLengthError("too long")  # DSPy wraps engine errors
    assert api_error_for(wrapped).status == 400
    assert api_error_for(ValueError("bug")).status == 500


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plait")
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_public_bind_needs_an_api_key(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    with pytest.raises(ServeConfigError, match="--api-key"):
        ServeConfig(host="0.0.0.0").check()
    ServeConfig(host="0.0.0.0", api_keys=("k",)).check()
    monkeypatch.delenv("PLAIT_API_KEY", raising=False)
    args = _serve_args("--model", "smollm2-135m", "--host", "0.0.0.0")
    with pytest.raises(ServeConfigError, match="refusing to serve on 0.0.0.0"):
        args.handler(args)  # before any weights are loaded
    monkeypatch.setenv("PLAIT_API_KEY", "from-env")
    assert config_from_args(args).api_keys == ("from-env",)
    with pytest.raises(ServeConfigError, match="nothing to serve"):
        args = _serve_args()
        args.handler(args)
    with pytest.raises(ServeConfigError, match="artifact not found"):
        args = _serve_args("missing.json")
        build_runtime(args, config_from_args(args))


def test_artifact_names_on_the_command_line():
    assert parse_artifact("qa=rag.json") == ("qa", Path("rag.json"))
    assert parse_artifact("runs/a=b.json") == (None, Path("runs/a=b.json"))
    assert program_name("out/Sentiment v2.json") == "Sentiment-v2"


def test_a_run_cancelled_before_it_starts_never_starts_and_releases_once():
    released: list[int] = []
    run = ScopedRun(release=lambda: released.append(1))
    run.cancel()
    with pytest.raises(RequestCancelledError):
        run(lambda: released.append(99))
    run.cancel()
    assert released == [1]
    finished = ScopedRun(release=lambda: released.append(2))
    assert finished(lambda x: x + 1, 1) == 2
    finished.cancel()  # over already: nothing more to release
    assert released == [1, 2]
