"""The embedded SmolLM2 engine decoding under signature grammars, on real rows from
../shared/data: zero parse failures, and forced spans cut forward passes."""

from __future__ import annotations

import enum
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import dspy
import pydantic
import pytest

from plait.backends.grammar.constraint import compile_constraint
from plait.modules.signature_grammar import GrammarOptions, chat_grammar

pytestmark = pytest.mark.slow


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"
    MIXED = "mixed"


class Verdict(pydantic.BaseModel):
    stars: int = pydantic.Field(ge=1, le=5)
    headline: str = pydantic.Field(max_length=30)
    tags: list[str] = pydantic.Field(max_length=3)


class ReviewSignature(dspy.Signature):
    """Classify the movie review."""

    text: str = dspy.InputField()
    sentiment: Literal["negative", "positive"] = dspy.OutputField()
    confidence: float = dspy.OutputField(ge=0, le=1)
    positive: bool = dspy.OutputField()
    mood: Mood = dspy.OutputField()
    verdict: Verdict = dspy.OutputField()
    note: int | None = dspy.OutputField()


def _rows(data_dir, name: str, count: int) -> list[dict]:
    with open(data_dir / name / "dev.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def _cases(data_dir) -> list[tuple[type[dspy.Signature], dict]]:
    sst2 = [(ReviewSignature, {"text": r["text"]}) for r in _rows(data_dir, "sst2", 4)]
    squad_sig = dspy.Signature("context, question -> answer")
    squad = [
        (squad_sig, {"context": r["context"][:1200], "question": r["question"]})
        for r in _rows(data_dir, "squad", 3)
    ]
    cot = dspy.ChainOfThought("question -> answer: int").predict.signature
    gsm8k = [(cot, {"question": r["question"]}) for r in _rows(data_dir, "gsm8k", 3)]
    return sst2 + squad + gsm8k


def _generate(engine, signature, inputs, max_tokens=200):
    messages = dspy.ChatAdapter().format(signature, [], inputs)
    spec = chat_grammar(
        signature, GrammarOptions(max_tokens=max_tokens, text_tokens=48, reasoning_tokens=96, grace_tokens=16)
    )
    constraint = compile_constraint(spec, engine.tokenizer)
    return engine.chat(messages, constraint=constraint, max_tokens=max_tokens, temperature=0.7, seed=1)


def test_zero_parse_failures_on_real_rows(smollm, data_dir):
    cases = _cases(data_dir)
    with ThreadPoolExecutor(4) as pool:  # the scheduler batches the concurrent requests
        results = list(pool.map(lambda case: _generate(smollm, *case), cases))
    for (signature, _), result in zip(cases, results):
        assert result.finish_reason == "stop", result.text
        parsed = dspy.ChatAdapter().parse(signature, result.text)
        for name, info in signature.output_fields.items():
            target = info.annotation
            pydantic.TypeAdapter(target).validate_python(parsed[name])
        if signature is ReviewSignature:
            assert 0 <= parsed["confidence"] <= 1


def test_forced_spans_cut_forward_passes(smollm, data_dir):
    signature, inputs = _cases(data_dir)[0]
    usage = _generate(smollm, signature, inputs).usage
    assert usage.forced_tokens > usage.sampled_tokens
    assert usage.forward_passes < 0.6 * usage.completion_tokens


# ---- the whole DSPy path: plait.LM + ConstrainedAdapter --------------------------------------------


@pytest.fixture(scope="module")
def plait_lm(smollm):
    from plait.backends.clients.local import LM

    lm = LM("smollm2-135m", cache=False, max_tokens=256, temperature=0.7)
    lm.engine._engine = smollm  # share the session's loaded engine instead of loading a second copy
    return lm


def test_dspy_predict_and_chain_of_thought_parse_first_try(plait_lm, data_dir):
    from plait.modules.adapter import ConstrainedAdapter

    classify = dspy.Predict("text -> sentiment: Literal['negative', 'positive'], confidence: float")
    solve = dspy.ChainOfThought("question -> answer: int")
    with dspy.context(lm=plait_lm, adapter=ConstrainedAdapter(reasoning_tokens=64)):
        for row in _rows(data_dir, "sst2", 3):
            out = classify(text=row["text"])
            assert out.sentiment in ("negative", "positive") and isinstance(out.confidence, float)
        for row in _rows(data_dir, "gsm8k", 2):
            out = solve(question=row["question"])
            assert isinstance(out.answer, int) and isinstance(out.reasoning, str)
    assert len(plait_lm.history) == 5  # one call each: no JSON fallback


def test_react_with_two_tools_completes_and_tool_calls_validate(plait_lm):
    import jsonschema

    from plait.modules.adapter import ConstrainedAdapter
    from plait.modules.signature_grammar import react_tool_schemas

    def lookup_capital(country: str) -> str:
        """Return the capital city of a country."""
        return {"france": "Paris", "japan": "Tokyo"}.get(country.lower(), "unknown")

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    react = dspy.ReAct("question -> answer", tools=[lookup_capital, multiply], max_iters=3)
    schemas = react_tool_schemas(react.react.signature)
    with dspy.context(lm=plait_lm, adapter=ConstrainedAdapter(text_tokens=24, reasoning_tokens=32)):
        for question in ["What is the capital of France?", "What is 6 times 7?"]:
            out = react(question=question)
            assert isinstance(out.answer, str) and out.answer
            for key, value in out.trajectory.items():
                if key.startswith("tool_name"):
                    jsonschema.validate(out.trajectory[key.replace("name", "args")], schemas[value])
                if key.startswith("observation"):
                    assert "Execution error" not in str(value)
