"""ConstrainedAdapter through DSPy's real LM layer: the grammar rides in the Request, an engine
decodes under it (here random logits on the SmolLM2 tokenizer), ChatAdapter's parser reads it.
No JSON fallback call is ever made."""

from __future__ import annotations

import enum
from typing import Literal

import dspy
import jsonschema
import pydantic
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.utils.exceptions import AdapterParseError

from plait.backends.grammar.spec import GrammarError, grammar_spec_from_request
from plait.modules.adapter import ConstrainedAdapter, ConstrainedJSONAdapter
from plait.modules.signature_grammar import GrammarOptions, chat_grammar, react_tool_schemas
from tests.constrained_fixtures import RandomGrammarEngine, smollm2_tokenizer

TOKENIZER = smollm2_tokenizer()


def grammar_lm(seed: int = 0, **kwargs) -> tuple[dspy.LM, RandomGrammarEngine]:
    engine = RandomGrammarEngine(TOKENIZER, seed)
    return dspy.LM("plait/random", engine=engine, cache=False, num_retries=0, **kwargs), engine


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class Review(pydantic.BaseModel):
    stars: int = pydantic.Field(ge=1, le=5)
    summary: str = pydantic.Field(max_length=20)


def test_typed_predict_always_parses_first_try():
    lm, engine = grammar_lm()
    cls = dspy.Predict("text -> sentiment: Literal['negative', 'positive'], confidence: float")
    with dspy.context(lm=lm, adapter=ConstrainedAdapter()):
        for i in range(8):
            out = cls(text=f"a gorgeous, witty film #{i}")
            assert out.sentiment in ("negative", "positive") and isinstance(out.confidence, float)
    assert len(engine.requests) == 8  # one call per prediction: no JSON fallback


def test_the_grammar_travels_in_request_metadata():
    lm, engine = grammar_lm(max_tokens=300)

    class Sig(dspy.Signature):
        """Rate the review."""

        review: str = dspy.InputField()
        mood: Mood = dspy.OutputField()
        rating: Review = dspy.OutputField()

    with dspy.context(lm=lm, adapter=ConstrainedAdapter(text_tokens=40)):
        out = dspy.Predict(Sig)(review="fine")
    assert isinstance(out.mood, Mood) and 1 <= out.rating.stars <= 5 and len(out.rating.summary) <= 20
    request = engine.requests[0]
    assert "plait_grammar" in request.config.extensions["metadata"]
    expected = chat_grammar(Sig, GrammarOptions(text_tokens=40, max_tokens=300))
    assert grammar_spec_from_request(request) == expected


def test_chain_of_thought_reasoning_respects_its_budget():
    lm, engine = grammar_lm()
    cot = dspy.ChainOfThought("question -> answer: int")
    with dspy.context(lm=lm, adapter=ConstrainedAdapter(reasoning_tokens=12, grace_tokens=4)):
        for i in range(4):
            out = cot(question=f"2+{i}?")
            assert isinstance(out.answer, int) and out.reasoning
    for run in engine.runs:
        # the budget: 12 tokens, then a newline within 4 more, else the field is closed
        # (+3 tokens at most to finish a UTF-8 character, + the close and markers)
        assert run.sampled <= 12 + 4 + 3 + 40


def test_budgets_shrink_to_fit_max_tokens():
    signature = dspy.Signature("question -> reasoning, answer")
    spec = chat_grammar(
        signature, GrammarOptions(text_tokens=256, reasoning_tokens=512, grace_tokens=8, max_tokens=200)
    )
    assert sum(b.max_tokens + b.grace for b in spec.budgets) <= 200


def test_react_tool_calls_always_validate():
    calls: list[tuple[str, dict]] = []

    def search(query: str, limit: int = 3) -> str:
        """Search the web."""
        calls.append(("search", {"query": query, "limit": limit}))
        return "nothing found"

    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append(("add", {"a": a, "b": b}))
        return a + b

    react = dspy.ReAct("question -> answer: str", tools=[search, add], max_iters=4)
    schemas = react_tool_schemas(react.react.signature)
    assert set(schemas) == {"search", "add", "finish"}
    assert schemas["add"]["required"] == ["a", "b"] and schemas["search"]["required"] == ["query"]
    for seed in range(3):
        lm, _engine = grammar_lm(seed)
        with dspy.context(lm=lm, adapter=ConstrainedAdapter(text_tokens=16, reasoning_tokens=16)):
            out = react(question="what is 2 + 3?")
        assert out.answer
        for key, value in out.trajectory.items():
            if key.startswith("tool_name"):
                args = out.trajectory[key.replace("name", "args")]
                jsonschema.validate(args, schemas[value])
            if key.startswith("observation"):
                assert "Execution error" not in str(value)
    assert calls, "no tool was ever called"


