"""Tool calls in the model's own format: the grammar they are decoded under, and the parser.

A model calls tools the way its training taught it, and its chat template shows how
(`detect_tool_format` reads the template's text):

* `nano_v2` (NVIDIA-Nemotron-Nano-9B-v2): the template lists the tools in
  `<AVAILABLE_TOOLS>[...]</AVAILABLE_TOOLS>`; the model answers with one JSON list,
  `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>`;
* `qwen3_xml` (Nemotron 3, the Qwen3-Coder XML format): one block per call,
  `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`,
  where VALUE is raw text when the tool's schema makes the parameter a string, JSON otherwise;
* `json` (templates that know no tools): plait describes the tools in the system prompt
  (`plait.backends.clients.messages.tools_note`) and the model answers one JSON object
  `{"name": ..., "arguments": {...}}`.

`ToolFormat.grammar` builds the `GrammarSpec` of an answer: the calls (tool names among the
offered ones, each call's arguments by that tool's JSON schema, several calls where the format
has room for them), or, unless a call is required, the answer the request would otherwise get
(free text without the call marker, or the request's own grammar). A budget closes a call before
the request's `max_tokens` runs out. `ToolFormat.parse` reads a generated answer back into its
leading text and `ToolCall`s; on text generated under the grammar it cannot fail.

Plain strings only: no torch, no llguidance (`tests/test_layering.py`).
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plait.backends.grammar.spec import (
    JSON_OPTIONS,
    FieldBudget,
    GrammarError,
    GrammarSpec,
    json_rule,
    lark_rules,
    lark_string,
)

#: Characters a tool or parameter name cannot hold: they would end the markup that names it.
_BAD_NAME = re.compile(r"[\s<>=\"]")

#: Texts that end an open JSON string, object or array, tried in this order when a call's
#: budget runs out (see `FieldBudget.unwind`).
_JSON_UNWIND = ('"', "}", "]")


@dataclass(frozen=True)
class ToolSpec:
    """One offered tool: its name, description and parameters' JSON schema (an object)."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The tool as OpenAI's API and Hugging Face chat templates take it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """One call read from an answer: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedTurn:
    """An answer read back: `text` is what came before the calls (all of it without calls)."""

    text: str
    calls: tuple[ToolCall, ...] = ()


def tool_spec(tool: Any) -> ToolSpec:
    """A `ToolSpec` from an lm15 `FunctionTool`, an OpenAI tool dict or a bare
    {"name", "description", "parameters"} dict. Raises `GrammarError` for a tool without a
    usable name or whose parameters are not an object schema."""
    if isinstance(tool, Mapping):
        function = tool.get("function", tool)
        if not isinstance(function, Mapping):
            raise GrammarError(f"a tool's function must be an object: {tool!r}")
        name, description, parameters = (
            function.get("name"),
            function.get("description"),
            function.get("parameters"),
        )
    else:
        name = getattr(tool, "name", None)
        description, parameters = getattr(tool, "description", None), getattr(tool, "parameters", None)
    if not isinstance(name, str) or not name or _BAD_NAME.search(name):
        raise GrammarError(f"a tool needs a name without spaces, quotes, '<', '>' or '=': {tool!r}")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise GrammarError(f"the parameters of tool {name!r} must be a JSON schema of an object")
    if not isinstance(parameters.get("properties", {}), Mapping):
        raise GrammarError(f"the parameters of tool {name!r} have properties that are not an object")
    if description is not None and not isinstance(description, str):
        raise GrammarError(f"the description of tool {name!r} must be a string")
    return ToolSpec(name, description, dict(parameters))


def tool_specs(tools: Iterable[Any]) -> list[ToolSpec]:
    """Every offered tool as a `ToolSpec` (names must be unique)."""
    specs = [tool_spec(t) for t in tools]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise GrammarError(f"tool names must be unique: {names}")
    return specs


def _offered(tools: Iterable[Any], allowed: Sequence[str]) -> list[ToolSpec]:
    specs = [s for s in tool_specs(tools) if not allowed or s.name in allowed]
    if not specs:
        raise GrammarError("no tool to call: the request's tools are empty or none is allowed")
    return specs


def _required(schema: Mapping[str, Any]) -> list[str]:
    return [k for k in schema.get("required", ()) if k in schema.get("properties", {})]


def _excluding(regex: str, marker: str) -> str:
    """A Lark terminal body: `regex`, and no `marker` anywhere in it."""
    return f"/{regex}/ & ~/(?s:.*){_regex_text(marker)}(?s:.*)/"


def _regex_text(text: str) -> str:
    """`text` as a regex that matches it literally, inside Lark's /.../."""
    return re.escape(text).replace("\\\n", "\\n").replace("/", "\\/")


