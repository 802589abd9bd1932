"""uvicorn as `plait serve` runs it: the HTTP protocol with deadlines for reading a request.

uvicorn closes idle keep-alive connections, but nothing bounds a request while it is being
read: a client that sends half its headers, or a body shorter than its `Content-Length`,
holds its connection (and, once the headers are in, a request task waiting for the body)
forever, and a few hundred of them exhaust the server. `ReadDeadlines` gives each part of a
request a deadline; a client that misses one is disconnected. A request already read is not
limited here: generation has its own timeout (`ServeConfig.request_timeout`).
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from plait.serve.config import ServeConfig


class ReadDeadlines(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on the headers and one on the body.

    The headers must be complete within `header_timeout` seconds of the connection opening
    (or of the previous response on a kept-alive connection), the body within `body_timeout`
    seconds of the headers. Which part is being read is h11's view of the client
    (`their_state`), checked after every event uvicorn handles.
    """

    def __init__(self, *args: Any, header_timeout: float, body_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._timeouts = {h11.IDLE: header_timeout, h11.SEND_BODY: body_timeout}
        self._deadline: asyncio.TimerHandle | None = None
        self._reading: Any = None  # the client's state the deadline was armed for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _watch(self) -> None:
        """Arm a deadline when the client starts a new part of a request; none once it is read."""
        state = self.conn.their_state
        if state is self._reading:
            return
        self._disarm()
        timeout = self._timeouts.get(state)
        if timeout is not None and not self.transport.is_closing():
            self._reading = state
            self._deadline = self.loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._reading = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # an app reading the body sees the client disconnect


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """uvicorn's settings (for `uvicorn.run` or `uvicorn.Config`) that `config` decides; the CLI
    and the tests share them."""
    protocol = functools.partial(
        ReadDeadlines, header_timeout=config.header_timeout, body_timeout=config.body_timeout
    )
    # An idle kept-alive connection is closed by the header deadline, not by uvicorn's own 5 s
    # keep-alive timer: at 5 s that timer races clients that reuse connections idle for up to
    # 5 s (httpx's default), and a request sent as the server closes is reset.
    return {"http": protocol, "timeout_keep_alive": config.header_timeout}


def wait_until_serving(base_url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    """Return once the `plait serve` process answers `GET /healthz` at `base_url` (loading the
    weights and artifacts comes first); raise RuntimeError, with what it wrote to a piped
    stderr, if it exits or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            error = process.stderr.read() if process.stderr else ""
            raise RuntimeError(f"the server did not start: {error or 'see its output'}")
        time.sleep(0.2)
