"""Constrained decoding on the real SmolLM2 tokenizer with random logits.

The central property: whatever the logits, an answer decoded under a signature's grammar
parses with DSPy's own ChatAdapter (and JSONAdapter in JSON mode) and every value validates
with pydantic, bounds included.
"""

from __future__ import annotations

import enum
import itertools
import string
from collections.abc import Callable
from typing import Annotated, Any, Literal, Optional

import dspy
import pydantic
import pytest
import torch
from dspy.lm15 import Config, Message, Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.backends.grammar.constraint import GrammarViolationError, apply_masks, compile_constraint
from plait.backends.grammar.spec import FieldBudget, GrammarError, GrammarSpec, grammar_spec_from_request
from plait.backends.grammar.vocab import vocabulary_for
from plait.modules.signature_grammar import GrammarOptions, chat_grammar, json_grammar
from tests.constrained_fixtures import drive, smollm2_tokenizer

TOKENIZER = smollm2_tokenizer()
EOS = 2
_names = itertools.count()

# ---- random output types ---------------------------------------------------------------------

_WORD = st.text(alphabet=string.ascii_letters + string.digits + "_-'\" ", min_size=0, max_size=10)


@st.composite
def literal_types(draw) -> Any:
    if draw(st.booleans()):
        values = draw(st.lists(_WORD, min_size=1, max_size=4, unique=True))
    else:
        values = draw(st.lists(st.integers(-50, 50), min_size=1, max_size=4, unique=True))
    return Literal[tuple(values)]


@st.composite
def enum_types(draw) -> type[enum.Enum]:
    names = draw(
        st.lists(
            st.sampled_from(["RED", "GREEN", "BLUE", "CYAN", "GREY"]), min_size=1, max_size=4, unique=True
        )
    )
    if draw(st.booleans()):
        members = {n: n.lower() + "!" for n in names}
    else:
        members = {n: i for i, n in enumerate(names)}
    return enum.Enum(f"E{next(_names)}", members)


def _bounded_int(draw) -> Any:
    lo = draw(st.integers(-1000, 1000))
    hi = lo + draw(st.integers(0, 500))
    return Annotated[int, pydantic.Field(ge=lo, le=hi)]


@st.composite
def json_types(draw, depth: int = 0) -> Any:
    """Types DSPy writes as JSON in the chat format (and every type in JSON mode)."""
    leaves = [st.just(int), st.just(float), st.just(bool), st.just(str), literal_types()]
    if depth >= 2:
        return draw(st.one_of(leaves))
    kind = draw(st.sampled_from(["leaf", "leaf", "list", "optional", "dict", "model", "bounded"]))
    if kind == "leaf":
        return draw(st.one_of(leaves))
    if kind == "bounded":
        return _bounded_int(draw)
    inner = draw(json_types(depth + 1))
    if kind == "list":
        return list[inner]
    if kind == "optional":
        return Optional[inner]  # noqa: UP045 (typing.Optional, as DSPy users write it)
    if kind == "dict":
        return dict[str, inner]
    fields = {}
    for i in range(draw(st.integers(1, 3))):
        bound = draw(st.sampled_from(["none", "len", "num"]))
        annotation = draw(json_types(depth + 1))
        if bound == "len":
            annotation, info = str, pydantic.Field(max_length=draw(st.integers(1, 12)))
        elif bound == "num":
            annotation, info = float, pydantic.Field(ge=-1.5, le=draw(st.floats(0, 100)))
        else:
            info = pydantic.Field()
        fields[f"a{i}"] = (annotation, info)
    return pydantic.create_model(f"Model{next(_names)}", **fields)


