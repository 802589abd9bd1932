"""Reasoning ("thinking") in the model's own format: the switch, the budget, the grammar.

Nemotron checkpoints think inside `<think>...</think>` before they answer, and their chat
templates decide whether they do:

* a *template kwarg* (Nemotron 3, ChatML): `enable_thinking` (default true); off renders the
  generation prompt with an empty `<think></think>`;
* a *flag* in a message (NVIDIA-Nemotron-Nano-9B-v2): `/think` or `/no_think` in the system or a
  user message, the last one winning; off renders `<think></think>` too;
* no switch: the template has a thinking block but no way to turn it off; "off" is then a
  budget of 0 (the block is closed at once).

Which one a checkpoint has is read from its template text (`detect_reasoning_format`). What a
caller asks for is a `ReasoningRequest`: the model's default, on, off, or a token budget (DSPy's
and OpenAI's effort words map to budgets: `EFFORT_BUDGETS`). A budget is enforced the way
NVIDIA's serving stacks do it: once the budget is spent, wait up to a grace window (a tenth of
the budget) for a newline, then force `</think>` and go on with the answer. Here that is a
`FieldBudget` on the turn's grammar, so the answer after the thinking block is still decoded
under its own grammar (a signature's fields, a JSON schema, a tool call) and still parses.

Plain strings only: no torch, no llguidance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from plait.backends.grammar.spec import FieldBudget, GrammarError, GrammarSpec, lark_rules, lark_string

ReasoningSwitch = Literal["kwarg", "flag", "none"]

#: Token budgets for effort words (DSPy's `reasoning_effort`, OpenAI's `reasoning_effort`).
#: `max` is unbounded (up to the turn's `max_tokens`); `off`/`none` turn thinking off.
EFFORT_BUDGETS: dict[str, int | None] = {
    "minimal": 64,
    "low": 256,
    "medium": 1024,
    "high": 4096,
    "xhigh": 8192,
    "max": None,
}
OFF_WORDS = frozenset({"off", "none"})

#: When a grammar follows the thinking block, thinking gets at most this share of
#: `max_tokens`, so the answer always has room to finish.
THINKING_SHARE = 0.5

_FLAG_ON, _FLAG_OFF = "/think", "/no_think"


class ReasoningError(GrammarError):
    """A reasoning setting that is malformed, or asks a model without a thinking format to think."""


@dataclass(frozen=True)
class ReasoningFormat:
    """How a chat template thinks: its switch, and the block's open and close markers."""

    switch: ReasoningSwitch
    open: str = "<think>"
    close: str = "</think>"
    kwarg: str = "enable_thinking"

    def prompt_state(self, prompt: str) -> Literal["open", "closed", "absent"]:
        """Where a rendered generation prompt leaves the thinking block: `open` (the output
        starts inside it), `closed` (an empty block: thinking is off) or `absent` (the model
        would write `<think>` itself, or not think)."""
        tail = prompt.rstrip()
        if tail.endswith(self.open):
            return "open"
        if tail.endswith(self.close) and tail[: -len(self.close)].rstrip().endswith(self.open):
            return "closed"
        return "absent"


def detect_reasoning_format(template: str | None) -> ReasoningFormat | None:
    """The thinking format a chat template renders, or None when it has no thinking block."""
    if not template or "<think>" not in template:
        return None
    if "enable_thinking" in template:
        return ReasoningFormat("kwarg")
    if _FLAG_OFF in template:
        return ReasoningFormat("flag")
    return ReasoningFormat("none")


@dataclass(frozen=True)
class ReasoningRequest:
    """What a caller asks of the thinking block: `mode` default (the template decides), on
    or off; `budget` caps the thinking tokens (None: no cap but `max_tokens`)."""

    mode: Literal["default", "on", "off"] = "default"
    budget: int | None = None

    @classmethod
    def parse(cls, value: object) -> ReasoningRequest:
        """From what users write: None, "on", "off", an effort word, a budget (int >= 0, or
        its digits), or a `ReasoningRequest`. Raises `ReasoningError` on anything else."""
        if value is None or isinstance(value, ReasoningRequest):
            return value or cls()
        if isinstance(value, bool):
            return cls("on" if value else "off")
        if isinstance(value, str):
            word = value.strip().lower()
            if word == "on":
                return cls("on")
            if word in OFF_WORDS:
                return cls("off")
            if word in EFFORT_BUDGETS:
                return cls("on", EFFORT_BUDGETS[word])
            if word.isdigit():
                return cls("on", int(word))
        elif isinstance(value, int):
            if value < 0:
                raise ReasoningError(f"a thinking budget is a token count >= 0, not {value}")
            return cls("on", value)
        words = ", ".join(["on", "off", *EFFORT_BUDGETS])
        raise ReasoningError(f"reasoning must be one of {words}, or a token budget; got {value!r}")

    @classmethod
    def from_dspy(cls, wanted: Any) -> ReasoningRequest:
        """From a DSPy request's `config.reasoning` (lm15's `Reasoning`: effort "off", a
        `thinking_budget`, or an effort word mapped by `EFFORT_BUDGETS`; None: the default)."""
        if wanted is None:
            return cls()
        if wanted.is_off:
            return cls("off")
        if wanted.thinking_budget is not None:
            return cls("on", wanted.thinking_budget)
        return cls.parse(wanted.effort)

    def setting(self) -> str | int | None:
        """What a user writes for this request (`parse` reads it back)."""
        if self.mode == "default":
            return None
        return self.budget if self.budget is not None else self.mode

    def model_suffix(self) -> str:
        """A suffix for a model string that keeps cached answers of different settings apart."""
        return "" if self.mode == "default" else f"@reasoning-{self.setting()}"

    def merged(self, override: ReasoningRequest) -> ReasoningRequest:
        """`override` (a per-call setting) where it says something, else this (the LM's)."""
        return self if override.mode == "default" else override


