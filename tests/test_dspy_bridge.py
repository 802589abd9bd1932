"""plait.LM is a real dspy.LM whose engine is the local scheduler (DSPy 3.4 engine protocol)."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.lm15 import Config, Message, Request

import plait
from plait.backends.clients.local import AsyncPlaitEngine, PlaitEngine
from plait.backends.loading.registry import resolve

QUESTIONS = [f"In one short sentence, what is {n} times two?" for n in range(3, 11)]


@pytest.fixture(scope="module")
def lm(smollm):
    return plait.LM("smollm2-135m", cache=False, max_tokens=24)


def _request(lm, text: str, **config) -> Request:
    return Request(model=lm.model, messages=(Message.user(text),), config=Config(**config))


def test_lm_is_a_dspy_lm_with_a_per_checkpoint_model_string(lm, tmp_path, smollm_gguf_path):
    assert isinstance(lm, dspy.LM) and lm.model == "plait/smollm2-135m"
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"one checkpoint")
    b.write_bytes(b"another checkpoint")
    assert resolve(str(a))[0] != resolve(str(b))[0]  # DSPy's cache key differs per checkpoint
    assert resolve(str(smollm_gguf_path))[0] != "smollm2-135m"


def test_lm_call_runs_the_local_engine(lm, smollm):
    out = lm(messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert "Paris" in out[0]
    entry = lm.history[-1]
    assert entry["usage"]["completion_tokens"] > 0 and entry["usage"]["prompt_tokens"] > 10


def test_history_counts_prompt_tokens_read_from_the_prefix_cache(lm):
    """A call whose prompt starts like an earlier one's reads those blocks from the prefix
    cache: DSPy's history shows them as cached prompt tokens, as it does for providers."""
    system = {"role": "system", "content": "You answer questions about geography, briefly. " * 12}
    lm(messages=[system, {"role": "user", "content": "Where is Lyon?"}])
    lm(messages=[system, {"role": "user", "content": "Where is Porto?"}])
    usage = lm.history[-1]["usage"]
    assert 16 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_request_config_reaches_the_engine(lm):
    response = lm(_request(lm, "Write a long story about a lighthouse.", max_tokens=5))
    assert response.finish_reason == "length" and response.usage.output_tokens == 5
    stopped = lm(
        _request(lm, "What is the capital of France? Answer in one word.", stop=("Paris",), max_tokens=16)
    )
    assert "Paris" not in stopped.text


def test_concurrent_calls_are_batched_and_identical_to_sequential(smollm):
    """Token for token at fp32 (at the int4 default, only to bf16 rounding: the attention of a
    batched decode row sums over the batch's padded keys in another order)."""
    lm = plait.LM("smollm2-135m", dtype="fp32", cache=False, max_tokens=24)
    lm.engine._engine = engine = smollm
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sequential = [lm(messages=m)[0] for m in messages]
    steps = engine.scheduler.steps
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda m: lm(messages=m)[0], messages))
    assert concurrent == sequential
    generated = sum(len(engine.tokenizer.encode(t)) for t in sequential)
    assert engine.scheduler.steps - steps < generated / 2  # decode steps were shared


def test_engine_stream_events_add_up(lm):
    engine = lm.engine
    request = _request(lm, "Count from one to five.", max_tokens=20)
    events = list(engine.stream(request))
    assert events[0].type == "start" and events[-1].type == "end"
    text = "".join(e.delta.text for e in events if e.type == "delta")
    assert text == engine.complete(request).text
    assert events[-1].usage.output_tokens > 0


def test_async_engine(lm):
    request = _request(lm, "What is the capital of France? Answer in one word.", max_tokens=16)
    response = asyncio.run(lm._async_engine_spec.complete(request))
    assert "Paris" in response.text

    async def collect():
        return [e async for e in lm._async_engine_spec.stream(request)]

    events = asyncio.run(collect())
    assert "".join(e.delta.text for e in events if e.type == "delta") == response.text


def test_dump_and_load_state_round_trip(lm):
    state = lm.dump_state()
    json.dumps(state)  # JSON, never pickle
    assert state["engine"]["state"]["model"] == "smollm2-135m"
    loaded = dspy.LM.load_state(state, allow_custom_lm_class=True)
    assert isinstance(loaded.engine, PlaitEngine) and isinstance(loaded._async_engine_spec, AsyncPlaitEngine)
    assert loaded.model == lm.model


def test_dspy_cache_lives_in_plaits_directory():
    import os

    assert os.environ["DSPY_CACHEDIR"].startswith(str(plait.paths.plait_home()))


def test_unknown_model_fails_when_the_lm_is_built():
    with pytest.raises(plait.PlaitError):
        plait.LM("definitely-not-a-model")


def test_identical_requests_in_flight_are_computed_once(lm, smollm):
    request = _request(lm, "Describe the moon in two sentences.", max_tokens=20)
    engine = lm.engine
    handles = [engine.submit(request) for _ in range(4)]  # e.g. DSPy re-submitting a straggler
    assert len({id(h) for h in handles}) == 1
    texts = {h.wait().text for h in handles}
    assert len(texts) == 1 and texts.pop()
    seeded = [
        engine.submit(_request(lm, "Invent a word.", max_tokens=8, temperature=1.0, seed=s)) for s in (1, 2)
    ]
    assert seeded[0] is not seeded[1]  # different seeds are different requests
    unseeded = [
        engine.submit(_request(lm, "Invent a word.", max_tokens=8, temperature=1.0)) for _ in range(2)
    ]
    assert unseeded[0] is not unseeded[1]  # sampled candidates (n>1) are never merged
    for h in seeded + unseeded:
        h.wait()


def test_an_url_makes_a_remote_lm():
    remote = plait.LM("http://127.0.0.1:9/v1", model="smollm2-135m")
    assert isinstance(remote, dspy.LM) and type(remote.engine).__name__ == "RemoteEngine"
    with pytest.raises(ValueError, match="model"):
        plait.LM("http://127.0.0.1:9/v1")


def test_native_tool_calls_validate_against_their_schemas(lm):
    import jsonschema
    from dspy.lm15 import FunctionTool, ToolChoice

    weather = FunctionTool(
        name="get_weather",
        description="Current weather in a city",
        parameters={
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    )
    add = FunctionTool(
        name="add",
        description="Add two integers",
        parameters={
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    )
    request = Request(
        model=lm.model,
        messages=(Message.user("What is the weather in Paris?"),),
        tools=(weather, add),
        config=Config(max_tokens=60, tool_choice=ToolChoice(mode="required")),
    )
    response = lm.engine.complete(request)
    assert response.finish_reason == "tool_call"
    call = response.message.parts[0]
    schema = {"get_weather": weather.parameters, "add": add.parameters}[call.name]
    jsonschema.validate(call.input, schema)
    only_add = Request(
        model=lm.model,
        messages=(Message.user("What is 2 plus 3?"),),
        tools=(weather, add),
        config=Config(max_tokens=60, tool_choice=ToolChoice(mode="required", allowed=("add",))),
    )
    call = lm.engine.complete(only_add).message.parts[0]
    assert call.name == "add" and isinstance(call.input["a"], int) and isinstance(call.input["b"], int)


def test_a_prompt_over_the_context_window_is_dspys_context_window_error(lm):
    """DSPy's ReAct trims its trajectory and retries on ContextWindowExceededError only."""
    from dspy.utils.exceptions import ContextWindowExceededError

    with pytest.raises(ContextWindowExceededError):
        lm("word " * 9000)