@st.composite
def output_fields(draw) -> tuple[Any, dict[str, Any]]:
    """(annotation, OutputField kwargs) of one chat-format output field."""
    kind = draw(
        st.sampled_from(
            [
                "str",
                "optional_str",
                "int",
                "float",
                "bool",
                "literal",
                "enum",
                "optional_int",
                "bounded",
                "json",
                "json",
            ]
        )
    )
    if kind == "str":
        return str, {}
    if kind == "optional_str":
        return Optional[str], {}  # noqa: UP045
    if kind == "int":
        return int, {}
    if kind == "float":
        return float, {}
    if kind == "bool":
        return bool, {}
    if kind == "literal":
        return draw(literal_types()), {}
    if kind == "enum":
        return draw(enum_types()), {}
    if kind == "optional_int":
        return Optional[int], {}  # noqa: UP045
    if kind == "bounded":
        lo = draw(st.integers(-100, 100))
        return int, {"ge": lo, "le": lo + draw(st.integers(0, 50))}
    return draw(json_types()), {}


@st.composite
def signatures(draw) -> type[dspy.Signature]:
    fields: dict[str, Any] = {"question": (str, dspy.InputField())}
    if draw(st.booleans()):
        fields["reasoning"] = (str, dspy.OutputField())
    for i in range(draw(st.integers(1, 4))):
        annotation, kwargs = draw(output_fields())
        fields[f"out_{i}"] = (annotation, dspy.OutputField(**kwargs))
    return dspy.Signature(fields, "Answer.")


def validate_outputs(signature: type[dspy.Signature], parsed: dict[str, Any]) -> None:
    """Every output field present, and its value valid for the annotation *and* its bounds."""
    assert parsed.keys() == signature.output_fields.keys()
    for name, info in signature.output_fields.items():
        target = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        pydantic.TypeAdapter(target).validate_python(parsed[name])


OPTIONS = GrammarOptions(text_tokens=24, reasoning_tokens=40, grace_tokens=6)
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- the property -------------------------------------------------------------------------------


@PROPERTY
@given(signature=signatures(), seed=st.integers(0, 2**31))
def test_chat_format_always_parses_and_validates(signature, seed):
    spec = chat_grammar(signature, OPTIONS)
    run = drive(compile_constraint(spec, TOKENIZER), TOKENIZER, seed)
    assert run.finished, run.text(TOKENIZER)
    text = run.text(TOKENIZER)
    parsed = dspy.ChatAdapter().parse(signature, text)
    validate_outputs(signature, parsed)
    # the markers are in the order ChatAdapter asks for, then the completed marker
    positions = [text.index(f"[[ ## {name} ## ]]") for name in signature.output_fields]
    assert positions == sorted(positions) and text.rstrip().endswith("[[ ## completed ## ]]")


@PROPERTY
@given(signature=signatures(), seed=st.integers(0, 2**31))
def test_json_mode_always_parses_and_validates(signature, seed):
    spec = json_grammar(signature, OPTIONS)
    run = drive(compile_constraint(spec, TOKENIZER), TOKENIZER, seed)
    assert run.finished, run.text(TOKENIZER)
    validate_outputs(signature, dspy.JSONAdapter().parse(signature, run.text(TOKENIZER)))


# ---- jump-forward, budgets, stop tokens --------------------------------------------------------------


def test_markers_are_forced_in_one_span_each():
    signature = dspy.Signature("text -> sentiment: Literal['negative', 'positive'], confidence: float")
    spec = chat_grammar(signature)
    constraint = compile_constraint(spec, TOKENIZER)
    first = constraint.forced()
    assert TOKENIZER.decode(first) == "[[ ## sentiment ## ]]\n"
    run = drive(compile_constraint(spec, TOKENIZER), TOKENIZER, seed=3)
    # markers, the rest of a chosen literal and the completed marker are all forced
    assert run.forced > 2 * run.sampled
    assert run.passes < run.sampled + run.forced


def tokens_between(ids: list[int], start: bytes, end: bytes) -> int:
    """How many generated tokens lie wholly between the first `start` and the next `end`."""
    pieces = vocabulary_for(TOKENIZER).token_bytes
    ends = list(itertools.accumulate(len(pieces[t]) for t in ids))
    text = b"".join(pieces[t] for t in ids)
    lo = text.index(start) + len(start)
    hi = text.index(end, lo)
    return sum(1 for i, e in enumerate(ends) if e - len(pieces[ids[i]]) >= lo and e <= hi)


