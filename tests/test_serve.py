"""`plait serve` end to end on the embedded model: a compiled artifact served over real HTTP.

One uvicorn server (loopback, random port) serves a compiled `TopicProgram` artifact and the
OpenAI-compatible endpoints on SmolLM2-135M; traces go to a SQLite store in a temp dir.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from plait.serve.app import create_app
from tests.serve_fixtures import API_KEY, MODEL, ServerThread, TopicProgram, save_program

TOPICS = {"sports", "science", "politics"}
HEADLINES = [
    "Team wins the cup final",
    "Telescope finds a new planet",
    "Senate passes the budget",
    "Striker scores twice in derby",
    "Vaccine trial shows strong results",
    "Minister resigns",
    "Marathon record broken",
    "Physicists cool atoms further",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from plait.store import Store

    store = Store.open(f"sqlite:///{tmp_path_factory.mktemp('store') / 'plait.db'}")
    yield store
    store.close()


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, store):
    from tests.serve_fixtures import model_runtime

    artifact = save_program(
        tmp_path_factory.mktemp("artifacts") / "topic.json",
        TopicProgram(),
        "tests.serve_fixtures:TopicProgram",
    )
    runtime = model_runtime(artifacts={"topic": artifact}, store=store, max_tokens_limit=256)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def server(runtime):
    with ServerThread(create_app(runtime)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300, limits=limits
    ) as c:
        yield c


def test_programs_are_listed_with_their_signature(client):
    listed = client.get("/v1/programs").json()["data"]
    assert [p["name"] for p in listed] == ["topic"]
    topic = client.get("/v1/programs/topic").json()
    assert topic["inputs"] == [{"name": "headline", "type": "str", "required": True, "description": None}]
    assert topic["outputs"][0]["name"] == "topic" and "sports" in topic["outputs"][0]["type"]
    assert (
        topic["model"] == MODEL and len(topic["signature_hash"]) == 16 and len(topic["artifact_sha256"]) == 64
    )


def test_program_call_answers_outputs_and_usage(client):
    response = client.post("/v1/programs/topic", json={"headline": "Team wins the cup final"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["outputs"]["topic"] in TOPICS
    assert body["usage"]["prompt_tokens"] > 50 and body["usage"]["completion_tokens"] > 0
    missing = client.post("/v1/programs/topic", json={"title": "x"})
    assert missing.status_code == 422 and "headline: Field required" in missing.json()["error"]["message"]


@pytest.mark.slow
def test_32_concurrent_clients_are_all_answered_and_batched(client, runtime):
    engine = runtime.models[MODEL].engine
    steps = engine.scheduler.steps

    def call(i: int) -> tuple[int, float, dict]:
        started = time.perf_counter()
        response = client.post("/v1/programs/topic", json={"headline": f"{HEADLINES[i % 8]} (story {i})"})
        return response.status_code, time.perf_counter() - started, response.json()

    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    wall = time.perf_counter() - started
    latencies = sorted(r[1] for r in results)
    print(
        f"\n32 concurrent program calls: wall {wall:.1f} s, p50 {statistics.median(latencies):.1f} s, "
        f"p95 {latencies[30]:.1f} s, scheduler steps {engine.scheduler.steps - steps}"
    )
    assert [r[0] for r in results] == [200] * 32  # none lost, none failed
    assert all(r[2]["outputs"]["topic"] in TOPICS for r in results)
    completion_tokens = sum(r[2]["usage"]["completion_tokens"] for r in results)
    assert engine.scheduler.steps - steps < completion_tokens / 4  # decode steps were shared


def test_program_fields_stream_over_sse(client):
    events = []
    with client.stream(
        "POST",
        "/v1/programs/topic",
        params={"stream": "true"},
        json={"headline": "Physicists cool atoms further"},
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, line[6:]))
    names = [e for e, _ in events]
    assert names[-2:] == ["prediction", "done"] and "field" in names
    chunks = [json.loads(d) for e, d in events if e == "field"]
    final = json.loads(events[-2][1])
    assert all(c["field"] == "topic" and c["predictor"] == "classify" for c in chunks)
    assert "".join(c["chunk"] for c in chunks).strip() == final["outputs"]["topic"] and chunks[-1]["last"]


def test_chat_and_text_completions(client):
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        },
    ).json()
    assert chat["object"] == "chat.completion" and "Paris" in chat["choices"][0]["message"]["content"]
    assert (
        chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
    )
    text = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "The capital of France is",
            "max_tokens": 3,
            "temperature": 0,
            "n": 2,
            "seed": 1,
        },
    ).json()
    assert text["object"] == "text_completion" and [c["index"] for c in text["choices"]] == [0, 1]
    assert (
        all(c["finish_reason"] == "length" for c in text["choices"])
        and text["usage"]["completion_tokens"] == 6
    )
    unknown = client.post(
        "/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_n_sampled_choices_come_from_one_prefill(client, runtime):
    """`n` > 1 sampled: the prompt is computed once and the other samples start from copies of
    its state; sample i is seeded seed + i, so the call reproduces and its choices differ."""
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "temperature": 1.0,
        "n": 3,
        "seed": 7,
    }
    engine = runtime.models[MODEL].engine
    forked = engine.stats().forked
    texts = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    assert engine.stats().forked == forked + 2
    assert len(texts) == 3 and len(set(texts)) > 1
    assert [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]] == texts


def test_chat_streams_openai_chunks_with_usage(client):
    lines = []
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from one to five."}],
            "max_tokens": 10,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert (
        chunks[-2]["choices"][0]["finish_reason"] == "length"
        and chunks[-1]["usage"]["completion_tokens"] == 10
    )
    whole = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from one to five."}],
            "max_tokens": 10,
            "temperature": 0,
        },
    ).json()
    assert text == whole["choices"][0]["message"]["content"]


def test_json_schema_structured_output_parses(client):
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["city", "capital", "continent"],
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "capital": {"type": "boolean"},
            "continent": {"enum": ["Europe", "Asia", "Africa", "America"]},
        },
    }
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Describe Paris as JSON."}],
            "max_tokens": 60,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        },
    ).json()
    assert response["choices"][0]["finish_reason"] == "stop"
    value = json.loads(response["choices"][0]["message"]["content"])
    assert set(value) == {"city", "capital", "continent"} and isinstance(value["capital"], bool)
    assert response["plait"]["forced_tokens"] > 0  # keys and punctuation were forced, not sampled


def test_choice_regex_and_vllm_style_parameters(client):
    def answer(**extra):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Is the sky blue?"}],
            "max_tokens": 16,
            "temperature": 0.8,
            "seed": 3,
            **extra,
        }
        return client.post("/v1/chat/completions", json=body)

    assert answer(guided_choice=["yes", "no"]).json()["choices"][0]["message"]["content"] in ("yes", "no")
    regex = answer(structured_outputs={"regex": r"[0-9]{3}-[0-9]{4}"}).json()["choices"][0]["message"][
        "content"
    ]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", regex)
    lark = answer(guided_grammar='start: "maybe " NUM\nNUM: /[1-9]/').json()["choices"][0]["message"][
        "content"
    ]
    assert re.fullmatch(r"maybe [1-9]", lark)
    conflict = answer(guided_regex="a+", response_format={"type": "json_object"})
    assert conflict.status_code == 400 and "conflicting" in conflict.json()["error"]["message"]
    broken = answer(guided_regex="(unclosed")
    assert broken.status_code == 400 and broken.json()["error"]["code"] in (
        "invalid_grammar",
        "invalid_structured_output",
    )


def test_unsupported_openai_parameters_are_refused(client):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert (
        client.post("/v1/chat/completions", json={**base, "tools": [{"type": "function"}]}).status_code == 400
    )
    assert client.post("/v1/chat/completions", json={**base, "logprobs": True}).status_code == 400
    assert client.post("/v1/chat/completions", json={**base, "max_tokens": 10_000}).status_code == 400
    assert client.post("/v1/chat/completions", json={**base, "stream": True, "n": 2}).status_code == 400
    assert client.post("/v1/chat/completions", json={**base, "temperature": 9}).status_code == 422
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code == 422


def test_metrics_report_requests_latency_and_tokens(client):
    client.post("/v1/programs/topic", json={"headline": "Marathon record broken"})
    text = client.get("/metrics").text
    assert re.search(r'plait_program_calls_total\{outcome="ok",program="topic"\} [1-9]', text)
    assert re.search(r'plait_tokens_total\{kind="completion",model="smollm2-135m"\} [1-9]', text)
    assert 'plait_http_request_duration_seconds_count{route="/v1/programs/{name}"}' in text
    assert re.search(r'plait_engine_steps\{model="smollm2-135m"\} [1-9]', text)
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            match = re.fullmatch(r'[a-z_]+(\{.*"\})? (\S+)', line)
            assert match and float(match.group(2)) >= 0, line


def test_every_call_is_traced_to_the_store(client, runtime, store):
    client.post("/v1/programs/topic", json={"headline": "Minister resigns"})
    client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    client.post("/v1/programs/topic", json={"headline": 1})  # refused before running: not a call
    assert runtime.traces.flush()
    program = store.traces(program="topic", limit=1)[0]
    assert program.status == "ok" and program.inputs == {"headline": "Minister resigns"}
    assert program.outputs["topic"] in TOPICS and program.completion_tokens > 0 and program.latency_ms > 0
    completion = store.traces(program="openai:completions", limit=1)[0]
    assert completion.inputs["prompt"] == "Hello" and completion.completion_tokens == 2
    assert completion.request_id.startswith("cmpl-") and runtime.traces.dropped == 0


def test_leaving_a_stream_cancels_its_generation(client, runtime, store):
    scheduler = runtime.models[MODEL].engine.scheduler
    steps = scheduler.steps
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 256, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["object"] == "text_completion"
    deadline = time.monotonic() + 30
    while (scheduler.rows or client.get("/healthz").json()["inflight"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scheduler.rows and scheduler.steps - steps < 128  # stopped long before 256 tokens
    assert runtime.traces.flush()
    assert store.traces(program="openai:completions", limit=1)[0].status == "cancelled"


@pytest.mark.slow
def test_plait_serve_command_serves_an_artifact_and_stops_cleanly(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from plait.pipelines.sentiment import Sentiment
    from plait.store import Store

    # a program of an installed package: an artifact may not name a test module (not installed)
    artifact = save_program(
        tmp_path / "reviews.json", Sentiment(), "plait.pipelines.sentiment:Sentiment", demos=False
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    database = f"sqlite:///{tmp_path / 'plait.db'}"
    env = {**os.environ, "PLAIT_API_KEY": API_KEY, "PLAIT_DATABASE_URL": database}
    command = [
        sys.executable,
        "-m",
        "plait.cli",
        "serve",
        f"reviews={artifact}",
        "--port",
        str(port),
        "--max-tokens",
        "24",
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "plait serve did not come up"
            time.sleep(0.5)
        answer = httpx.post(
            f"{url}/v1/programs/reviews",
            json={"text": "a gorgeous, witty film"},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=120,
        )
        assert answer.status_code == 200 and answer.json()["outputs"]["label"] in ("negative", "positive")
        assert httpx.post(f"{url}/v1/programs/reviews", json={"text": "x"}).status_code == 401
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    stderr = server.stderr.read()
    assert code == 0, stderr
    assert "serving 1 program(s) ['reviews']" in stderr
    store = Store.open(database)
    assert [t.status for t in store.traces(program="reviews")] == ["ok"]  # written before exit
    store.close()
