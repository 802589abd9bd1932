"""Tool calls end to end on the tiny Nemotron checkpoints that speak the Nano-9B-v2 (`<TOOLCALL>`
JSON) and Nemotron 3 (Qwen3-Coder XML) dialects: `plait.LM` (DSPy's native function calling,
`dspy.ReAct`), `plait serve`'s OpenAI endpoint (httpx and the `openai` SDK) and the remote
engine against it. The weights are random: every call parses and validates only because it is
decoded under the format's grammar.
"""

from __future__ import annotations

import json
from typing import Literal

import dspy
import httpx
import jsonschema
import pytest
from dspy.adapters.types.tool import ToolCallResults
from dspy.lm15 import (
    Config,
    FunctionTool,
    Message,
    Request,
    TextPart,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
)

import plait
from plait.backends.clients.local import PlaitEngine
from plait.backends.clients.remote import tool_params
from plait.modules.adapter import ConstrainedAdapter
from plait.serve.app import create_app
from tests.chat_fixtures import write_chat_checkpoint
from tests.serve_fixtures import API_KEY, ServerThread

#: checkpoint name -> (dialect, kind, seed, the text a call starts with); the seeds are ones whose
#: random weights do not always prefer ReAct's `finish` over the tool (greedy, these questions)
CHECKPOINTS = {"nano": ("nano_v2", "dense", 3, "<TOOLCALL>"), "xml": ("nemotron3", "moe", 5, "<tool_call>")}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
SCHEMAS = {"add": ADD, "get_weather": WEATHER}
TOOLS = (
    FunctionTool(name="add", description="Add two integers", parameters=ADD),
    FunctionTool(name="get_weather", description="The weather in a city", parameters=WEATHER),
)
OPENAI_TOOLS = [{"type": "function", "function": {"name": t.name, "parameters": t.parameters}} for t in TOOLS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for name, (dialect, kind, seed, _) in CHECKPOINTS.items():
        directory = tmp_path_factory.mktemp(name)
        write_chat_checkpoint(directory, dialect, kind, seed)
        paths[name] = str(directory)
    return paths


def _lm(path: str, **settings) -> dspy.LM:
    """A plait.LM on the checkpoint (its engine loaded once per process), thinking off: the
    calls start at once, short tests."""
    return plait.LM(path, **{"cache": False, "max_tokens": 160, "reasoning": "off", **settings})


@pytest.fixture(scope="module")
def lms(checkpoints) -> dict[str, dspy.LM]:
    return {name: _lm(path) for name, path in checkpoints.items()}


def _request(lm: dspy.LM, *messages: Message, choice: ToolChoice | None = None, **config) -> Request:
    config.setdefault("max_tokens", 160)
    return Request(
        model=lm.model, messages=messages, tools=TOOLS, config=Config(tool_choice=choice, **config)
    )


def _validate(name: str, arguments: dict) -> None:
    jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_plait_generate_prints_the_calls_as_json(checkpoints, name, tmp_path, capsys):
    from plait.cli import main

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(OPENAI_TOOLS))
    args = ["generate", "-m", checkpoints[name], "Add 2 and 3.", "--tools", str(tools), "--reasoning", "off"]
    assert main([*args, "--tool-choice", "required", "--max-tokens", "160"]) == 0
    calls = json.loads(capsys.readouterr().out)
    assert calls and all(c["name"] in SCHEMAS for c in calls)
    for call in calls:
        _validate(call["name"], call["arguments"])
    tools.write_text("{}")
    assert main(args) == 2 and "non-empty JSON list" in capsys.readouterr().err


# ---- plait.LM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_required_call_is_decoded_in_the_models_format(lms, name):
    lm = lms[name]
    request = _request(lm, Message.user("What is 2 plus 3?"), choice=ToolChoice(mode="required"))
    call = lm.engine.start(request)
    call.handle.wait()
    assert call.handle.text.startswith(CHECKPOINTS[name][3])  # the model's own markup
    response = lm.engine._response(request, call)
    assert response.finish_reason == "tool_call"
    parts = [p for p in response.message.parts if isinstance(p, ToolCallPart)]
    assert parts and all(p.id.startswith("call_") for p in parts)
    for part in parts:
        _validate(part.name, part.input)
    only = _request(
        lm, Message.user("Weather?"), choice=ToolChoice("required", ("get_weather",), parallel=False)
    )
    (part,) = lm.engine.complete(only).message.parts
    assert part.name == "get_weather" and part.input["unit"] in ("celsius", "fahrenheit")


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_history_calls_and_results_are_rendered_by_the_template(lms, name):
    lm = lms[name]
    history = (
        Message.user("What is 1 plus 2?"),
        Message.assistant([ToolCallPart(id="call_1", name="add", input={"a": 1, "b": 2})]),
        Message(role="tool", parts=(ToolResultPart(id="call_1", content=(TextPart("3"),), name="add"),)),
    )
    prompt = lm.engine.start(_request(lm, *history, choice=ToolChoice(mode="none"), max_tokens=2)).turn.prompt
    if name == "nano":
        assert '<AVAILABLE_TOOLS>[{"type": "function", "function": {"name": "add"' in prompt
        assert '<TOOLCALL>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</TOOLCALL>' in prompt
        assert "<TOOL_RESPONSE>[3]</TOOL_RESPONSE>" in prompt
    else:
        assert '<tools>{"type": "function", "function": {"name": "add"' in prompt
        assert (
            "<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2\n</parameter>"
            in prompt
        )
        assert "<tool_response>\n3\n</tool_response>" in prompt
    assert "You can call these tools" not in prompt  # plait's JSON note is for other templates