class ToolFormat(abc.ABC):
    """How one family of models writes tool calls. Subclasses give the call rules, the text
    that opens a call (`opener`, never part of a plain answer), the budget's closing texts and
    the parser."""

    name: str = ""
    #: the chat template lists the tools and renders past calls and results itself
    native: bool = True
    #: the text a model's calls start with
    opener: str = ""
    #: the budget's close and unwind texts (see `FieldBudget`)
    close: str = ""
    unwind: tuple[str, ...] = _JSON_UNWIND
    #: a plain answer's regex (it may never contain `opener` either)
    text_regex: str = r"(?s:.+)"

    def grammar(
        self,
        tools: Iterable[Any],
        *,
        required: bool = False,
        allowed: Sequence[str] = (),
        parallel: bool = True,
        answer: GrammarSpec | None = None,
        max_tokens: int | None = None,
    ) -> GrammarSpec:
        """The grammar of an answer to a request that offers `tools`.

        `required`: the answer is one or more calls (else a plain answer is allowed too: free
        text without the call marker, or the `answer` grammar when the request has one).
        `allowed` restricts the callable tools by name; `parallel=False` allows one call.
        `max_tokens` (the request's limit): from there on, what is open in a call is closed,
        early enough that the calls end within the limit."""
        specs = _offered(tools, allowed)
        lines = ["start: tc_calls" if required else "start: tc_calls | tc_answer"]
        lines += self.call_rules(specs, parallel)
        budgets: list[FieldBudget] = []
        if not required:
            if answer is None:
                lines += ["tc_answer: TC_TEXT", f"TC_TEXT: {_excluding(self.text_regex, self.opener)}"]
            else:
                lines += lark_rules(answer, "tc_answer")
                budgets += answer.budgets
        if max_tokens is not None:
            limit = max(1, max_tokens - self.reserve(specs))
            budgets.append(FieldBudget(self.opener, limit, self.close, unwind=self.unwind, scope="output"))
        return GrammarSpec.lark("\n".join(lines) + "\n", budgets)

    def parse(self, text: str, tools: Iterable[Any] = ()) -> ParsedTurn:
        """The answer's leading text and calls. Text without the marker, or whose calls do not
        parse (an answer cut short by `max_tokens` before its first call ended), is all text;
        calls after the last complete one are dropped."""
        at = text.find(self.opener)
        if at == -1:
            return ParsedTurn(text)
        calls = self.parse_calls(text[at:], {s.name: s for s in tool_specs(tools)})
        return ParsedTurn(text[:at], tuple(calls)) if calls else ParsedTurn(text)

    # ---- per format ---------------------------------------------------------------------------
    @abc.abstractmethod
    def call_rules(self, specs: list[ToolSpec], parallel: bool) -> list[str]:
        """Lark rules whose `tc_calls` generates the calls (rule names start with `tc_`)."""

    @abc.abstractmethod
    def parse_calls(self, text: str, specs: dict[str, ToolSpec]) -> list[ToolCall]:
        """The complete calls at the start of `text` (which starts with `opener`)."""

    @abc.abstractmethod
    def render(self, calls: Sequence[ToolCall], tools: Iterable[Any] = ()) -> str:
        """The text a model writes for `calls` in this format (what the grammar generates;
        `tools` type the values where the format depends on their schemas)."""

    def reserve(self, specs: list[ToolSpec]) -> int:
        """Tokens kept back from `max_tokens` for a call that opens late: the whole of the
        shortest call of the longest tool (required parameters only, four-byte values) plus
        every closing text, at one byte per token (a token is at least one byte)."""
        shortest = max(
            len(self.render([ToolCall(s.name, dict.fromkeys(_required(s.parameters), "four"))], [s]).encode())
            for s in specs
        )
        return 16 + shortest + sum(len(t.encode()) for t in self.unwind)


