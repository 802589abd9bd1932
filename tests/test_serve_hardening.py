"""Hostile clients, without a model: JSON bodies that break parsers, and connections that
never finish their request (issue #12, item 7).

A program that only sleeps (tests.serve_fixtures.Sleeper) stands in for a compiled one; every
test talks to a real uvicorn on loopback, raw sockets where the client misbehaves on purpose.
"""

from __future__ import annotations

import argparse
import socket
import time

import httpx
import pytest

from plait.serve.app import create_app
from plait.serve.commands import add_commands, config_from_args
from plait.serve.config import ServeConfig, ServeConfigError
from plait.serve.programs import ServedProgram
from plait.serve.runtime import ServeRuntime
from tests.serve_fixtures import ListStore, ServerThread, Sleeper

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_ENDPOINTS = ("/v1/programs/sleep", "/v1/chat/completions", "/v1/completions")


# ---- JSON bodies (item 7) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    store = ListStore()
    config = ServeConfig(api_keys=(KEY,), header_timeout=1.0, body_timeout=1.0)
    runtime = ServeRuntime(config, store=store)
    runtime.add_program(ServedProgram("sleep", Sleeper(), lm=None))
    with ServerThread(create_app(runtime)) as srv:
        srv.runtime, srv.store = runtime, store
        yield srv
    runtime.close()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_deeply_nested_bodies_are_400_not_500(client, path):
    for body in ('{"text": ' + "[" * 3000 + "]" * 3000 + "}", '{"text": ' + "[" * 200 + "]" * 200 + "}"):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "json_too_deep"
    assert client.post("/v1/programs/sleep", json={"seconds": 0}).status_code == 200


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_lone_surrogates_are_400_not_500(client, path):
    for raw in (b'{"seconds": 0, "text": "a\\ud800b"}', b'{"seconds": 0, "text": "\xed\xa0\x80"}'):
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_unicode"
    paired = client.post("/v1/programs/sleep", content=b'{"seconds": 0, "inputs_note": "\\ud83d\\ude00"}')
    assert paired.json()["error"]["code"] == "invalid_inputs"  # a valid pair passes the door


# ---- connections that never finish their request (item 7) ------------------------------------
def _connect(server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    return sock


def _closed_by(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes `sock` before `deadline` (what it sends is read and dropped)."""
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def test_unfinished_headers_and_bodies_are_cut_off(server):
    head = f"POST /v1/programs/sleep HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    stalled = []
    for _ in range(50):  # half the headers, then nothing
        sock = _connect(server)
        sock.sendall(head.encode())
        stalled.append(sock)
    short = _connect(server)  # a body shorter than its Content-Length
    short.sendall((head + "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode())
    short.sendall(b'{"seconds": 0')
    stalled.append(short)
    # a connection per request: a kept-alive one can sit idle past the server's 1 s timeouts
    # (the wait below is up to 5 s) and be closed just as it is reused (a reset seen once in CI)
    client = httpx.Client(base_url=server.url, headers={**AUTH, "Connection": "close"}, timeout=30)
    try:
        assert client.post("/v1/programs/sleep", json={"seconds": 0}).status_code == 200  # others served
        deadline = time.monotonic() + 5.0  # the timeouts are 1 s
        assert all(_closed_by(sock, deadline) for sock in stalled)
        assert client.get("/healthz").status_code == 200
    finally:
        client.close()
        for sock in stalled:
            sock.close()


def test_a_slow_but_steady_request_is_not_cut_off(server):
    sock = _connect(server)
    try:
        body = b'{"seconds": 0}'
        request = (
            f"POST /v1/programs/sleep HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        for i in range(0, len(request), len(request) // 3 + 1):
            sock.sendall(request[i : i + len(request) // 3 + 1])
            time.sleep(0.3)  # each part well within the timeouts
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()


def test_read_timeouts_are_settings_of_plait_serve():
    for name in ("header_timeout", "body_timeout"):
        with pytest.raises(ServeConfigError, match=f"--{name.replace('_', '-')} must be positive"):
            ServeConfig(**{name: 0}).check()
    parser = argparse.ArgumentParser(prog="plait")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "m", "--header-timeout", "2", "--body-timeout", "3.5"])
    config = config_from_args(args)
    assert (config.header_timeout, config.body_timeout) == (2.0, 3.5)
    assert (ServeConfig().header_timeout, ServeConfig().body_timeout) == (10.0, 30.0)


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response from `sock`: its head, then as many body bytes as it declares
    (the body may come in a packet of its own); b"" when the server has closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        if not (chunk := sock.recv(65536)):
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_an_idle_kept_alive_connection_lasts_until_the_header_deadline():
    """uvicorn's own keep-alive timer (5 s) would close an idle connection just as a client
    that keeps them 5 s (httpx's default) reuses it, and the request is reset: idle
    connections live until the header deadline instead."""
    runtime = ServeRuntime(ServeConfig(api_keys=(KEY,), header_timeout=8.0), store=ListStore())
    runtime.add_program(ServedProgram("sleep", Sleeper(), lm=None))
    with ServerThread(create_app(runtime)) as srv:
        sock = _connect(srv)
        try:
            for pause in (0.0, 6.0):  # past uvicorn's 5 s, within the 8 s deadline
                time.sleep(pause)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _response(sock).startswith(b"HTTP/1.1 200")
            assert _closed_by(sock, time.monotonic() + 10.0)  # then the deadline closes it
        finally:
            sock.close()
    runtime.close()
