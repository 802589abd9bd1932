"""The remote engine: DSPy programs on an OpenAI-compatible server, tested end to end against
`plait serve` on loopback, plus the wire mapping for vLLM / SGLang / OpenAI dialects."""

from __future__ import annotations

import asyncio
import json

import dspy
import httpx
import pytest
from dspy.lm15 import Config, Message, Request

from plait.backends.clients.remote import (
    AsyncRemoteEngine,
    RemoteEngine,
    dialect_from_models,
    http_error,
    remote_lm,
    structured_output_params,
)
from plait.backends.grammar.spec import GrammarSpec
from plait.serve.app import create_app
from tests.serve_fixtures import API_KEY, MODEL, ServerThread, TopicProgram

TOPICS = {"sports", "science", "politics"}


# ---- the wire, without a server -----------------------------------------------------------------


def test_structured_outputs_in_each_dialect():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    regex, choices, lark = (
        GrammarSpec.regex("[0-9]+"),
        GrammarSpec.choices(["yes", "no"]),
        GrammarSpec.lark('start: "a"'),
    )
    as_json = {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": True},
        }
    }
    for dialect in ("vllm", "vllm-legacy", "sglang", "openai"):
        assert structured_output_params(GrammarSpec.json_schema(schema), dialect) == as_json
    assert structured_output_params(regex, "vllm") == {"structured_outputs": {"regex": "[0-9]+"}}
    assert structured_output_params(choices, "vllm") == {"structured_outputs": {"choice": ["yes", "no"]}}
    assert structured_output_params(lark, "vllm") == {"structured_outputs": {"grammar": 'start: "a"'}}
    assert structured_output_params(regex, "vllm-legacy") == {"guided_regex": "[0-9]+"}
    assert structured_output_params(choices, "vllm-legacy") == {"guided_choice": ["yes", "no"]}
    assert structured_output_params(lark, "vllm-legacy") == {"guided_grammar": 'start: "a"'}
    assert structured_output_params(choices, "sglang") == {"regex": "(yes|no)"}
    assert structured_output_params(lark, "plait") == {"plait_grammar": lark.to_json()}
    for dialect, spec in (("openai", regex), ("openai", lark), ("sglang", lark)):
        with pytest.raises(dspy.lm15.UnsupportedFeatureError):
            structured_output_params(spec, dialect)


def test_dialect_is_read_from_the_model_listing():
    assert dialect_from_models([{"id": "m", "owned_by": "vllm"}], "m") == "vllm"
    assert (
        dialect_from_models([{"id": "x", "owned_by": "sglang"}, {"id": "m", "owned_by": "plait"}], "m")
        == "plait"
    )
    assert dialect_from_models([{"id": "gpt", "owned_by": "openai"}], "gpt") == "openai"
    assert dialect_from_models(None, "m") == "openai"


def test_request_body_carries_sampling_messages_and_extensions():
    engine = RemoteEngine("http://example.invalid/v1", "nemotron", dialect="vllm")
    request = Request(
        model="remote/nemotron",
        system="Be brief.",
        messages=(Message.user("Hi"),),
        config=Config(
            max_tokens=7,
            temperature=0.2,
            top_k=5,
            stop=("\n",),
            seed=4,
            response_format={"type": "json_schema", "schema": {"type": "object"}},
            extensions={"metadata": {"trace": "x"}, "min_tokens": 2},
        ),
    )
    body = engine.body(request)
    assert body["model"] == "nemotron" and body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["stop"], body["seed"]) == (
        7,
        0.2,
        5,
        ["\n"],
        4,
    )
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert body["min_tokens"] == 2 and "metadata" not in body  # DSPy bookkeeping stays local
    grammar = Request(
        model="remote/nemotron",
        messages=(Message.user("Hi"),),
        config=Config(extensions={"metadata": {"plait_grammar": GrammarSpec.regex("a+").to_json()}}),
    )
    assert engine.body(grammar)["structured_outputs"] == {"regex": "a+"}
    assert engine.body(grammar, stream=True)["stream_options"] == {"include_usage": True}


def test_http_errors_become_dspy_errors():
    def error(status: int, body: dict, headers: dict | None = None):
        response = httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://h/v1"))
        return http_error(response, json.dumps(body).encode())

    assert isinstance(error(401, {"error": {"message": "bad key"}}), dspy.lm15.AuthError)
    limited = error(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
    assert isinstance(limited, dspy.lm15.RateLimitError) and limited.retry_after == 2.0
    assert isinstance(error(503, {}), dspy.lm15.ServerError)  # retried by DSPy
    assert isinstance(
        error(400, {"error": {"code": "context_length_exceeded"}}), dspy.lm15.ContextLengthError
    )
    assert isinstance(error(422, {}), dspy.lm15.InvalidRequestError)


def test_state_round_trips_without_the_key(monkeypatch):
    monkeypatch.setenv("MY_KEY", "secret-from-env")
    lm = remote_lm(
        "http://example.invalid/v1",
        "nemotron",
        api_key="secret",
        api_key_env="MY_KEY",
        dialect="vllm",
        cache=False,
    )
    state = lm.dump_state()
    assert "secret" not in json.dumps(state)
    loaded = dspy.LM.load_state(state, allow_custom_lm_class=True)
    assert isinstance(loaded.engine, RemoteEngine) and isinstance(
        loaded._async_engine_spec, AsyncRemoteEngine
    )
    assert loaded.engine.headers()["Authorization"] == "Bearer secret-from-env"
    assert loaded.model == "remote/nemotron" and loaded.engine.dialect == "vllm"


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="http"):
        RemoteEngine("localhost:8000/v1", "m")
    with pytest.raises(ValueError, match="dialect"):
        RemoteEngine("http://h/v1", "m", dialect="tgi")


