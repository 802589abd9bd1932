"""One message renderer for every path that turns a conversation into chat-template messages.

A DSPy call (a `dspy.lm15.Request`, run locally or sent to a remote server) and an OpenAI
request to `plait serve` both end as `[{"role": ..., "content": <text>}]`, the form a
checkpoint's chat template (or an OpenAI-compatible server) reads. The rules are the same for
all of them: `developer` is the system role, content is a string or a list of text parts, a
tool call is written as the JSON the tool-call grammar decodes (`{"name", "arguments"}`), a
tool result as its text, and the tools a request offers are described in the system message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from dspy.lm15 import Request, TextPart, ToolCallPart, ToolResultPart


class UnsupportedContentError(ValueError):
    """A message part that is not text (an image, audio, a file): the engines read text only."""


def part_text(part: Any) -> str:
    """The text of one content part: lm15 text / tool-call / tool-result parts, or an OpenAI
    content part (anything with a `text`). Other parts raise `UnsupportedContentError`."""
    if isinstance(part, str):
        return part
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, ToolCallPart):
        return json.dumps({"name": part.name, "arguments": part.input})
    if isinstance(part, ToolResultPart):
        return "".join(part_text(p) for p in part.content)
    text = getattr(part, "text", None)
    if isinstance(text, str):
        return text
    raise UnsupportedContentError(f"messages must be text, not {type(part).__name__}")


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
    """The messages of a DSPy request: its system prompt (with the offered tools described,
    when `describe_tools`), then its turns."""
    system = None if request.system is None else content_text(request.system)
    if describe_tools and request.tools:
        system = f"{system}\n\n{tools_note(request.tools)}" if system else tools_note(request.tools)
    messages = [] if system is None else [message("system", system)]
    messages += [message(m.role, m.parts) for m in request.messages]
    return messages