def test_free_text_budget_closes_at_a_newline_within_grace():
    signature = dspy.Signature("question -> reasoning: str, answer: bool")
    spec = chat_grammar(signature, GrammarOptions(reasoning_tokens=10, grace_tokens=5))
    for seed in range(5):
        constraint = compile_constraint(spec, TOKENIZER)
        run = drive(constraint, TOKENIZER, seed, structural=0.0)
        # budget + grace, plus at most 3 tokens to finish a UTF-8 character the budget split
        assert 1 <= tokens_between(run.ids, b"[[ ## reasoning ## ]]\n", b"\n\n[[") <= 10 + 5 + 3
        dspy.ChatAdapter().parse(signature, run.text(TOKENIZER))
        assert constraint.budget_closes == 1


def test_budget_counts_only_inside_its_span():
    spec = GrammarSpec.lark(
        'start: "<a>" /[a-z ]+/ "</a>" /[0-9]{40}/', [FieldBudget("<a>", max_tokens=3, close="</a>")]
    )
    for seed in range(3):
        constraint = compile_constraint(spec, TOKENIZER)
        run = drive(constraint, TOKENIZER, seed, structural=0.0)
        assert 1 <= tokens_between(run.ids, b"<a>", b"</a>") <= 3 + 3
        assert constraint.budget_closes == 1  # the 40 digits after the span are never cut


def test_runaway_json_and_numbers_are_ended_at_their_budget():
    """Without the structural bias, random tokens almost never close a string or stop a
    number: the value budgets end them (unwinding `"`, `]`, `}`) so the answer still parses."""
    signature = dspy.Signature("question -> items: list[str], score: float, info: dict[str, list[str]]")
    spec = chat_grammar(signature, GrammarOptions(value_tokens=12, number_tokens=5))
    for seed in range(4):
        run = drive(compile_constraint(spec, TOKENIZER), TOKENIZER, seed, max_tokens=400, structural=0.0)
        assert run.finished and run.sampled <= 3 * (12 + 3) + 5 + 3
        validate_outputs(signature, dspy.ChatAdapter().parse(signature, run.text(TOKENIZER)))


def test_a_budget_with_no_open_text_starts_at_once():
    """A thinking budget: `<think>` is in the prompt, the output starts inside the span."""
    spec = GrammarSpec.lark('start: /[a-z ]+/ "</think>" /[0-9]{3}/', [FieldBudget("", 4, "</think>")])
    constraint = compile_constraint(spec, TOKENIZER)
    run = drive(constraint, TOKENIZER, seed=1, structural=0.0)
    assert constraint.budget_closes == 1 and run.text(TOKENIZER).count("</think>") == 1
    assert tokens_between([*TOKENIZER.encode("<s>"), *run.ids], b"<s>", b"</think>") <= 4 + 3


def test_stop_token_only_where_the_grammar_may_end():
    constraint = compile_constraint(GrammarSpec.regex("[0-9]+"), TOKENIZER)
    assert not constraint.mask()[EOS]
    digit = TOKENIZER.encode("7")
    constraint.advance(digit)
    assert constraint.mask()[EOS] and not constraint.is_finished()
    constraint.advance([EOS])
    assert constraint.is_finished()


def test_choices_finish_without_a_stop_token():
    constraint = compile_constraint(["yes", "no"], TOKENIZER)
    mask = constraint.mask()
    assert mask[TOKENIZER.encode("yes")[0]] and not mask[TOKENIZER.encode("maybe")[0]]
    constraint.advance(TOKENIZER.encode("no"))
    assert constraint.is_finished()


def test_rejected_token_raises():
    constraint = compile_constraint(GrammarSpec.regex("[0-9]+"), TOKENIZER)
    with pytest.raises(GrammarViolationError):
        constraint.advance(TOKENIZER.encode("x"))


