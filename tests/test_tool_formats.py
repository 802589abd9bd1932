"""Tool calls in the models' own formats, without a model: every answer decoded under a format's
grammar (random logits, the engine's sampling loop) parses back into calls whose arguments
validate against their tools' schemas, within the request's `max_tokens`; what a format
renders, its grammar accepts and its parser reads back.

Tokenizers: the tiny dialect checkpoints' (256 bytes + the dialect's added tokens, so markers
such as `<TOOLCALL>` are one token) and the embedded SmolLM2's (byte-level BPE, 49k tokens).
"""

from __future__ import annotations

import jsonschema
import llguidance as llg
import pytest

from plait.backends.grammar.constraint import compile_constraint, llguidance_grammar, llguidance_tokenizer
from plait.backends.grammar.reasoning import ReasoningFormat, split_thinking, thinking_grammar
from plait.backends.grammar.spec import FieldBudget, GrammarError, GrammarSpec
from plait.backends.grammar.tool_formats import (
    JSON_NOTE,
    NANO_V2,
    QWEN3_XML,
    ParsedTurn,
    ToolCall,
    ToolFormat,
    detect_tool_format,
    tool_specs,
)
from plait.backends.loading.tokenizer import Tokenizer
from tests.chat_fixtures import TEMPLATES, write_chat_tokenizer
from tests.constrained_fixtures import drive, smollm2_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer"},
                "b": {"type": "integer"},
                "note": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            },
            "required": ["a", "b"],
        },
    },
]
SCHEMAS = {s.name: s.parameters for s in tool_specs(TOOLS)}
FORMATS = [NANO_V2, QWEN3_XML, JSON_NOTE]
DIALECT = {"nano_v2": "nano_v2", "qwen3_xml": "nemotron3", "json": "nano_v2"}
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def dialect_tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    tokenizers = {}
    for dialect in ("nano_v2", "nemotron3"):
        directory = tmp_path_factory.mktemp(dialect)
        write_chat_tokenizer(directory, dialect)
        tokenizers[dialect] = Tokenizer.from_hf_dir(directory)
    return tokenizers


@pytest.fixture(params=["dialect", "smollm2"])
def tokenizer_for(request, dialect_tokenizers):
    """The tokenizer a format is tested on: its dialect's (markers are tokens) or SmolLM2's."""
    if request.param == "smollm2":
        return lambda fmt: smollm2_tokenizer()
    return lambda fmt: dialect_tokenizers[DIALECT[fmt.name]]


def _valid(parsed: ParsedTurn, allowed: set[str] | None = None) -> None:
    assert parsed.calls, parsed
    for call in parsed.calls:
        assert call.name in (allowed or SCHEMAS)
        jsonschema.validate(call.arguments, SCHEMAS[call.name])


def _accepts(spec: GrammarSpec, tokenizer: Tokenizer, text: str) -> bool:
    """Whether llguidance takes `text` (canonically tokenized) as a complete answer."""
    matcher = llg.LLMatcher(llguidance_tokenizer(tokenizer), llguidance_grammar(spec), log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text)) and matcher.is_accepting()


# ---- detection ------------------------------------------------------------------------------------


def test_the_format_is_read_from_the_chat_template():
    assert detect_tool_format(TEMPLATES["nano_v2"]) is NANO_V2
    assert detect_tool_format(TEMPLATES["nemotron3"]) is QWEN3_XML
    assert detect_tool_format(smollm2_tokenizer().chat_template) is JSON_NOTE
    assert detect_tool_format(None) is JSON_NOTE
    qwen3_json = (
        "{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>\n{{ call | tojson }}\n</tool_call>"
    )
    assert detect_tool_format(qwen3_json) is JSON_NOTE  # JSON inside <tool_call>: not the XML format
    assert NANO_V2.native and QWEN3_XML.native and not JSON_NOTE.native


