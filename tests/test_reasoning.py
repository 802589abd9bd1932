"""Reasoning on, off and on a token budget, in both Nemotron chat dialects, on every path:
the template's own switch, the engine under the turn's grammar, plait.LM (DSPy), `plait serve`
(OpenAI `reasoning_content`), the remote engine and `plait generate`."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import dspy
import httpx
import pytest

import plait
from plait.backends.grammar.reasoning import (
    EFFORT_BUDGETS,
    ReasoningError,
    ReasoningFormat,
    ReasoningRequest,
    ThinkingStream,
    detect_reasoning_format,
    split_thinking,
)
from plait.backends.grammar.spec import GrammarSpec
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.turn import plan_turn
from tests.chat_fixtures import NANO_V2_TEMPLATE, NEMOTRON3_TEMPLATE, write_chat_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


# ---- the format, read from the template -----------------------------------------------------


def test_each_template_says_how_it_switches_thinking():
    assert detect_reasoning_format(NANO_V2_TEMPLATE).switch == "flag"
    assert detect_reasoning_format(NEMOTRON3_TEMPLATE).switch == "kwarg"
    assert detect_reasoning_format("{{ messages }}<think>").switch == "none"
    assert detect_reasoning_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert detect_reasoning_format(None) is None


@pytest.mark.parametrize(
    ("value", "mode", "budget"),
    [
        (None, "default", None),
        ("on", "on", None),
        ("off", "off", None),
        ("none", "off", None),
        (False, "off", None),
        (0, "on", 0),
        (64, "on", 64),
        ("256", "on", 256),
        ("low", "on", EFFORT_BUDGETS["low"]),
        ("max", "on", None),
    ],
)
def test_reasoning_settings_parse(value, mode, budget):
    assert ReasoningRequest.parse(value) == ReasoningRequest(mode, budget)


@pytest.mark.parametrize("value", [-1, "lots", 1.5, "", {"effort": "low"}])
def test_bad_reasoning_settings_are_refused(value):
    with pytest.raises(ReasoningError):
        ReasoningRequest.parse(value)


def test_streamed_pieces_split_like_the_whole_text():
    fmt = ReasoningFormat("kwarg")
    rng = random.Random(0)
    texts = [
        ("first I think</think>\n\nthe answer", True),
        ("<think>a < b, so</think>42", False),
        ("no block at all", False),
        ("thinking that never ends </thi", True),
    ]
    for text, opened in texts:
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), 4))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            stream = ThinkingStream(fmt, opened=opened)
            got = [stream.feed(p) for p in pieces] + [stream.flush()]
            thought, answer = "".join(t for t, _ in got), "".join(a for _, a in got)
            want_thought, want_answer = split_thinking(fmt, text, opened=opened)
            assert answer == want_answer
            assert thought.strip() == (want_thought or "")


# ---- the engine, under the turn's grammar -----------------------------------------------------


@pytest.fixture(
    scope="module", params=[("nano_v2", "dense"), ("nemotron3", "moe")], ids=["nano_v2", "nemotron3"]
)
def engine(request, tmp_path_factory):
    dialect, kind = request.param
    directory = tmp_path_factory.mktemp(dialect)
    write_chat_checkpoint(directory, dialect, kind)
    engine = Engine.load(str(directory))
    engine.directory = directory
    yield engine
    engine.close()


def _run(engine, reasoning, *, spec=None, max_tokens=120, messages=None):
    messages = messages or [{"role": "user", "content": "What is 6 times 7?"}]
    turn = plan_turn(
        engine, messages, reasoning=ReasoningRequest.parse(reasoning), spec=spec, max_tokens=max_tokens
    )
    handle = engine.submit(
        turn.prompt, constraint=turn.constraint(engine, max_tokens), max_tokens=max_tokens, temperature=0.0
    ).wait()
    return turn, handle


def test_off_renders_the_templates_own_off_form(engine):
    on = plan_turn(
        engine, [{"role": "user", "content": "hi"}], reasoning=ReasoningRequest("on"), max_tokens=50
    )
    off = plan_turn(
        engine, [{"role": "user", "content": "hi"}], reasoning=ReasoningRequest("off"), max_tokens=50
    )
    assert on.prompt.endswith("<think>\n") and on.thinking is not None and on.opened
    assert off.prompt.endswith("<think></think>") and off.thinking is None
    if engine.reasoning_format.switch == "flag":  # the last flag wins: a user's /think beats it
        messages = [{"role": "user", "content": "hi /think"}]
        again = plan_turn(engine, messages, reasoning=ReasoningRequest("off"), max_tokens=50)
        assert again.prompt.endswith("<think>\n")


@pytest.mark.parametrize("budget", [0, 8, 24])
def test_a_budget_closes_the_block_and_the_answer_still_parses(engine, budget):
    close = engine.tokenizer.encode("</think>")
    assert len(close) == 1  # one added token, as in the real tokenizers
    turn, handle = _run(engine, budget, spec=GrammarSpec.json_schema(SCHEMA))
    ids = handle.token_ids
    assert close[0] in ids
    # the budget, its grace window, and the rest of a UTF-8 character it cut (byte-level vocab)
    assert ids.index(close[0]) <= budget + budget // 10 + 3
    reasoning, answer = turn.split(handle.text)
    assert reasoning is not None
    assert set(json.loads(answer)) == {"answer", "sure"}  # the answer's grammar still holds
    assert handle.finish_reason == "stop"


def test_without_a_grammar_thinking_is_bounded_too_and_off_has_no_block(engine):
    turn, handle = _run(engine, 5, max_tokens=40)
    assert handle.token_ids.index(engine.tokenizer.encode("</think>")[0]) <= 5 + 3
    turn, handle = _run(engine, "off", max_tokens=10)
    assert turn.split(handle.text) == (None, handle.text)


def test_a_grammar_leaves_the_answer_room_even_when_thinking_is_unbounded(engine):
    turn, handle = _run(engine, "on", spec=GrammarSpec.choices(["yes", "no"]), max_tokens=30)
    assert turn.budget == 15  # THINKING_SHARE of max_tokens
    assert turn.split(handle.text)[1] in ("yes", "no")


def test_a_model_without_a_thinking_block_refuses_a_setting():
    class NoThinking:
        reasoning_format = None

        def chat_prompt(self, messages, **kwargs):
            return "prompt"

    assert plan_turn(NoThinking(), [], max_tokens=8).thinking is None
    with pytest.raises(ReasoningError, match="no thinking block"):
        plan_turn(NoThinking(), [], reasoning=ReasoningRequest("on"), max_tokens=8)


# ---- DSPy -------------------------------------------------------------------------------------


def test_chain_of_thought_and_native_reasoning_through_plait_lm(engine):
    lm = plait.LM(str(engine.directory), reasoning=16, cache=False, max_tokens=200)
    lm.engine._engine = engine  # the module's engine: no second load
    assert lm.supports_reasoning and lm.model.endswith("@reasoning-16")
    adapter = plait.ConstrainedAdapter(reasoning_tokens=16, text_tokens=16)
    with dspy.context(lm=lm, adapter=adapter):
        cot = dspy.ChainOfThought("question -> answer: int")(question="6 times 7?")
        assert isinstance(cot.answer, int) and isinstance(cot.reasoning, str)
        thought = lm.history[-1]["outputs"][0]
        assert thought["reasoning_content"]  # the model's own block, apart from the fields
        assert thought["text"].startswith("[[ ## reasoning ## ]]")  # the fields come after the block
        native = dspy.Predict("question -> reasoning: dspy.Reasoning, answer: int")(question="6 times 7?")
        assert isinstance(native.answer, int) and native.reasoning.content  # read from the block
        off = lm("6 times 7?", reasoning_effort="off")[0]
        assert isinstance(off, str)  # no block: plain text, no reasoning_content


# ---- plait serve and the remote engine ----------------------------------------------------------


@pytest.fixture(scope="module")
def served(engine):
    from plait.serve.app import create_app
    from plait.serve.config import ServeConfig
    from plait.serve.runtime import ServeRuntime
    from tests.serve_fixtures import ServerThread

    runtime = ServeRuntime(ServeConfig())
    runtime.load_model(str(engine.directory))
    with ServerThread(create_app(runtime)) as server:
        server.model = next(iter(runtime.models))
        server.switch = engine.reasoning_format.switch
        yield server
    runtime.close()


def _chat(server, **body):
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "6 times 7?"}],
        "max_tokens": 60,
        "temperature": 0,
        **body,
    }
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def test_openai_chat_returns_reasoning_content_apart(served):
    answer = _chat(
        served,
        max_thinking_tokens=6,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
    ).json()
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] is not None and "</think>" not in message["content"]
    assert set(json.loads(message["content"])) == {"answer", "sure"}
    off = _chat(served, reasoning_effort="off").json()["choices"][0]["message"]
    assert "reasoning_content" not in off
    budget = _chat(served, thinking_token_budget=4, max_tokens=20).json()["choices"][0]["message"]
    assert budget["reasoning_content"] is not None
    kwargs_off = _chat(served, chat_template_kwargs={"enable_thinking": False}).json()["choices"][0]
    assert ("reasoning_content" in kwargs_off["message"]) == (served.switch != "kwarg")  # its own switch


def test_openai_stream_sends_reasoning_in_its_own_deltas(served):
    body = {
        "model": served.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 30,
        "temperature": 0,
        "stream": True,
        "max_thinking_tokens": 5,
    }
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    streamed_thought = "".join(d.get("reasoning_content", "") for d in deltas)
    streamed_answer = "".join(d.get("content") or "" for d in deltas)
    whole = _chat(served, max_tokens=30, max_thinking_tokens=5, messages=[{"role": "user", "content": "hi"}])
    message = whole.json()["choices"][0]["message"]
    assert streamed_answer == message["content"]
    assert streamed_thought.strip() == message["reasoning_content"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"reasoning_effort": "lots"}, "invalid_reasoning"),
        ({"max_thinking_tokens": -1}, "invalid_request"),
        ({"chat_template_kwargs": {"messages": []}}, "invalid_chat_template_kwargs"),
        ({"chat_template_kwargs": {"1x": True}}, "invalid_chat_template_kwargs"),
    ],
)
def test_bad_reasoning_requests_are_4xx(served, body, code):
    response = _chat(served, **body)
    assert 400 <= response.status_code < 500 and response.json()["error"]["code"] == code


def test_the_remote_engine_sends_the_switch_and_reads_reasoning_back(served, engine):
    from plait.backends.clients.remote import reasoning_params

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert reasoning_params(ReasoningRequest("off"), "vllm", "kwarg", messages) == (
        {"chat_template_kwargs": {"enable_thinking": False}},
        messages,
    )
    extra, flagged = reasoning_params(ReasoningRequest("on", 32), "openai", "flag", messages)
    assert extra == {"max_thinking_tokens": 32} and flagged[0]["content"].endswith("/think")
    assert reasoning_params(ReasoningRequest("on", 32), "vllm", "kwarg", messages)[0] == {
        "thinking_token_budget": 32,
        "chat_template_kwargs": {"enable_thinking": True},
    }
    assert reasoning_params(ReasoningRequest(), "vllm", "kwarg", messages) == ({}, messages)

    lm = plait.LM(
        f"{served.url}/v1", model=served.model, reasoning=6, cache=False, max_tokens=30, temperature=0
    )
    assert lm.supports_reasoning
    lm("6 times 7?")
    assert lm.history[-1]["outputs"][0]["reasoning_content"] is not None


def test_plait_generate_prints_reasoning_to_stderr(engine, capsys):
    from plait.cli import main

    args = ["generate", "-m", str(engine.directory), "hi", "--reasoning", "4", "--max-tokens", "12"]
    assert main([*args, "--choice", "yes", "--choice", "no"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() in ("yes", "no") and out.err  # the answer alone on stdout
    assert main(["generate", "-m", str(engine.directory), "hi", "--raw", "--reasoning", "on"]) == 2
    assert main([*args[:-4], "--reasoning", "lots"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "--raw" in errors[0] and "reasoning must be one of" in errors[1]


def test_an_earlier_answers_reasoning_goes_back_to_the_template_not_into_its_content():
    from dspy.lm15 import Message, Request, TextPart, ThinkingPart

    from plait.backends.clients.messages import conversation
    from plait.backends.loading.tokenizer import Tokenizer
    from tests.chat_fixtures import write_chat_tokenizer

    request = Request(
        model="plait/x",
        messages=(
            Message.user("6 times 7?"),
            Message.assistant([ThinkingPart("six sevens"), TextPart("42")]),
            Message.user("and 6 times 8?"),
        ),
    )
    messages = conversation(request)
    assert messages[1] == {"role": "assistant", "content": "42", "reasoning_content": "six sevens"}
    with tempfile.TemporaryDirectory() as tmp:
        write_chat_tokenizer(Path(tmp), "nemotron3")
        tokenizer = Tokenizer.from_hf_dir(Path(tmp))
    kept = tokenizer.apply_chat_template(messages, truncate_history_thinking=False)
    dropped = tokenizer.apply_chat_template(messages)  # the template's default drops old thinking
    assert "<think>\nsix sevens\n</think>\n42" in kept and "six sevens" not in dropped