def _alternatives(count: int) -> str:
    """One call's rule: any of the `count` functions' rules `tc_f0`, `tc_f1`, ..."""
    return " | ".join(f"tc_f{i}" for i in range(count))


def _call_schema(spec: ToolSpec) -> dict[str, Any]:
    """The JSON schema of one `{"name": ..., "arguments": {...}}` object for `spec`. The
    arguments are the function's parameters and no others, unless its schema says otherwise
    (JSON Schema's default would let a model invent keyword arguments the function rejects)."""
    arguments = {"additionalProperties": False, **spec.parameters}
    return {
        "type": "object",
        "properties": {"name": {"const": spec.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": dict(JSON_OPTIONS),
    }


def _json_call(value: Any, specs: Mapping[str, ToolSpec]) -> ToolCall | None:
    """The call a decoded JSON value is: exactly a name and arguments, the name an offered
    tool's when tools are given (else it is some other JSON: an answer, not a call)."""
    if not isinstance(value, Mapping) or set(value) != {"name", "arguments"}:
        return None
    name, arguments = value["name"], value["arguments"]
    if not isinstance(name, str) or not isinstance(arguments, Mapping) or (specs and name not in specs):
        return None
    return ToolCall(name, dict(arguments))


class NanoV2Format(ToolFormat):
    """`<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>`: one JSON list of calls."""

    name = "nano_v2"
    opener = "<TOOLCALL>"
    close = "</TOOLCALL>"

    def call_rules(self, specs: list[ToolSpec], parallel: bool) -> list[str]:
        more = ' ("," " " tc_call)*' if parallel else ""
        rules = [
            f'tc_calls: "<TOOLCALL>[" tc_call{more} "]</TOOLCALL>"',
            f"tc_call: {_alternatives(len(specs))}",
        ]
        return rules + [f"tc_f{i}: {json_rule(_call_schema(s))}" for i, s in enumerate(specs)]

    def render(self, calls: Sequence[ToolCall], tools: Iterable[Any] = ()) -> str:
        return (
            "<TOOLCALL>"
            + json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls], ensure_ascii=False)
            + "</TOOLCALL>"
        )

    def parse_calls(self, text: str, specs: dict[str, ToolSpec]) -> list[ToolCall]:
        decoder, calls = json.JSONDecoder(), []
        at = text.find("[", len(self.opener))
        if at == -1 or text[len(self.opener) : at].strip():
            return []
        at += 1
        while True:
            at = len(text) - len(text[at:].lstrip())
            try:
                value, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return calls
            call = _json_call(value, specs)
            if call is None:
                return calls
            calls.append(call)
            rest = text[at:].lstrip()
            if not rest.startswith(","):
                return calls
            at = len(text) - len(rest) + 1


#: How a raw (string) XML parameter value ends: a newline and the closing tag.
_XML_VALUE_END = "\n</parameter>"
#: Closing tags a raw value cannot contain (the parser reads up to the first one).
_XML_CLOSING = r"<\/(?:parameter|function|tool_call)>"


def _raw_value(text: str) -> str:
    """A Lark terminal body: a raw value matching the regex `text`, then its closing tag; no
    closing tag inside (one lexeme up to the first one: a lexer that read the value and the
    tag apart would take `</` for more value and never reach the tag)."""
    return f"/{text}{_regex_text(_XML_VALUE_END)}/ & ~/(?s:.*){_XML_CLOSING}(?s:.+)/"


