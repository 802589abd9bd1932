"""The LM and adapter a compile or eval runs with.

The adapter is `plait.ConstrainedAdapter` whenever the LM decodes under a grammar (plait's
engine): every prediction then parses, even on a 135M model, and typed outputs (Literal, int)
come out typed. With an LM that cannot (an engine without grammar support), DSPy's
`ChatAdapter` is used and parse failures are counted instead.
"""

from __future__ import annotations

import logging
from typing import Any

import dspy

from plait.errors import PlaitError

log = logging.getLogger(__name__)

ADAPTERS = ("auto", "constrained", "chat", "json")


def make_lm(model: str, *, max_tokens: int | None = None, temperature: float = 0.0) -> dspy.LM:
    """plait's LM for `model` (a registered name, a GGUF/HF path, or what `plait.LM` accepts).
    DSPy's own response cache is off: a run's calls are recorded in the store instead."""
    from plait.backends.clients.local import LM

    options: dict[str, Any] = {"cache": False, "temperature": temperature}
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    return LM(model, **options)


def select_adapter(lm: Any, name: str = "auto") -> Any:
    """The adapter called `name` for `lm`; `auto` = constrained when the LM supports it."""
    if name not in ADAPTERS:
        raise PlaitError(f"unknown adapter {name!r}: use one of {', '.join(ADAPTERS)}")
    if name == "chat":
        return dspy.ChatAdapter()
    if name == "json":
        try:
            from plait.modules.adapter import ConstrainedJSONAdapter
        except ImportError:
            return dspy.JSONAdapter()
        return ConstrainedJSONAdapter(require_grammar_engine=False)
    try:
        from plait.modules.adapter import ConstrainedAdapter, accepts_grammar
    except ImportError:
        if name == "constrained":
            raise PlaitError("plait.modules.adapter (the constrained adapter) is not available") from None
        return dspy.ChatAdapter()
    if accepts_grammar(lm):
        return ConstrainedAdapter()
    if name == "constrained":
        raise PlaitError(f"{getattr(lm, 'model', lm)} cannot decode under a grammar: use --adapter chat")
    log.warning(
        "%s does not decode under a grammar: using DSPy's ChatAdapter (parse failures possible)",
        getattr(lm, "model", lm),
    )
    return dspy.ChatAdapter()