# ---- every decoded answer parses ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_required_calls_always_parse_and_validate_within_max_tokens(fmt: ToolFormat, tokenizer_for):
    tokenizer = tokenizer_for(fmt)
    spec = fmt.grammar(TOOLS, required=True, max_tokens=MAX_TOKENS)
    names = set()
    for seed in range(10):
        run = drive(compile_constraint(spec, tokenizer, max_tokens=MAX_TOKENS), tokenizer, seed, MAX_TOKENS)
        assert run.finished and len(run.ids) <= MAX_TOKENS, run.text(tokenizer)
        parsed = fmt.parse(run.text(tokenizer), TOOLS)
        _valid(parsed)
        assert parsed.text == ""
        names |= {c.name for c in parsed.calls}
    assert names == set(SCHEMAS)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_tool_choice_narrows_the_calls(fmt: ToolFormat, dialect_tokenizers):
    tokenizer = dialect_tokenizers[DIALECT[fmt.name]]
    spec = fmt.grammar(TOOLS, required=True, allowed=("add",), parallel=False, max_tokens=MAX_TOKENS)
    for seed in range(4):
        run = drive(compile_constraint(spec, tokenizer, max_tokens=MAX_TOKENS), tokenizer, seed, MAX_TOKENS)
        parsed = fmt.parse(run.text(tokenizer), TOOLS)
        _valid(parsed, {"add"})
        assert len(parsed.calls) == 1


@pytest.mark.parametrize("fmt", [NANO_V2, QWEN3_XML], ids=lambda f: f.name)
def test_several_calls_per_turn(fmt: ToolFormat, dialect_tokenizers):
    """With room, a model may write more than one call; each parses and validates."""
    tokenizer = dialect_tokenizers[DIALECT[fmt.name]]
    spec = fmt.grammar(TOOLS, required=True, allowed=("add",), max_tokens=600)
    most = 0
    for seed in range(8):
        run = drive(compile_constraint(spec, tokenizer, max_tokens=600), tokenizer, seed, 600)
        assert run.finished
        parsed = fmt.parse(run.text(tokenizer), TOOLS)
        _valid(parsed, {"add"})
        most = max(most, len(parsed.calls))
    assert most >= 2


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_auto_is_plain_text_or_a_valid_call(fmt: ToolFormat, dialect_tokenizers):
    tokenizer = dialect_tokenizers[DIALECT[fmt.name]]
    spec = fmt.grammar(TOOLS, max_tokens=MAX_TOKENS)
    for seed in range(3):  # random text: never a call, never the call marker
        run = drive(compile_constraint(spec, tokenizer, max_tokens=MAX_TOKENS), tokenizer, seed, 40)
        text = run.text(tokenizer)
        assert fmt.opener not in text and fmt.parse(text, TOOLS) == ParsedTurn(text)
    for seed in range(4):  # once the model opens a call, it finishes a valid one in time
        constraint = compile_constraint(spec, tokenizer, max_tokens=MAX_TOKENS)
        opener = tokenizer.encode(fmt.opener)
        constraint.advance(opener)
        run = drive(constraint, tokenizer, seed, MAX_TOKENS - len(opener))
        assert run.finished
        _valid(fmt.parse(fmt.opener + run.text(tokenizer), TOOLS))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_the_plain_answer_can_be_the_requests_own_grammar(fmt: ToolFormat, dialect_tokenizers):
    """Beside the calls, the answer the request asks for otherwise (a JSON schema here, a
    signature's grammar with its budgets in DSPy): tool calls never make it unparseable."""
    tokenizer = dialect_tokenizers[DIALECT[fmt.name]]
    answer = GrammarSpec.lark('start: "A=" NUM\nNUM: /[0-9]{1,3}/', [FieldBudget("A=", 3, "\n")])
    spec = fmt.grammar(TOOLS, answer=answer, max_tokens=MAX_TOKENS)
    assert answer.budgets[0] in spec.budgets
    assert _accepts(spec, tokenizer, "A=42") and not _accepts(spec, tokenizer, "hello")
    schema = GrammarSpec.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    assert _accepts(fmt.grammar(TOOLS, answer=schema), tokenizer, '{"x": 3}')


def test_calls_after_a_thinking_block_still_end_within_max_tokens(dialect_tokenizers):
    """The reasoning budget's grammar wraps the calls; the calls' budget counts from the
    output's start, so thinking first still leaves a complete call."""
    tokenizer = dialect_tokenizers["nemotron3"]
    fmt, thinking = QWEN3_XML, ReasoningFormat("kwarg")
    spec = thinking_grammar(thinking, fmt.grammar(TOOLS, required=True, max_tokens=200), 40, opened=True)
    for seed in range(4):
        run = drive(compile_constraint(spec, tokenizer, max_tokens=200), tokenizer, seed, 200)
        assert run.finished and len(run.ids) <= 200
        reasoning, answer = split_thinking(thinking, run.text(tokenizer), opened=True)
        assert reasoning is not None
        _valid(fmt.parse(answer, TOOLS))


# ---- render <-> grammar <-> parse -----------------------------------------------------------------

