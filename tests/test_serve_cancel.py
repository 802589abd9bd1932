"""Abandoned work stops, and bad text is refused, on the embedded model (issue #12, items 2, 6, 7).

A client that goes away must not leave its generation running: for the OpenAI endpoints
(streamed or not, `n>1` too) and for program calls, the engine's rows empty within a few
scheduler steps of the disconnect, and the admission slot comes back only once they have.
Each test leaves the engine idle for the next (`idle`).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from plait.serve.app import create_app
from tests.serve_fixtures import API_KEY, MODEL, ServerThread, Storyteller, TopicProgram, save_program

STORY = "Tell me a long story about a dragon who learns to sing."
LONG = 256  # max tokens of the long generations: far more steps than a cancel may take


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from plait.store import Store

    store = Store.open(f"sqlite:///{tmp_path_factory.mktemp('store') / 'plait.db'}")
    yield store
    store.close()


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, store):
    from tests.serve_fixtures import model_runtime

    artifacts = tmp_path_factory.mktemp("artifacts")
    story = save_program(
        artifacts / "story.json", Storyteller(), "tests.serve_fixtures:Storyteller", demos=False
    )  # no demo to copy: the story runs for hundreds of tokens
    topic = save_program(artifacts / "topic.json", TopicProgram(), "tests.serve_fixtures:TopicProgram")
    runtime = model_runtime(
        artifacts={"story": story, "topic": topic}, store=store, max_tokens=LONG, max_tokens_limit=LONG
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def server(runtime):
    with ServerThread(create_app(runtime)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as c:
        yield c


@pytest.fixture
def scheduler(runtime):
    return runtime.models[MODEL].engine.scheduler


@pytest.fixture(autouse=True)
def idle(runtime, scheduler):
    """Every test starts and ends with nothing generating and no call admitted."""
    wait_for(lambda: not scheduler.rows and not scheduler.waiting and runtime.gate.inflight == 0, 120)
    yield
    wait_for(lambda: not scheduler.rows and not scheduler.waiting and runtime.gate.inflight == 0, 120)


def wait_for(condition: Callable[[], object], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def post_then_leave(server, path: str, body: dict, until: Callable[[], object]) -> None:
    """POST `body` on a raw socket, and close it (the client goes away) once `until()` holds."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(head.encode() + payload)
        wait_for(until)


def steps_to_stop(runtime, scheduler) -> tuple[int, int]:
    """Scheduler steps from now until the engine's rows are empty, and from then until the
    admission slot is free (negative: the slot came back while rows were still running)."""
    start = scheduler.steps
    freed_at = stopped_at = None
    deadline = time.monotonic() + 120
    while freed_at is None or stopped_at is None:
        assert time.monotonic() < deadline, "the call neither stopped nor freed its slot"
        steps = scheduler.steps  # read first: the states read next are at least this recent
        if stopped_at is None and not scheduler.rows and not scheduler.waiting:
            stopped_at = steps
        if freed_at is None and runtime.gate.inflight == 0:
            freed_at = steps
        time.sleep(0.002)
    return stopped_at - start, freed_at - stopped_at


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": STORY}]}),
        ("/v1/completions", {"prompt": "Once upon a time", "n": 2, "temperature": 0.8, "seed": 5}),
        ("/v1/completions", {"prompt": "Once upon a time", "stream": True}),
    ],
    ids=["chat", "completions-n2", "completions-stream"],
)
def test_a_client_that_leaves_stops_its_openai_generation(server, runtime, scheduler, store, path, body):
    body = {"model": MODEL, "max_tokens": LONG, "temperature": 0, **body}
    rows = body.get("n", 1)
    post_then_leave(server, path, body, until=lambda: len(scheduler.rows) == rows)
    to_stop, then_freed = steps_to_stop(runtime, scheduler)
    assert to_stop < 16 and then_freed >= 0  # stopped long before LONG tokens, then the slot came back
    assert runtime.traces.flush()
    endpoint = "openai:chat.completions" if path.endswith("chat/completions") else "openai:completions"
    trace = store.traces(program=endpoint, limit=1)[0]
    assert trace.status == "cancelled" and trace.completion_tokens < LONG * rows / 2


def test_lone_surrogates_are_400_before_the_tokenizer(client):
    bodies = {
        "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi \ud800"}]},
        "/v1/completions": {"model": MODEL, "prompt": "\udfff", "max_tokens": 2},
        "/v1/programs/topic": {"headline": "Team \ud800 wins"},
    }
    for path, body in bodies.items():
        raw = json.dumps(body).encode()  # ASCII escapes: "\ud800"
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_unicode"
    emoji = client.post(
        "/v1/completions",
        content=json.dumps({"model": MODEL, "prompt": "Rain \U0001f327", "max_tokens": 2}).encode(),
    )
    assert emoji.status_code == 200  # an escaped surrogate pair is one character


def test_bodies_too_deep_for_the_trace_writer_are_refused_and_tracing_goes_on(client, runtime, store):
    deep: dict = {}
    inner = deep
    for _ in range(599):
        inner["k"] = {}
        inner = inner["k"]
    schema: dict = {"type": "string"}
    for _ in range(300):
        schema = {"type": "object", "properties": {"a": schema}}
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra in (
        {"unknown": deep},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
    ):
        response = client.post("/v1/chat/completions", json={**base, **extra})
        assert response.status_code == 400 and response.json()["error"]["code"] == "json_too_deep"
    assert client.post("/v1/chat/completions", json={**base, "user": "after"}).status_code == 200
    assert runtime.traces.flush()
    assert store.traces(program="openai:chat.completions", limit=1)[0].inputs["user"] == "after"
    assert runtime.traces.dropped == 0


@pytest.mark.parametrize("stream", [False, True], ids=["call", "stream"])
def test_a_client_that_leaves_stops_its_program(server, runtime, scheduler, store, stream):
    path = "/v1/programs/story" + ("?stream=true" if stream else "")
    post_then_leave(server, path, {"topic": STORY}, until=lambda: scheduler.rows)
    to_stop, then_freed = steps_to_stop(runtime, scheduler)
    # stopped long before LONG tokens, and the slot came back; a program's thread may end and
    # free its slot while the scheduler is still in the step that drops its row (-1)
    assert to_stop < 16 and then_freed >= -1
    assert runtime.traces.flush()
    assert store.traces(program="story", limit=1)[0].status == "cancelled"
