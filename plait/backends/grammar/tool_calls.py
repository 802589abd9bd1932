"""Native function calling in the engine's own grammar: one call `{"name", "arguments"}`.

When a DSPy request offers tools (`Request.tools`), the local engine decodes its answer under
`tool_call_grammar`: either one tool call, written as the JSON object
`{"name": <tool>, "arguments": {...}}` with the arguments following that tool's parameters
schema, or (unless a call is required) a plain-text answer. `parse_tool_call` reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from plait.backends.grammar.spec import JSON_OPTIONS, GrammarError, GrammarSpec, json_rule


def _tool_name_and_parameters(tool: Any) -> tuple[str, dict[str, Any]]:
    """(name, parameters schema) of an lm15 `FunctionTool`, an OpenAI tool dict or a bare
    {"name", "parameters"} dict."""
    if isinstance(tool, Mapping):
        spec = tool.get("function", tool)
        name, parameters = spec.get("name"), spec.get("parameters")
    else:
        name, parameters = getattr(tool, "name", None), getattr(tool, "parameters", None)
    if not isinstance(name, str) or not name:
        raise GrammarError(f"a tool needs a name: {tool!r}")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping):
        raise GrammarError(f"the parameters of tool {name!r} must be a JSON schema object")
    return name, dict(parameters)


def tool_call_grammar(tools: Any, *, required: bool = False, allowed: tuple[str, ...] = ()) -> GrammarSpec:
    """Native function calling (`Request.tools`): one tool call written as the JSON object
    `{"name": <tool>, "arguments": {...}}`, the arguments following that tool's parameters
    schema; unless `required`, a plain-text answer (not starting with `{`) instead.
    `allowed` restricts the callable tools by name. Read the result with `parse_tool_call`."""
    calls = []
    for tool in tools:
        name, parameters = _tool_name_and_parameters(tool)
        if allowed and name not in allowed:
            continue
        schema = {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": dict(JSON_OPTIONS),
        }
        calls.append(json_rule(schema))
    if not calls:
        raise GrammarError("no tool to call: the request's tools are empty or none is allowed")
    rules = [f"call{i}: {body}" for i, body in enumerate(calls)]
    call = " | ".join(f"call{i}" for i in range(len(calls)))
    start = f"start: {call}" if required else f"start: {call} | ANSWER\nANSWER: /[^{{\\s](?s:.*)/"
    return GrammarSpec.lark("\n".join([start, *rules]) + "\n")


def parse_tool_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """(tool name, arguments) from an answer generated under `tool_call_grammar`, or None when
    the answer is plain text."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GrammarError(
            f"the tool call is not complete JSON (was the generation cut short?): {exc}"
        ) from exc
    return call["name"], call["arguments"]