def switch_messages(
    fmt: ReasoningFormat, request: ReasoningRequest, messages: list[dict]
) -> tuple[list[dict], dict[str, object]]:
    """The messages and template kwargs that render `request`'s on/off in `fmt`'s own switch.

    A flag goes at the end of the system message (one is added when there is none), so a later
    user flag still wins, as the template's own rule says."""
    if request.mode == "default" or fmt.switch == "none":
        return messages, {}
    on = request.mode == "on"
    if fmt.switch == "kwarg":
        return messages, {fmt.kwarg: on}
    flag = _FLAG_ON if on else _FLAG_OFF
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        content = messages[0].get("content") or ""
        messages[0]["content"] = f"{content}\n{flag}" if content else flag
    else:
        messages.insert(0, {"role": "system", "content": flag})
    return messages, {}


_BODY = "after_thinking"  # the rule name of what follows the block


def _body_rules(body: GrammarSpec | None) -> list[str]:
    """`body` (what follows the thinking block) as Lark rules whose start is `_BODY`."""
    if body is None:
        return [f"{_BODY}: ANY_TEXT", "ANY_TEXT: /(?s:.*)/"]
    return lark_rules(body, _BODY)


def thinking_grammar(
    fmt: ReasoningFormat, body: GrammarSpec | None, budget: int | None, *, opened: bool
) -> GrammarSpec:
    """A thinking block, then `body` (None: any text).

    `opened`: the prompt already ends with `<think>` (else the output writes it first).
    `budget`: thinking tokens before `</think>` is forced, after a grace window of a tenth of
    the budget for a newline; None leaves the length to the model. The block's text is any
    text without `</think>`, and up to two newlines may separate it from the answer."""
    close = re.escape(fmt.close).replace("/", "\\/")
    head = "" if opened else lark_string(fmt.open) + " "
    lines = [
        f"start: {head}THOUGHT GAP {_BODY}",
        # one lexeme up to the first close: a lexer that matched the block's text and the
        # close apart would read `</` as more text and never reach the close
        f"THOUGHT: /(?s:.*){close}/ & ~/(?s:.*){close}(?s:.+)/",
        "GAP: /\\n{0,2}/",
        *_body_rules(body),
    ]
    budgets = list(body.budgets) if body is not None else []
    if budget is not None:
        budgets.insert(0, FieldBudget("" if opened else fmt.open, budget, fmt.close, grace=budget // 10))
    return GrammarSpec.lark("\n".join(lines) + "\n", budgets)


def split_thinking(fmt: ReasoningFormat, text: str, *, opened: bool) -> tuple[str | None, str]:
    """(reasoning, answer) of a generated turn. `opened`: the output started inside the block.
    A block that never closed (the turn ran out of tokens) is all reasoning."""
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith(fmt.open):
            return None, text
        text = stripped[len(fmt.open) :]
    thought, closed, answer = text.partition(fmt.close)
    if not closed:
        return thought.strip(), ""
    return thought.strip(), answer.lstrip("\n")


class ThinkingStream:
    """Splits streamed deltas into reasoning and answer pieces as they arrive.

    A delta may end in the middle of `</think>`; that tail is held back until the next delta
    shows whether it is the marker. `feed` returns (reasoning, answer) pieces, either empty."""

    def __init__(self, fmt: ReasoningFormat, *, opened: bool):
        self.fmt = fmt
        self.state: Literal["before", "thinking", "answer"] = "thinking" if opened else "before"
        self._held = ""
        self._answer_started = False

    def feed(self, delta: str) -> tuple[str, str]:
        text = self._held + delta
        self._held = ""
        if self.state == "before":
            stripped = text.lstrip()
            if len(stripped) < len(self.fmt.open) and self.fmt.open.startswith(stripped):
                self._held = text
                return "", ""
            if not stripped.startswith(self.fmt.open):
                self.state = "answer"
                return "", text
            self.state, text = "thinking", stripped[len(self.fmt.open) :]
        if self.state == "thinking":
            thought, closed, rest = text.partition(self.fmt.close)
            if not closed:
                keep = _partial_suffix(thought, self.fmt.close)
                self._held = thought[len(thought) - keep :] if keep else ""
                return thought[: len(thought) - keep], ""
            self.state = "answer"
            return thought, self._answer(rest)
        return "", self._answer(text)

    def flush(self) -> tuple[str, str]:
        """What is still held back when the stream ends."""
        held, self._held = self._held, ""
        if self.state == "answer" or self.state == "before":
            return "", self._answer(held)
        return held, ""

    def _answer(self, text: str) -> str:
        if not self._answer_started:  # the newlines between the block and the answer
            text = text.lstrip("\n")
            self._answer_started = bool(text)
        return text


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