def test_thinking_first_then_the_call(lms):
    """The template's default (thinking on): the reasoning comes back apart, the call parses."""
    lm = lms["nano"]
    request = _request(lm, Message.user("Add 2 and 3."), choice=ToolChoice(mode="required"), max_tokens=256)
    response = PlaitEngine(lm.engine.model, engine=lm.engine.engine).complete(request)
    kinds = [p.type for p in response.message.parts]
    assert kinds[0] == "thinking" and "tool_call" in kinds and response.finish_reason == "tool_call"


def test_a_stream_sends_the_calls_whole_at_the_end(lms):
    lm = lms["xml"]
    events = list(lm.engine.stream(_request(lm, Message.user("2+3?"), choice=ToolChoice(mode="required"))))
    calls = [e.delta for e in events if e.type == "delta" and e.delta.type == "tool_call"]
    assert calls and events[-1].finish_reason == "tool_call"
    for delta in calls:
        _validate(delta.name, json.loads(delta.input))


# ---- DSPy programs --------------------------------------------------------------------------------


def _recording_tools(log: list) -> list:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        log.append(("add", {"a": a, "b": b}))
        return a + b

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city, in celsius or fahrenheit."""
        log.append(("get_weather", {"city": city, "unit": unit}))
        return f"sunny in {city}"

    return [add, get_weather]


def _validate_log(log: list, functions: list) -> None:
    """Each recorded call's arguments against the schema DSPy made from its function."""
    assert log, "no tool was called"
    tools = {f.__name__: dspy.Tool(f) for f in functions}
    for name, arguments in log:
        schema = {"type": "object", "properties": tools[name].args, "required": list(tools[name].args)}
        jsonschema.validate(arguments, schema)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_react_with_text_fields_calls_tools_with_valid_arguments(checkpoints, name):
    """`dspy.ReAct` (ChatAdapter-style fields) under ConstrainedAdapter: every step parses on
    the first try (no JSON fallback), and the tools run with arguments their schemas accept."""
    lm, log = _lm(checkpoints[name], max_tokens=256), []
    react = dspy.ReAct("question -> answer", tools=_recording_tools(log)[:1], max_iters=2)
    adapter = ConstrainedAdapter(text_tokens=12, reasoning_tokens=12, grace_tokens=4, value_tokens=24)
    calls_before = len(lm.history)
    with dspy.context(lm=lm, adapter=adapter):
        out = react(question="What is 2 plus 3?")
    assert out.trajectory["tool_name_0"] == "add" and isinstance(out.answer, str)
    _validate_log(log, _recording_tools([]))
    steps = sum(1 for k in out.trajectory if k.startswith("tool_name"))
    assert len(lm.history) - calls_before >= steps + 1  # one LM call per step + the extract


class Step(dspy.Signature):
    """Answer the question; call a tool when it helps."""

    question: str = dspy.InputField()
    tools: list[dspy.Tool] = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()
    tool_calls: dspy.ToolCalls = dspy.OutputField()


def _native_agent(lm, adapter, log: list) -> tuple[dspy.Prediction, dspy.Prediction]:
    """Two turns of DSPy's native function calling: a required call, run, then the answer."""
    tools = [dspy.Tool(f) for f in _recording_tools(log)]
    step = dspy.Predict(Step)
    question = "What is 2 plus 3?"
    with dspy.context(lm=lm, adapter=adapter):
        first = step(
            question=question,
            tools=tools,
            history=dspy.History(messages=[]),
            config={"tool_choice": "required"},
        )
        calls = first.tool_calls
        results = ToolCallResults.from_tool_calls_and_values(
            calls, [c.execute(functions=tools) for c in calls.tool_calls]
        )
        turn = {"question": question, "tool_calls": calls.model_copy(update={"tool_call_results": results})}
        second = step(
            question=question,
            tools=tools,
            history=dspy.History(messages=[turn]),
            config={"tool_choice": "none"},
        )
    return first, second


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_native_function_calling_with_the_constrained_adapter(lms, name):
    lm, log = lms[name], []
    before = len(lm.history)
    adapter = ConstrainedAdapter(text_tokens=12, use_native_function_calling=True)
    first, second = _native_agent(lm, adapter, log)
    assert first.tool_calls.tool_calls
    _validate_log(log, _recording_tools([]))
    assert isinstance(second.answer, str) and second.answer and second.tool_calls is None
    assert len(lm.history) - before == 2  # each turn parsed first try


