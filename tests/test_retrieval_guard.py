"""`plait index serve`'s guard rails against a real index server on loopback: bearer-token auth,
the body-size and query-length limits, error bodies that never echo what was sent, and the
refusal to bind a public address without a key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from plait.cli import build_parser, main
from plait.retrievers import ColBERTServe, SettingsError, build_index
from plait.retrievers.commands import settings_from_args
from plait.retrievers.limits import API_KEY_ENV, ServerSettings, is_loopback
from plait.retrievers.server import create_app
from tests.retrieval_fixtures import TINY_CORPUS, ServerThread, free_port, write_jsonl

torch.set_num_threads(min(2, torch.get_num_threads()))

KEY = "index-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def rm(tmp_path_factory) -> ColBERTServe:
    root = tmp_path_factory.mktemp("guard")
    r = ColBERTServe.open(build_index(write_jsonl(root / "tiny.jsonl", TINY_CORPUS), root / "idx"))
    yield r
    r.close()


@pytest.fixture(scope="module")
def open_server(rm):
    """Default settings: loopback, no key, the default limits."""
    with ServerThread(create_app(rm)) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(rm):
    settings = ServerSettings(api_keys=(KEY, "second-key"), max_body_bytes=2048, max_query_chars=100)
    with ServerThread(create_app(rm, settings)) as srv:
        yield srv


def assert_error(response: httpx.Response, status: int, max_bytes: int = 500) -> str:
    """A JSON error of the protocol's shape, short whatever the request sent."""
    assert response.status_code == status, response.text[:200]
    assert len(response.content) <= max_bytes, len(response.content)
    body = response.json()
    assert body["error"] is True and body["message"]
    return body["message"]


# ---------------------------------------------------------------------------------- auth
def test_every_path_but_healthz_needs_the_key(keyed_server):
    url = keyed_server.url
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    for method, path in [("GET", "/"), ("POST", "/"), ("GET", "/nowhere"), ("GET", "/openapi.json")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            r = httpx.request(method, url + path, params={"query": "x"}, headers=headers)
            assert_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
    for key in (KEY, "second-key"):
        r = httpx.get(
            url + "/",
            params={"query": "iron tower in Paris", "k": 1},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200 and r.json()["topk"][0]["id"] == "eiffel"


def test_an_unauthenticated_body_is_not_read(keyed_server):
    """Auth answers before the body: a large body without the key gets 401, not 413."""
    r = httpx.post(keyed_server.url + "/", content=b"x" * 100_000)
    assert_error(r, 401)


# ------------------------------------------------------------------------------- limits
def test_body_over_the_limit_is_413_declared_or_chunked(keyed_server):
    big = b'{"query": "' + b"tower " * 1000 + b'"}'
    declared = httpx.post(keyed_server.url + "/", content=big, headers=AUTH)
    assert "the limit is 2048 bytes" in assert_error(declared, 413)

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    chunked = httpx.post(keyed_server.url + "/", content=chunks(), headers=AUTH)
    assert_error(chunked, 413)


@pytest.mark.parametrize("method", ["get", "post"])
def test_query_over_the_limit_is_400_without_echo(keyed_server, method):
    query = "tower " * 20  # 120 characters, the limit is 100
    if method == "get":
        r = httpx.get(keyed_server.url + "/", params={"query": query}, headers=AUTH)
    else:
        r = httpx.post(keyed_server.url + "/", json={"query": query}, headers=AUTH)
    message = assert_error(r, 400)
    assert "120 characters; the limit is 100" in message and "tower" not in message


def test_default_limits_refuse_a_large_query_quickly(open_server):
    """The probe's 20 MB query ran 34 s and came back whole; the defaults stop it at once."""
    megabyte = httpx.post(open_server.url + "/", json={"query": "tower " * 200_000, "k": 1}, timeout=30)
    assert_error(megabyte, 413)
    long_query = httpx.post(open_server.url + "/", json={"query": "tower " * 1000, "k": 1}, timeout=30)
    assert "the limit is 4096" in assert_error(long_query, 400)
    fine = httpx.post(open_server.url + "/", json={"query": "tower " * 600, "k": 1}, timeout=30)
    assert fine.status_code == 200 and fine.json()["topk"][0]["id"] == "eiffel"


@pytest.mark.parametrize(
    "request_kwargs,status",
    [
        ({"json": {"query": "x", "stage": "s" * 50_000}}, 400),
        ({"params": {"query": "x", "stage": "s" * 8_000}}, 400),
        ({"json": {"query": "x", "k": 10**3000}}, 400),
        (
            {
                "content": b'{"query": "x", "k": ' + b"9" * 5000 + b"}",
                "headers": JSON,
            },  # past int's digit limit
            400,
        ),
        ({"content": b"\xff" * 40_000, "headers": JSON}, 400),
    ],
)
def test_bad_values_are_not_echoed(open_server, request_kwargs, status):
    method = "get" if "params" in request_kwargs else "post"
    assert_error(getattr(httpx, method)(open_server.url + "/", **request_kwargs), status)


def test_unknown_path_and_method_use_the_error_body(open_server):
    assert_error(httpx.get(open_server.url + "/nowhere"), 404)
    assert_error(httpx.delete(open_server.url + "/"), 405)


def test_healthz_does_not_reveal_the_index_path(open_server, rm):
    assert str(rm.store.path) not in httpx.get(open_server.url + "/healthz").text


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_public_address_without_a_key_is_refused(host):
    with pytest.raises(SettingsError, match="without authentication"):
        ServerSettings(host=host).check()
    assert ServerSettings(host=host, api_keys=(KEY,)).check().host == host


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "::", "my-host"))


@pytest.mark.parametrize(
    "settings",
    [{"api_keys": ("",)}, {"api_keys": (" padded ",)}, {"max_body_bytes": 0}, {"max_query_chars": 0}],
)
def test_settings_that_cannot_work_are_refused(settings):
    with pytest.raises(SettingsError):
        ServerSettings(**settings).check()


def test_cli_refuses_a_public_address_before_opening_the_index(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert main(["index", "serve", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--api-key" in err[0] and "missing" not in err[0]


def test_cli_key_from_flag_or_environment(monkeypatch):
    def settings(*extra: str) -> ServerSettings:
        return settings_from_args(
            build_parser().parse_args(["index", "serve", "idx", "--host", "0.0.0.0", *extra])
        )

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert settings().api_keys == ("from-env",)
    assert settings("--api-key", "a", "--api-key", "b").api_keys == ("a", "b")
    s = settings("--max-body-bytes", "1000", "--max-query-chars", "50")
    assert (s.max_body_bytes, s.max_query_chars) == (1000, 50)


@pytest.mark.parametrize("option", ["--max-body-bytes", "--max-query-chars"])
def test_cli_limits_must_be_positive(capsys, option):
    assert main(["index", "serve", "idx", option, "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument {option}" in err[0]


def test_index_serve_command_end_to_end(rm):
    """The real command: a key from the environment, 401 without it, answers with it."""
    port = free_port()
    env = {**os.environ, API_KEY_ENV: KEY, "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, "-m", "plait.cli", "index", "serve", str(rm.store.path), "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert_error(httpx.get(url + "/", params={"query": "iron tower"}), 401)
        r = httpx.get(url + "/", params={"query": "iron tower in Paris", "k": 1}, headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["topk"][0]["id"] == "eiffel"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGINT), proc.stderr.read()[-2000:]
