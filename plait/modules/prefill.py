"""Prompt-aware prefill: a program's prompts computed before its calls need them.

A DSPy predictor's prompt is its instructions and demos (the same for every call: the *static
prefix*), then the call's input fields in signature order, then the answer. plait's engine
restores any block-aligned prompt prefix it has cached, so two things can be computed early:

- **at start-up**, every predictor's static prefix, pinned in the prefix cache for good
  (`pin_static_prefixes`): a served program's first call, and every call after a burst of long
  prompts has churned the cache, starts from it;
- **as soon as a later stage's inputs are partly known**, that stage's prompt so far
  (`prefill_stage`), as a background prefill that runs only while the engine would otherwise
  be idle (while the program retrieves, say) and never holds a generation up by more than one
  small pass. The stage's real call restores the blocks that match and computes the rest.

Both only move work earlier: the tokens a call is given, and therefore what it generates, are
unchanged. The static prefix is found by rendering the predictor's prompt with two different
placeholder inputs and keeping their common tokens, so no adapter's format needs to be known.
`prefill_stage` does nothing unless enabled (`stage_prefill(True)`; `plait serve` enables it)
or when the LM is not plait's local engine.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dspy

log = logging.getLogger(__name__)


class _Hints:
    """The background prefills one program call has started, by predictor: a newer hint for a
    predictor replaces (cancels) its older one, and all end with the call."""

    def __init__(self) -> None:
        self.running: dict[int, Any] = {}

    def start(self, predictor: Any, request: Any) -> None:
        older = self.running.pop(id(predictor), None)
        if older is not None:
            older.cancel()  # what it computed stays in the cache; the rest is the newer one's
        self.running[id(predictor)] = request

    def cancel_all(self) -> None:
        for request in self.running.values():
            request.cancel()
        self.running.clear()


_hints: contextvars.ContextVar[_Hints | None] = contextvars.ContextVar("plait_stage_prefill", default=None)


@contextlib.contextmanager
def stage_prefill(enabled: bool = True) -> Iterator[None]:
    """Within this block (this thread or task, and what it starts in a copied context),
    `prefill_stage` hints are acted on (or, with False, ignored); the prefills they started
    and that are still running when it ends are cancelled (`plait serve` runs each program
    call in one such block)."""
    hints = _Hints() if enabled else None
    token = _hints.set(hints)
    try:
        yield
    finally:
        _hints.reset(token)
        if hints is not None:
            hints.cancel_all()


@dataclass(frozen=True)
class PinnedPrefix:
    """A predictor's static prompt prefix, computed into the prefix cache and pinned there."""

    predictor: str
    tokens: int  # the prefix's tokens (the cache holds its whole blocks)
    computed: int  # of those, the tokens that were computed now (the rest were cached already)


def _plait_engine(lm: Any) -> Any:
    """The `PlaitEngine` behind a DSPy LM (or a wrapper that passes its calls on), or None."""
    engine = getattr(lm, "engine", None)
    return engine if callable(getattr(engine, "prefill", None)) else None


def _prompt_ids(engine: Any, adapter: Any, predictor: Any, inputs: dict[str, Any]) -> list[int]:
    messages = adapter.format(predictor.signature, predictor.demos, inputs)
    return engine.prompt_ids(messages)


def _placeholders(predictor: Any, tag: str) -> dict[str, str]:
    return {name: f"{tag} {name}" for name in predictor.signature.input_fields}


def static_prefix(predictor: Any, adapter: Any, engine: Any) -> list[int]:
    """The token ids every call of `predictor` starts with under `adapter` on `engine` (a
    `PlaitEngine`): the common prefix of its prompt rendered with two sets of placeholder
    inputs, less its last token (the token before an input can merge with the input's first
    characters, differently for each input)."""
    first = _prompt_ids(engine, adapter, predictor, _placeholders(predictor, "Alpha"))
    second = _prompt_ids(engine, adapter, predictor, _placeholders(predictor, "Beta"))
    shared = next((i for i, (x, y) in enumerate(zip(first, second)) if x != y), min(len(first), len(second)))
    return first[: max(shared - 1, 0)]


def pin_static_prefixes(program: Any, lm: Any, adapter: Any) -> list[PinnedPrefix]:
    """Compute every predictor's static prefix into `lm`'s prefix cache and pin it there;
    returns what was pinned (nothing when `lm` is not plait's local engine). Waits for the
    prefills to end: call it before serving."""
    engine = _plait_engine(lm)
    if engine is None:
        return []
    adapter = adapter or dspy.ChatAdapter()
    started = []
    for name, predictor in program.named_predictors():
        ids = static_prefix(predictor, adapter, engine)
        started.append((name, ids, engine.prefill(ids, pin=True)))
    pinned = []
    for name, ids, request in started:
        request.wait()
        pinned.append(PinnedPrefix(name, len(ids), len(request.prompt_ids) - request.usage.cached_tokens))
    return pinned


def prefill_stage(predictor: Any, **known_inputs: Any) -> Any:
    """Hint that `predictor` will be called with inputs that begin like `known_inputs` (a list
    that will grow, fields still to come left out): its prompt so far is prefilled in the
    background, in the current DSPy settings' LM and adapter; it replaces this call's earlier
    hint for `predictor`. Returns the engine's prefill request, or None when stage prefill is
    off or the LM is not plait's local engine.

    The rendering stops being a prefix of the real prompt where the known inputs stop (a
    missing field is rendered as absent, a list ends early): only the blocks before that point
    are ever restored, the rest was idle work."""
    hints = _hints.get()
    if hints is None:
        return None
    engine = _plait_engine(dspy.settings.lm)
    if engine is None:
        return None
    adapter = dspy.settings.adapter or dspy.ChatAdapter()
    inputs = {name: known_inputs[name] for name in predictor.signature.input_fields if name in known_inputs}
    try:
        ids = _prompt_ids(engine, adapter, predictor, inputs)
    except Exception:  # an adapter that needs every input to render: no hint, the call runs as ever
        log.debug("no stage prefill for %s", predictor, exc_info=True)
        return None
    request = engine.prefill(ids, background=True)
    hints.start(predictor, request)
    return request
