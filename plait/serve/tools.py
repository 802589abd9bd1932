"""Tool calls on the OpenAI chat endpoint: `tools`, `tool_choice` and `parallel_tool_calls` read
and checked, and the answer's calls written back in OpenAI's form.

The model calls tools in its own format (the chat template's, `plait.backends.grammar.
tool_formats`), decoded under a grammar, so the calls always parse; the client sees OpenAI's
`message.tool_calls` (`{"id", "type": "function", "function": {"name", "arguments": <JSON
text>}}`) and the finish reason `tool_calls`. `tool_choice` is `auto` (a call or the answer the
request otherwise asks for), `none` (the tools are shown, never called), `required`, or
`{"type": "function", "function": {"name": ...}}` (that tool, required).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from plait.backends.grammar.spec import GrammarError, GrammarSpec
from plait.backends.grammar.tool_formats import ParsedTurn, ToolFormat, ToolSpec, tool_specs
from plait.serve.errors import ApiError

_MODES = ("auto", "none", "required")


def _bad(message: str, code: str = "invalid_tools") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


@dataclass(frozen=True)
class ToolUse:
    """The tools a chat call offers, how it may call them, and the model's format for them."""

    fmt: ToolFormat
    specs: tuple[ToolSpec, ...]
    mode: Literal["auto", "none", "required"] = "auto"
    allowed: tuple[str, ...] = ()
    parallel: bool = True

    @property
    def calls(self) -> bool:
        """Whether the answer may call a tool (`tool_choice` is not `none`)."""
        return self.mode != "none"

    def grammar(self, answer: GrammarSpec | None, max_tokens: int) -> GrammarSpec | None:
        """The answer's grammar: calls in the model's format, or (unless required) `answer`
        (the request's structured output, None: free text); just `answer` under `none`."""
        if not self.calls:
            return answer
        return self.fmt.grammar(
            self.specs,
            required=self.mode == "required",
            allowed=self.allowed,
            parallel=self.parallel,
            answer=answer,
            max_tokens=max_tokens,
        )

    def parse(self, text: str) -> ParsedTurn:
        """The answer's leading text and calls (no calls under `none`)."""
        return self.fmt.parse(text, self.specs) if self.calls else ParsedTurn(text)


def tool_use(body: Mapping[str, Any], fmt: ToolFormat) -> ToolUse | None:
    """The `ToolUse` of a chat request body, or None when it offers no tools. Raises `ApiError`
    (400) for tools that are not OpenAI function tools with a name and an object schema, and
    for a `tool_choice` that is not one of OpenAI's or names a tool not offered."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "auto", "none"):
            raise _bad("tool_choice needs tools to choose from", "invalid_tool_choice")
        return None
    for tool in tools:
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise _bad(f'each tool is {{"type": "function", "function": {{...}}}}, not {str(tool)[:200]}')
    try:
        specs = tuple(tool_specs(tools))
    except GrammarError as exc:
        raise _bad(str(exc)[:500]) from None
    parallel = body.get("parallel_tool_calls") is not False
    if choice is None or choice in _MODES:
        return ToolUse(fmt, specs, choice or "auto", parallel=parallel)
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or choice.get("type") != "function":
        raise _bad(
            'tool_choice is "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
            "invalid_tool_choice",
        )
    if name not in {s.name for s in specs}:
        raise _bad(f"tool_choice names {name!r}, which is not among the tools", "invalid_tool_choice")
    return ToolUse(fmt, specs, "required", (name,), parallel)


def openai_tool_calls(parsed: ParsedTurn, *, indexed: bool = False) -> list[dict[str, Any]]:
    """The answer's calls as OpenAI `tool_calls` (arguments as JSON text); `indexed` adds each
    call's `index`, as a streamed delta carries it."""
    calls = []
    for i, call in enumerate(parsed.calls):
        entry: dict[str, Any] = {"index": i} if indexed else {}
        entry |= {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        calls.append(entry)
    return calls