def test_ids_beyond_the_tokenizer_are_never_allowed():
    constraint = compile_constraint({"type": "string"}, TOKENIZER, vocab_size=TOKENIZER.vocab_size + 64)
    mask = constraint.mask()
    assert mask.shape == (TOKENIZER.vocab_size + 64,) and not mask[TOKENIZER.vocab_size :].any()


def test_batched_masks_equal_row_masks():
    specs = [GrammarSpec.regex("[0-9]+"), ["yes", "no"], None, {"type": "object"}]
    constraints = [None if s is None else compile_constraint(s, TOKENIZER) for s in specs]
    logits = torch.zeros(len(specs), TOKENIZER.vocab_size)
    apply_masks(logits, constraints)
    for row, c in zip(logits, constraints):
        expected = torch.ones(TOKENIZER.vocab_size, dtype=torch.bool) if c is None else c.mask()
        assert torch.equal(row > float("-inf"), expected)


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        (GrammarSpec.lark("start: undefined_rule"), "unknown name"),
        (GrammarSpec.regex("a(b"), "unclosed group"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum"),
        ({"type": "no-such-type"}, "type"),
    ],
)
def test_bad_grammars_raise_a_clear_grammar_error(spec, message):
    with pytest.raises(GrammarError, match=message):
        compile_constraint(spec, TOKENIZER)


def test_bad_specs_raise_grammar_error():
    with pytest.raises(GrammarError):
        GrammarSpec.choices([])
    with pytest.raises(GrammarError):
        GrammarSpec.from_json({"kind": "ebnf", "source": "x"})
    with pytest.raises(GrammarError):
        FieldBudget("<a>", 3, "")


def test_unschematisable_output_type_raises_grammar_error():
    signature = dspy.Signature(
        {"q": (str, dspy.InputField()), "o": (Callable[[int], int], dspy.OutputField())}, "x"
    )
    with pytest.raises(GrammarError, match="JSON schema"):
        chat_grammar(signature)


# ---- the spec on the wire ------------------------------------------------------------------------------


def _request(**config: Any) -> Request:
    return Request(model="plait/x", messages=(Message.user("hi"),), config=Config(**config))


def test_spec_round_trips_through_json_and_requests():
    spec = chat_grammar(dspy.Signature("q -> reasoning, answer: int"))
    assert GrammarSpec.from_json(spec.to_json()) == spec
    assert grammar_spec_from_request(_request(extensions={"plait_grammar": spec.to_json()})) == spec
    assert (
        grammar_spec_from_request(_request(extensions={"metadata": {"plait_grammar": spec.to_json()}}))
        == spec
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    from_format = grammar_spec_from_request(
        _request(response_format={"type": "json_schema", "schema": schema})
    )
    assert from_format == GrammarSpec.json_schema(schema)
    assert grammar_spec_from_request(_request()) is None


def test_compiled_grammars_are_cached_per_spec():
    from plait.backends.grammar.constraint import _compiled_for

    spec = GrammarSpec.regex("[ab][0-9]")
    compile_constraint(spec, TOKENIZER)
    assert spec.key in _compiled_for(TOKENIZER, None).matchers
    a, b = compile_constraint(spec, TOKENIZER), compile_constraint(spec, TOKENIZER)
    a.advance(TOKENIZER.encode("a"))  # copies do not share state
    assert b.mask()[TOKENIZER.encode("a")[0]] and not a.mask()[TOKENIZER.encode("a")[0]]


def test_batched_masks_accept_wrapped_constraints():
    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def mask(self):
            return self.inner.mask()

    inner = compile_constraint(["yes", "no"], TOKENIZER)
    logits = torch.zeros(2, TOKENIZER.vocab_size + 8)
    apply_masks(logits, [Wrapped(inner), compile_constraint(["yes", "no"], TOKENIZER)])
    assert torch.equal(logits[0] > float("-inf"), logits[1] > float("-inf"))
    assert torch.equal((logits[0] > float("-inf"))[: TOKENIZER.vocab_size], inner.mask())