# ---- end to end against `plait serve` -----------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from plait.store import Store
    from tests.serve_fixtures import model_runtime

    store = Store.open(f"sqlite:///{tmp_path_factory.mktemp('remote') / 'plait.db'}")
    runtime = model_runtime(store=store)
    with ServerThread(create_app(runtime)) as srv:
        srv.runtime, srv.store = runtime, store
        yield srv
    runtime.close()
    store.close()


@pytest.fixture(scope="module")
def lm(server):
    import plait

    lm = plait.LM(f"{server.url}/v1", model=MODEL, api_key=API_KEY, cache=False, max_tokens=24, temperature=0)
    assert isinstance(lm.engine, RemoteEngine)  # plait.LM dispatches URLs to the remote engine
    return lm


def _request(lm, text: str, **config) -> Request:
    return Request(model=lm.model, messages=(Message.user(text),), config=Config(**config))


def test_remote_lm_runs_on_plait_serve(lm, server):
    assert lm.engine.dialect == "plait"  # detected from /v1/models
    assert "Paris" in lm("What is the capital of France? Answer in one word.")[0]
    assert lm.history[-1]["usage"]["completion_tokens"] > 0
    local = server.runtime.models[MODEL].engine.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=24,
        temperature=0,
    )
    assert lm.history[-1]["outputs"][0] == local.text  # the same tokens as the local engine


def test_remote_stream_and_async_agree(lm):
    request = _request(lm, "Count from one to five.", max_tokens=12, temperature=0)
    events = list(lm.engine.stream(request))
    assert events[0].type == "start" and events[-1].type == "end" and events[-1].finish_reason == "length"
    streamed = "".join(e.delta.text for e in events if e.type == "delta")
    assert streamed == lm.engine.complete(request).text and events[-1].usage.output_tokens == 12

    async def run():
        engine = lm._async_engine_spec
        completed = await engine.complete(request)
        pieces = [e.delta.text async for e in engine.stream(request) if e.type == "delta"]
        await engine.aclose()
        return completed.text, "".join(pieces)

    assert asyncio.run(run()) == (streamed, streamed)


def test_constrained_program_runs_remotely_under_the_servers_grammar(lm, server):
    from plait.modules.adapter import ConstrainedAdapter

    program = TopicProgram()
    with dspy.context(lm=lm, adapter=ConstrainedAdapter()):
        predictions = [program(headline=h) for h in ("Team wins the cup final", "Telescope finds a planet")]
    assert all(p.topic in TOPICS for p in predictions)
    assert server.runtime.traces.flush()
    sent = server.store.traces(program="openai:chat.completions", limit=1)[0].inputs
    assert sent["plait_grammar"]["kind"] == "lark"  # the adapter's grammar reached the server
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):  # JSON mode: response_format json_schema
        assert program(headline="Senate passes the budget").topic in TOPICS


def test_remote_errors_are_typed(server):
    wrong = remote_lm(f"{server.url}/v1", MODEL, api_key="wrong", cache=False, num_retries=0)
    with pytest.raises(dspy.LMError, match="401"):
        wrong("hi")
    unknown = remote_lm(f"{server.url}/v1", "no-such-model", api_key=API_KEY, cache=False, num_retries=0)
    with pytest.raises(dspy.LMError, match="not served"):
        unknown("hi")
    closed = remote_lm("http://127.0.0.1:9/v1", MODEL, dialect="plait", cache=False, num_retries=0)
    with pytest.raises(dspy.LMError):
        closed("hi")


def test_programs_served_here_with_the_model_on_another_server(server, tmp_path, monkeypatch):
    """Scale-out: `plait serve topic.json --remote-url ...` keeps the program on this machine and
    sends its LM calls (with their grammars) to the model server; fields still stream."""
    import argparse

    from plait.serve.commands import add_commands, build_runtime, config_from_args
    from tests.serve_fixtures import save_program

    artifact = save_program(tmp_path / "topic.json", TopicProgram(), "tests.serve_fixtures:TopicProgram")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(
        [
            "serve",
            f"topic={artifact}",
            "--remote-url",
            f"{server.url}/v1",
            "--adapter",
            "constrained",
            "--no-traces",
            "--max-tokens",
            "24",
        ]
    )
    monkeypatch.setenv("PLAIT_REMOTE_API_KEY", API_KEY)
    monkeypatch.delenv("PLAIT_API_KEY", raising=False)
    runtime = build_runtime(args, config_from_args(args))
    assert runtime.models == {} and runtime.programs["topic"].model == f"remote/{MODEL}"
    with ServerThread(create_app(runtime)) as front, httpx.Client(base_url=front.url, timeout=120) as client:
        answer = client.post("/v1/programs/topic", json={"headline": "Striker scores twice in derby"}).json()
        assert answer["outputs"]["topic"] in TOPICS and answer["usage"]["completion_tokens"] > 0
        with client.stream(
            "POST", "/v1/programs/topic?stream=true", json={"headline": "Minister resigns"}
        ) as r:
            data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    chunks = "".join(d["chunk"] for d in data if "chunk" in d)
    assert chunks.strip() == data[-1]["outputs"]["topic"] in TOPICS  # streamed under ConstrainedAdapter
    runtime.close()
