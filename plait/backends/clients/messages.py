"""One message renderer for every path that turns a conversation into chat-template messages.

A DSPy call (a `dspy.lm15.Request`, run locally or sent to a remote server) and an OpenAI
request to `plait serve` both pass through OpenAI's chat form (`conversation` makes it from a
DSPy request): `developer` is the system role, content is a string or a list of text parts, an
assistant's tool calls are `tool_calls`, a tool result is a `tool` message. `template_messages`
then shapes it for the checkpoint's chat template, by the template's tool format
(`plait.backends.grammar.tool_formats`): a template that knows tools gets the calls and results
as they are and the offered tools as its `tools` argument, so it writes them in the model's own
format; any other template gets text only, a tool call written as the JSON the tool-call
grammar decodes (`{"name", "arguments"}`), a result as its text, and the offered tools
described in the system message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from plait.backends.grammar.tool_formats import JSON_NOTE, ToolCall, ToolFormat, ToolSpec, tool_specs

if TYPE_CHECKING:  # DSPy is imported where a DSPy request is read: `plait generate` needs none
    from dspy.lm15 import Request


class UnsupportedContentError(ValueError):
    """A message part that is not text (an image, audio, a file): the engines read text only."""


def part_text(part: Any) -> str:
    """The text of one content part: an lm15 text part, or an OpenAI
    content part (a `{"type": "text", "text": ...}` dict, or anything with a `text`). Other
    parts raise `UnsupportedContentError`."""
    if isinstance(part, str):
        return part
    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    text = getattr(part, "text", None)  # an lm15 TextPart, or the like
    if isinstance(text, str):
        return text
    kind = part.get("type") if isinstance(part, Mapping) else getattr(part, "type", None)
    raise UnsupportedContentError(
        f"a message holds {kind or type(part).__name__!r} content, and plait's LMs take text only "
        "(dspy.Image, dspy.Audio and dspy.File inputs become such parts): pass it as text (a "
        "caption, a transcript), or run this step on a multimodal model with dspy.LM"
    )


def content_text(content: str | Iterable[Any] | None) -> str:
    """A message's content (a string, a list of parts, or nothing) as one text."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part_text(p) for p in content)


def message(role: str, content: str | Iterable[Any] | None) -> dict[str, str]:
    return {"role": "system" if role == "developer" else role, "content": content_text(content)}


def tools_note(tools: Sequence[Any]) -> str:
    """Tells the model which tools exist and how a call is written (the grammar enforces it)."""
    lines = [
        "You can call these tools. To call one, answer with only a JSON object "
        '{"name": <tool name>, "arguments": {...}}.'
    ]
    for tool in tools:
        lines.append(
            json.dumps({"name": tool.name, "description": tool.description, "parameters": tool.parameters})
        )
    return "\n".join(lines)


def request_messages(request: Request, *, describe_tools: bool = True) -> list[dict[str, str]]:
    """The messages of a DSPy request as text: its system prompt (with the offered tools
    described, when `describe_tools`), then its turns."""
    tools = tool_specs(request.tools) if describe_tools else []
    return template_messages(conversation(request), tools, JSON_NOTE)[0]


def conversation(request: Request) -> list[dict[str, Any]]:
    """A DSPy request's turns in OpenAI's chat form: its system prompt first; text content as a
    string; an assistant's tool calls as `tool_calls` (arguments as JSON text, content None
    when there is no text); each tool result as a `tool` message."""
    from dspy.lm15 import ThinkingPart, ToolCallPart, ToolResultPart

    out = [] if request.system is None else [message("system", request.system)]
    for turn in request.messages:
        calls = [p for p in turn.parts if isinstance(p, ToolCallPart)]
        results = [p for p in turn.parts if isinstance(p, ToolResultPart)]
        thinking = [p.text for p in turn.parts if isinstance(p, ThinkingPart)]
        rest = [p for p in turn.parts if not isinstance(p, (ToolCallPart, ToolResultPart, ThinkingPart))]
        if rest or not results:
            entry: dict[str, Any] = message(turn.role, rest)
            if thinking:  # an earlier answer's own reasoning: the template decides whether to show it
                entry["reasoning_content"] = "".join(thinking)
            if calls:
                entry["content"] = entry["content"] or None
                entry["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": json.dumps(c.input)},
                    }
                    for c in calls
                ]
            out.append(entry)
        for result in results:
            entry = {"role": "tool", "tool_call_id": result.id, "content": content_text(result.content)}
            out.append(entry if result.name is None else entry | {"name": result.name})
    return out


def template_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec], fmt: ToolFormat
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, template kwargs) for a chat template that writes tool calls in `fmt`, from
    messages in OpenAI's chat form and the offered `tools`.

    A native format keeps each assistant's `tool_calls` (arguments as objects: templates iterate
    them) and each `tool` message's `tool_call_id` and `name`, and passes the tools as `tools`.
    Otherwise every message becomes text and the tools are described in the system message.
    Raises `ValueError` for a tool call that is not a function with object arguments, and
    `UnsupportedContentError` for content that is not text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = message(m["role"], m.get("content"))
        calls = [_tool_call(c) for c in m.get("tool_calls") or ()]
        if not fmt.native:
            entry["content"] += fmt.render(calls)
        else:
            if calls:
                entry["tool_calls"] = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls
                ]
            entry |= {k: m[k] for k in ("tool_call_id", "name") if m.get(k) is not None}
        if isinstance(m.get("reasoning_content"), str):  # Nemotron 3 renders it back in <think>
            entry["reasoning_content"] = m["reasoning_content"]
        out.append(entry)
    if not tools:
        return out, {}
    if fmt.native:
        return out, {"tools": [t.openai() for t in tools]}
    note = tools_note(tools)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{note}" if out[0]["content"] else note
    else:
        out.insert(0, {"role": "system", "content": note})
    return out, {}


def _tool_call(call: Any) -> ToolCall:
    """An OpenAI tool call (its arguments JSON text or an object) read back."""
    function = call.get("function") if isinstance(call, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a function with a name: {call!r}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the arguments of the call to {name!r} are not JSON: {exc}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"the arguments of the call to {name!r} must be a JSON object")
    return ToolCall(name, dict(arguments))
