"""One assistant turn to generate: the rendered prompt, its grammar, and how to read it back.

Every chat path (the DSPy bridge, `plait serve`'s chat endpoint, `plait generate`) renders
messages with the checkpoint's template and decodes the answer, perhaps under a grammar. A
thinking model adds a block before the answer; `plan_turn` is the one place that decides,
from the caller's `ReasoningRequest` and the template's own switch, whether the output starts
with a thinking block, how long it may be, and what grammar covers the block plus the answer.
The caller compiles `ChatTurn.spec` (if any), submits `ChatTurn.prompt`, and splits the
finished text with `ChatTurn.split` (or streams it through `ChatTurn.stream_splitter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plait.backends.grammar.constraint import TokenConstraint, compile_constraint
from plait.backends.grammar.reasoning import (
    THINKING_SHARE,
    ReasoningError,
    ReasoningFormat,
    ReasoningRequest,
    ThinkingStream,
    split_thinking,
    switch_messages,
    thinking_grammar,
)
from plait.backends.grammar.spec import GrammarSpec


@dataclass(frozen=True)
class ChatTurn:
    """A planned turn. `thinking` is the format of the block the output starts with (None: the
    output is the answer alone); `opened` says whether the prompt already opened it."""

    prompt: str
    spec: GrammarSpec | None
    thinking: ReasoningFormat | None = None
    opened: bool = False
    budget: int | None = None
    json_answer: bool = False  # the answer after the block is a JSON document

    def constraint(self, engine: Any, max_tokens: int) -> TokenConstraint | None:
        """The turn's grammar compiled for `engine`'s logits (None: unconstrained). A JSON
        answer gets its `JsonBudget` from where the thinking block closes."""
        if self.spec is None:
            return None
        after = self.thinking.close if self.thinking is not None and self.json_answer else None
        return compile_constraint(
            self.spec, engine.tokenizer, engine.info.vocab_size, max_tokens=max_tokens, json_after=after
        )

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer) of the generated text; reasoning is None without a block."""
        if self.thinking is None:
            return None, text
        return split_thinking(self.thinking, text, opened=self.opened)

    def stream_splitter(self) -> ThinkingStream | None:
        """A splitter for streamed deltas, or None when there is no block to split off."""
        return None if self.thinking is None else ThinkingStream(self.thinking, opened=self.opened)


def plan_turn(
    engine: Any,
    messages: list[dict],
    *,
    reasoning: ReasoningRequest | None = None,
    spec: GrammarSpec | None = None,
    max_tokens: int,
    template_kwargs: dict[str, Any] | None = None,
) -> ChatTurn:
    """Render `messages` for `engine` (anything with `chat_prompt` and `reasoning_format`) and
    plan the thinking block.

    * default: the template decides; a block it opens is closed by the model, or, when an
      answer grammar follows, within `THINKING_SHARE` of `max_tokens`;
    * on: the template's on switch (a block the template does not open is written first);
    * off: the template's off switch, or a budget of 0 where the template has none;
    * a budget: on, with `</think>` forced after that many tokens (plus a grace window for a
      newline), capped to leave the answer room when a grammar follows.

    `template_kwargs` go to the template as they are (e.g. OpenAI's `chat_template_kwargs`);
    an explicit on/off overrides the switch they might also set."""
    request = reasoning or ReasoningRequest()
    fmt: ReasoningFormat | None = engine.reasoning_format
    if fmt is None:
        if request.mode != "default":
            raise ReasoningError(
                "this model's chat template has no thinking block: reasoning can only be left at its default"
            )
        return ChatTurn(engine.chat_prompt(messages, **(template_kwargs or {})), spec)
    messages, switch = switch_messages(fmt, request, messages)
    prompt = engine.chat_prompt(messages, **((template_kwargs or {}) | switch))
    state = fmt.prompt_state(prompt)
    budget = request.budget
    if request.mode == "off":
        if state != "open":
            return ChatTurn(prompt, spec)
        budget = 0  # the template has no off switch: close its block at once
    elif state == "closed" or (state == "absent" and request.mode == "default"):
        return ChatTurn(prompt, spec)
    if spec is not None:  # leave the answer room to finish under its grammar
        share = int(max_tokens * THINKING_SHARE)
        budget = share if budget is None else min(budget, share)
    opened = state == "open"
    if spec is None and budget is None:  # nothing to enforce: the model thinks as long as it likes
        return ChatTurn(prompt, None, fmt, opened)
    grammar = thinking_grammar(fmt, spec, budget, opened=opened)
    json_answer = spec is not None and spec.kind == "json_schema"
    return ChatTurn(prompt, grammar, fmt, opened, budget, json_answer)