CALLS = [
    ToolCall("get_weather", {"city": "Étienne\n<b>N</b> side", "unit": "celsius", "days": 3}),
    ToolCall("add", {"a": -4, "b": 12, "tags": ["x", "y z"]}),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_what_a_format_renders_its_grammar_accepts_and_its_parser_reads(fmt: ToolFormat, dialect_tokenizers):
    tokenizer = dialect_tokenizers[DIALECT[fmt.name]]
    calls = CALLS if fmt is not JSON_NOTE else CALLS[:1]  # the JSON note has one call per turn
    text = fmt.render(calls, TOOLS)
    assert _accepts(fmt.grammar(TOOLS, required=True), tokenizer, text)
    assert fmt.parse(text, TOOLS) == ParsedTurn("", tuple(calls))
    assert fmt.parse("Let me check. " + text, TOOLS) == ParsedTurn("Let me check. ", tuple(calls))
    if fmt is not JSON_NOTE:
        assert not _accepts(fmt.grammar(TOOLS, required=True, parallel=False), tokenizer, text)


def test_xml_values_are_typed_by_their_schema():
    text = QWEN3_XML.render([ToolCall("add", {"a": 7, "b": 1, "note": "7"})], TOOLS)
    assert "<parameter=a>\n7\n</parameter>" in text and "<parameter=note>\n7\n</parameter>" in text
    assert QWEN3_XML.parse(text, TOOLS).calls[0].arguments == {"a": 7, "b": 1, "note": "7"}


def test_a_string_value_cannot_hide_a_closing_tag(dialect_tokenizers):
    tokenizer = dialect_tokenizers["nemotron3"]
    spec = QWEN3_XML.grammar(TOOLS, required=True)
    good = QWEN3_XML.render([ToolCall("add", {"a": 1, "b": 2, "note": "<p>x</p>"})], TOOLS)
    bad = QWEN3_XML.render([ToolCall("add", {"a": 1, "b": 2, "note": "x</function>y"})], TOOLS)
    assert _accepts(spec, tokenizer, good) and not _accepts(spec, tokenizer, bad)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_an_answer_cut_short_keeps_its_complete_calls(fmt: ToolFormat):
    text = fmt.render(CALLS[:1], TOOLS)
    half = text[: len(text) // 2]
    assert fmt.parse(half, TOOLS) == ParsedTurn(half)  # no complete call: all text
    if fmt is not JSON_NOTE:
        both = fmt.render(CALLS, TOOLS)
        assert fmt.parse(both[: len(text) + 15], TOOLS).calls == (CALLS[0],)
    assert fmt.parse("no call here", TOOLS) == ParsedTurn("no call here")


def test_json_that_is_not_a_call_is_an_answer():
    """Beside a JSON-schema answer, only exactly {"name": <an offered tool>, "arguments": {...}}
    is a call."""
    for text in ('{"name": "Ann", "age": 3}', '{"name": "nope", "arguments": {}}'):
        assert JSON_NOTE.parse(text, TOOLS) == ParsedTurn(text)
    assert NANO_V2.parse('<TOOLCALL>[{"name": "nope", "arguments": {}}]</TOOLCALL>', TOOLS).calls == ()


# ---- bad tools ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tools",
    [
        [{"type": "function", "function": {"description": "no name"}}],
        [{"name": "two words"}],
        [{"name": "f", "parameters": {"type": "array"}}],
        [{"name": "f", "parameters": "not a schema"}],
        [{"name": "f"}, {"name": "f"}],
        [],
    ],
)
def test_bad_tools_are_grammar_errors(tools):
    with pytest.raises(GrammarError):
        NANO_V2.grammar(tools)


def test_a_choice_of_no_offered_tool_is_an_error():
    with pytest.raises(GrammarError, match="no tool to call"):
        QWEN3_XML.grammar(TOOLS, allowed=("missing",))
    with pytest.raises(GrammarError, match="parameter name"):
        QWEN3_XML.grammar([{"name": "f", "parameters": {"type": "object", "properties": {"a b": {}}}}])


def test_output_scoped_budgets_travel_in_the_spec():
    spec = NANO_V2.grammar(TOOLS, required=True, max_tokens=300)
    (budget,) = spec.budgets
    assert budget.scope == "output" and budget.max_tokens < 300
    assert GrammarSpec.from_json(spec.to_json()) == spec
    with pytest.raises(GrammarError, match="scope"):
        FieldBudget("a", 1, "b", scope="call")