def _string_schema(schema: Any) -> bool:
    """Whether a parameter's value is written as raw text: its schema admits strings only."""
    if not isinstance(schema, Mapping):
        return False
    if "enum" in schema:
        return bool(schema["enum"]) and all(isinstance(v, str) for v in schema["enum"])
    if "const" in schema:
        return isinstance(schema["const"], str)
    return schema.get("type") == "string"


def _with_definitions(schema: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter's schema with the root's `$defs` / `definitions` its `$ref`s may point to."""
    out = dict(schema)
    for key in ("$defs", "definitions"):
        if key in root and key not in out:
            out[key] = root[key]
    return out


class Qwen3XmlFormat(ToolFormat):
    """Qwen3-Coder's XML: a `<tool_call>` block per call, parameters as tagged values."""

    name = "qwen3_xml"
    opener = "<tool_call>"
    close = "</tool_call>"
    # a raw value ends at its closing tag, then the function's (also after the "<" that an
    # optional parameter and the function's closing tag share); JSON values unwind first
    unwind = (_XML_VALUE_END + "\n", "</function>\n", "/function>\n", *_JSON_UNWIND)

    def call_rules(self, specs: list[ToolSpec], parallel: bool) -> list[str]:
        more = ' ("\\n" tc_call)*' if parallel else ""
        rules = [
            f"tc_calls: tc_call{more}",
            'tc_call: "<tool_call>\\n" (' + _alternatives(len(specs)) + ') "</tool_call>"',
            f"TC_RAW: {_raw_value('(?s:.*)')}",
        ]
        for i, spec in enumerate(specs):
            rules += self._function_rules(f"tc_f{i}", spec)
        return rules

    def _function_rules(self, rule: str, spec: ToolSpec) -> list[str]:
        """`<function=NAME>` and its parameters in schema order, the required ones mandatory."""
        properties = spec.parameters.get("properties", {})
        required = set(_required(spec.parameters))
        items, rules = [lark_string(f"<function={spec.name}>\n")], []
        for j, (key, schema) in enumerate(properties.items()):
            if _BAD_NAME.search(key):
                raise GrammarError(f"tool {spec.name!r} has a parameter name XML cannot carry: {key!r}")
            name = f"{rule}_p{j}"
            value, extra = self._value(name, schema, spec.parameters)
            rules += [f"{name}: {lark_string(f'<parameter={key}>' + chr(10))} {value}", *extra]
            items.append(name if key in required else f"{name}?")
        items.append(lark_string("</function>\n"))
        return [f"{rule}: " + " ".join(items), *rules]

    def _value(self, name: str, schema: Any, root: Mapping[str, Any]) -> tuple[str, list[str]]:
        """A parameter value and its closing tag, plus the rules it needs."""
        end = lark_string(_XML_VALUE_END + "\n")
        if not _string_schema(schema):
            body = _with_definitions(schema, root) if isinstance(schema, Mapping) else {}
            body = {**body, "x-guidance": dict(JSON_OPTIONS)}
            return f"{name}_v {end}", [f"{name}_v: {json_rule(body)}"]
        choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if choices is not None:
            return "(" + " | ".join(lark_string(c) for c in choices) + f") {end}", []
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if lo is None and hi is None:
            return 'TC_RAW "\\n"', []
        length = f"(?s:.{{{int(lo or 0)},{'' if hi is None else int(hi)}}})"
        terminal = name.upper()
        return f'{terminal} "\\n"', [f"{terminal}: {_raw_value(length)}"]

    def render(self, calls: Sequence[ToolCall], tools: Iterable[Any] = ()) -> str:
        specs = {s.name: s for s in tool_specs(tools)}
        blocks = []
        for call in calls:
            spec = specs.get(call.name)
            properties = spec.parameters.get("properties", {}) if spec is not None else {}
            params = "".join(
                f"<parameter={key}>\n{self._text(value, properties.get(key))}{_XML_VALUE_END}\n"
                for key, value in call.arguments.items()
            )
            blocks.append(f"<tool_call>\n<function={call.name}>\n{params}</function>\n</tool_call>")
        return "\n".join(blocks)

    def parse_calls(self, text: str, specs: dict[str, ToolSpec]) -> list[ToolCall]:
        calls, at = [], 0
        while text.startswith(self.opener, at):
            end = text.find(self.close, at)
            if end == -1:
                break
            call = self._parse_function(text[at + len(self.opener) : end], specs)
            if call is None:
                break
            calls.append(call)
            at = end + len(self.close)
            at = len(text) - len(text[at:].lstrip())
        return calls

    def _parse_function(self, block: str, specs: dict[str, ToolSpec]) -> ToolCall | None:
        head = re.match(r"\s*<function=([^>\n]+)>\n?", block)
        if head is None:
            return None
        name, at = head.group(1), head.end()
        spec = specs.get(name)
        if specs and spec is None:
            return None
        properties = spec.parameters.get("properties", {}) if spec is not None else {}
        arguments: dict[str, Any] = {}
        while (tag := re.match(r"\s*<parameter=([^>\n]+)>\n?", block[at:])) is not None:
            key, start = tag.group(1), at + tag.end()
            end = block.find("</parameter>", start)
            if end == -1:
                return None
            raw = block[start:end].removesuffix("\n")
            arguments[key] = self._typed(raw, properties.get(key))
            at = end + len("</parameter>")
        return ToolCall(name, arguments) if block[at:].strip() == "</function>" else None

    @staticmethod
    def _text(value: Any, schema: Any) -> str:
        """A parameter's value as written: raw text for a string, else JSON."""
        return (
            value
            if _string_schema(schema) and isinstance(value, str)
            else json.dumps(value, ensure_ascii=False)
        )

    @staticmethod
    def _typed(raw: str, schema: Any) -> Any:
        """A parameter's value by its schema: raw text for a string, else JSON (raw text when it
        is not JSON: a model writing a number as words, outside the grammar)."""
        if _string_schema(schema):
            return raw
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw


class JsonNoteFormat(ToolFormat):
    """plait's own format for templates without tools: one `{"name", "arguments"}` object."""

    name = "json"
    native = False
    opener = '{"name": '
    close = "}}"
    # a plain answer does not start with "{" (nor a blank), so the first character decides
    text_regex = r"[^{\s](?s:.*)"

    def call_rules(self, specs: list[ToolSpec], parallel: bool) -> list[str]:
        rules = [f"tc_calls: {_alternatives(len(specs))}"]
        return rules + [f"tc_f{i}: {json_rule(_call_schema(s))}" for i, s in enumerate(specs)]

    def render(self, calls: Sequence[ToolCall], tools: Iterable[Any] = ()) -> str:
        return "".join(
            json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False) for c in calls
        )

    def parse_calls(self, text: str, specs: dict[str, ToolSpec]) -> list[ToolCall]:
        try:
            value, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError:
            return []
        call = _json_call(value, specs)
        return [] if call is None else [call]


NANO_V2 = NanoV2Format()
QWEN3_XML = Qwen3XmlFormat()
JSON_NOTE = JsonNoteFormat()
TOOL_FORMATS: dict[str, ToolFormat] = {f.name: f for f in (NANO_V2, QWEN3_XML, JSON_NOTE)}


def detect_tool_format(template: str | None) -> ToolFormat:
    """The tool-call format a chat template renders: `nano_v2` when it writes `<TOOLCALL>`,
    `qwen3_xml` when it writes `<tool_call>` blocks with `<function=` inside, else `json`
    (plait's note in the system prompt; also for no template at all)."""
    if template is None:
        return JSON_NOTE
    if "<TOOLCALL>" in template:
        return NANO_V2
    if "<tool_call>" in template and "<function=" in template:
        return QWEN3_XML
    return JSON_NOTE


__all__ = [
    "JSON_NOTE",
    "NANO_V2",
    "QWEN3_XML",
    "TOOL_FORMATS",
    "ParsedTurn",
    "ToolCall",
    "ToolFormat",
    "ToolSpec",
    "detect_tool_format",
    "tool_spec",
    "tool_specs",
]