def test_native_function_calling_with_dspys_chat_adapter(lms):
    lm, log = lms["xml"], []
    first, second = _native_agent(lm, dspy.ChatAdapter(use_native_function_calling=True), log)
    assert first.tool_calls.tool_calls
    _validate_log(log, _recording_tools([]))
    assert second.tool_calls is None


# ---- plait serve's OpenAI endpoint and the remote engine ----------------------------------------


@pytest.fixture(scope="module")
def server(lms):
    from plait.serve.config import ServeConfig
    from plait.serve.runtime import ServeRuntime

    runtime = ServeRuntime(ServeConfig(api_keys=(API_KEY,)))
    for name, lm in lms.items():
        runtime.add_model(name, lm.engine.engine)
    with ServerThread(create_app(runtime)) as srv:
        yield srv
    runtime.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def _chat(client, model: str, **body) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "2 plus 3?"}], "max_tokens": 160, **body}
    return client.post(
        "/v1/chat/completions", json={"reasoning_effort": "none", "tools": OPENAI_TOOLS, **body}
    )


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_openai_endpoint_answers_tool_calls(client, name):
    response = _chat(client, name, tool_choice="required")
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    for call in choice["message"]["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        _validate(call["function"]["name"], json.loads(call["function"]["arguments"]))
    named = _chat(client, name, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert {c["function"]["name"] for c in named.json()["choices"][0]["message"]["tool_calls"]} == {
        "get_weather"
    }
    history = [
        {"role": "user", "content": "2 plus 3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    answered = _chat(client, name, messages=history, tool_choice="none", max_tokens=4)
    assert answered.status_code == 200 and answered.json()["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )


def test_openai_endpoint_refuses_bad_tools(client):
    cases = [
        {"tools": [{"type": "function", "function": {"parameters": ADD}}]},  # no name
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
        {"tools": [{"type": "retrieval"}]},
        {"tool_choice": {"type": "function", "function": {"name": "missing"}}},
        {"tool_choice": "sometimes"},
        {"tools": None, "tool_choice": "required"},
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{oops"}}]}
            ]
        },
    ]
    for case in cases:
        response = _chat(client, "nano", **case)
        assert response.status_code == 400, (case, response.text)
        assert response.json()["error"]["message"]
    raw = client.post("/v1/completions", json={"model": "nano", "prompt": "hi", "tools": OPENAI_TOOLS})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "unsupported_tools"


def test_openai_stream_sends_the_calls_in_one_delta(client):
    body = {
        "model": "xml",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 160,
        "stream": True,
    }
    body |= {"tools": OPENAI_TOOLS, "tool_choice": "required", "reasoning_effort": "none"}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    for i, call in enumerate(calls[0]):
        assert call["index"] == i
        _validate(call["function"]["name"], json.loads(call["function"]["arguments"]))


def test_the_openai_sdk_reads_the_calls(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as sdk:
        completion = sdk.chat.completions.create(
            model="nano",
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=OPENAI_TOOLS,
            tool_choice="required",
            max_tokens=160,
            reasoning_effort="none",
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        _validate(call.function.name, json.loads(call.function.arguments))


def test_tools_travel_to_a_remote_server_in_openais_form():
    tools = (*TOOLS, FunctionTool(name="f"))
    assert tool_params(tools, None)["tools"][0] == {
        "type": "function",
        "function": OPENAI_TOOLS[0]["function"] | {"description": "Add two integers"},
    }
    one = tool_params(tools, ToolChoice("required", ("add",), parallel=False))
    assert (
        one["tool_choice"] == {"type": "function", "function": {"name": "add"}}
        and not one["parallel_tool_calls"]
    )
    some = tool_params(tools, ToolChoice("auto", ("add", "f")))
    assert [t["function"]["name"] for t in some["tools"]] == ["add", "f"] and some["tool_choice"] == "auto"


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_remote_engine_gets_tool_calls_back_from_plait_serve(server, name):
    remote = plait.LM(
        f"{server.url}/v1", model=name, api_key=API_KEY, cache=False, max_tokens=160, reasoning="off"
    )
    assert remote.engine.supports_function_calling
    history = (
        Message.user("What is 1 plus 2?"),
        Message.assistant([ToolCallPart(id="call_1", name="add", input={"a": 1, "b": 2})]),
        Message(role="tool", parts=(ToolResultPart(id="call_1", content=(TextPart("3"),), name="add"),)),
        Message.user("And the weather in Oslo?"),
    )
    request = _request(remote, *history, choice=ToolChoice(mode="required"))
    body = remote.engine.body(request)
    assert body["messages"][1]["tool_calls"][0]["function"] == {
        "name": "add",
        "arguments": '{"a": 1, "b": 2}',
    }
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "3", "name": "add"}
    response = remote.engine.complete(request)
    assert response.finish_reason == "tool_call"
    for part in response.message.parts:
        _validate(part.name, part.input)
    log: list = []
    first, _ = _native_agent(
        remote, ConstrainedAdapter(text_tokens=12, use_native_function_calling=True), log
    )
    assert first.tool_calls.tool_calls
    _validate_log(log, _recording_tools([]))