def test_json_adapter_mode():
    lm, engine = grammar_lm()
    signature = dspy.Signature("text -> label: Literal['a', 'b'], score: float, tags: list[str]")
    with dspy.context(lm=lm, adapter=ConstrainedJSONAdapter(text_tokens=8)):
        out = dspy.Predict(signature)(text="x")
    assert out.label in ("a", "b") and isinstance(out.score, float) and isinstance(out.tags, list)
    assert engine.requests[0].config.response_format is None  # the grammar replaces it


def test_an_lm_without_grammar_support_is_refused():
    lm = dspy.utils.DummyLM([{"answer": "4"}])
    with dspy.context(lm=lm, adapter=ConstrainedAdapter()), pytest.raises(GrammarError, match="plait.LM"):
        dspy.Predict("question -> answer")(question="2+2?")
    with dspy.context(lm=lm, adapter=ConstrainedAdapter(require_grammar_engine=False)):
        assert dspy.Predict("question -> answer")(question="2+2?").answer == "4"


class _Garbage(RandomGrammarEngine):
    """An engine that ignores the grammar: shows the adapter never retries in JSON mode."""

    def complete(self, request):
        self.requests.append(request)
        return Response(
            id=None,
            model=request.model,
            message=Message(role="assistant", parts=(TextPart("oops"),)),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1),
        )


def test_no_json_fallback_call():
    engine = _Garbage(TOKENIZER)
    lm = dspy.LM("plait/garbage", engine=engine, cache=False, num_retries=0)
    with dspy.context(lm=lm, adapter=ConstrainedAdapter()), pytest.raises(AdapterParseError):
        dspy.Predict("question -> answer: int")(question="?")
    assert len(engine.requests) == 1


def test_literal_tool_name_branches_pick_the_matching_schema():
    signature = dspy.Signature(
        {
            "question": (str, dspy.InputField()),
            "next_thought": (str, dspy.OutputField()),
            "next_tool_name": (Literal["add", "finish"], dspy.OutputField()),
            "next_tool_args": (dict, dspy.OutputField()),
        },
        "(1) add, whose description is <desc>Add.</desc>. It takes arguments {'a': {'type': 'integer'}}.\n"
        "(2) finish, whose description is <desc>Done.</desc>. It takes arguments {}.",
    )
    source = chat_grammar(signature).source
    assert source.count("%json") == 2 and '"add"' in source and '"finish"' in source


def test_a_text_field_cannot_be_only_its_own_placeholder():
    """ChatAdapter's system prompt shows `[[ ## answer ## ]]\\n{answer}`; small models copy it."""
    from plait.backends.grammar.constraint import compile_constraint

    signature = dspy.ChainOfThought("question -> answer").predict.signature

    def accepts(options: GrammarOptions, answer: str) -> bool:
        constraint = compile_constraint(chat_grammar(signature, options), TOKENIZER)
        text = f"[[ ## reasoning ## ]]\nsome thought\n\n[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
        ids = TOKENIZER.encode(text)
        return constraint._matcher.validate_tokens(ids) == len(ids)

    assert not accepts(GrammarOptions(), "{answer}")
    assert not accepts(GrammarOptions(), "{answer}  ")
    assert accepts(GrammarOptions(), "{answer} is 4")  # the placeholder inside a real value is text
    assert accepts(GrammarOptions(), "{reasoning}")  # only a field's own placeholder is refused
    assert accepts(GrammarOptions(forbid_placeholders=False), "{answer}")


def _weather(city: str, days: int = 1) -> str:
    """The forecast of a city."""
    return f"sunny in {city} for {days} days"


def _convert(amount: float, currency: str) -> str:
    """Convert an amount of euros."""
    return f"{amount} {currency}"


@pytest.mark.parametrize("adapter", [ConstrainedAdapter, ConstrainedJSONAdapter])
def test_a_tool_calls_output_calls_only_the_offered_tools(adapter):
    """Issue 20: names like 'weather, whose description is ...' came back and execute() failed."""
    tools = [dspy.Tool(_weather), dspy.Tool(_convert)]
    schemas = {t.name: t.args for t in tools}

    class Plan(dspy.Signature):
        """Call the tools that answer the question."""

        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        calls: dspy.ToolCalls = dspy.OutputField()

    names = set()
    for seed in range(4):
        lm, _ = grammar_lm(seed, max_tokens=400)
        with dspy.context(lm=lm, adapter=adapter(text_tokens=16)):
            calls = dspy.Predict(Plan)(question="Weather in Oslo?", tools=tools).calls
        for call in calls.tool_calls:
            names.add(call.name)
            assert call.name in schemas
            jsonschema.validate(call.args, {"type": "object", "properties": schemas[call.name]})
            assert call.execute(functions=tools)  # runs the real function with those arguments
    assert names  # at least one call was made across the seeds
