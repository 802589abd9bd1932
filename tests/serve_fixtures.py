"""Helpers for the server tests: a real uvicorn server on a loopback port, in a thread, and a
tiny compiled program saved as an artifact the way `plait compile` saves one."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Literal

import dspy


class Topic(dspy.Signature):
    """Say which topic a headline is about."""

    headline: str = dspy.InputField()
    topic: Literal["sports", "science", "politics"] = dspy.OutputField()


class TopicProgram(dspy.Module):
    """One constrained prediction: short, always parses, a few tokens on the 135M model."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Topic)

    def forward(self, headline: str) -> dspy.Prediction:
        return self.classify(headline=headline)


class Summary(dspy.Signature):
    """Answer in a few words."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Story(dspy.Signature):
    """Write a long, detailed story."""

    topic: str = dspy.InputField()
    story: str = dspy.OutputField()


class Storyteller(dspy.Module):
    """One free-text prediction that keeps the engine busy for hundreds of tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.tell = dspy.Predict(Story)

    def forward(self, topic: str) -> dspy.Prediction:
        return self.tell(topic=topic)


def save_program(
    path: Path, program: dspy.Module, program_path: str, *, demos: bool = True, extra: dict | None = None
) -> Path:
    """Write `program` as a compiled artifact (with one demo, as a compile would add)."""
    from plait.compilers.artifact import save_artifact

    if demos:
        for _, predictor in program.named_predictors():
            fields = {
                **dict.fromkeys(predictor.signature.input_fields, "example"),
                **dict.fromkeys(predictor.signature.output_fields, "science"),
            }
            predictor.demos = [dspy.Example(**fields)]
    save_artifact(program, path, program_path=program_path, model="smollm2-135m", extra=extra)
    return path


class ServerThread:
    """uvicorn serving `app` (from `create_app`) on 127.0.0.1 on a port the OS picked, in a
    daemon thread, configured as `plait serve` configures it."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        from plait.serve.server import uvicorn_options

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.port = self.socket.getsockname()[1]
        self.host = host
        options = uvicorn_options(app.state.runtime.config)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()


class Sleeper(dspy.Module):
    """A program that calls no LM: it sleeps, so tests can hold the server busy on purpose."""

    def forward(self, seconds: float, fail: bool = False) -> dspy.Prediction:
        time.sleep(seconds)
        if fail:
            raise RuntimeError("the program broke")
        return dspy.Prediction(slept=seconds)


class ListStore:
    """Stands in for `plait.store.Store`: keeps traces in a list; a request id starting with
    `db-down` fails to be written, as with a full database."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record_trace(self, program, inputs, outputs, latency_ms, status, tokens=0, **fields) -> int:
        if (fields.get("request_id") or "").startswith("db-down"):
            raise OSError("the database is full")
        self.rows.append(
            {"program": program, "inputs": inputs, "outputs": outputs, "status": status, **fields}
        )
        return len(self.rows)


API_KEY = "test-key"
MODEL = "smollm2-135m"


def model_runtime(*, artifacts: dict[str, Path] | None = None, store=None, max_tokens: int = 24, **settings):
    """A `ServeRuntime` on the embedded model (its engine shared process-wide with plait.LM)."""
    from plait.serve.config import ServeConfig
    from plait.serve.runtime import ServeRuntime

    runtime = ServeRuntime(ServeConfig(**{"api_keys": (API_KEY,), **settings}), store=store)
    for name, path in (artifacts or {}).items():
        runtime.load_artifact(path, name, lm_options={"max_tokens": max_tokens})
    if not runtime.models:
        runtime.load_model(MODEL)
    return runtime
