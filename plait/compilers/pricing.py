"""Pricing a run's LM calls at their idealized cost (`plait.backends.models.cost`).

A call is priced from its token counts and the architecture of the model that ran it, which
`CallPricer` reads from plait's local engine the first time a call needs it (the model's config
is on the loaded engine). Any other DSPy engine can say what it runs with a `cost_architecture`
attribute (an `Architecture`); one that does not (a remote server, a custom engine) has its
calls left unpriced, and reports say "n/a" rather than guess.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from plait.backends.clients.local import PlaitEngine
from plait.backends.models.cost import REFERENCE, Architecture, architecture, call_cost

log = logging.getLogger(__name__)

_UNKNOWN = object()


class CallPricer:
    """Idealized seconds of one call of `engine`'s model on the reference accelerator."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._architecture: Any = _UNKNOWN
        self._lock = threading.Lock()

    @property
    def reference(self) -> str:
        return REFERENCE.name

    def architecture(self) -> Architecture | None:
        """The model's architecture, read once (loading plait's engine if it is not yet)."""
        with self._lock:
            if self._architecture is _UNKNOWN:
                self._architecture = self._read_architecture()
            return self._architecture

    def _read_architecture(self) -> Architecture | None:
        declared = getattr(self.engine, "cost_architecture", None)
        if isinstance(declared, Architecture):
            return declared
        if not isinstance(self.engine, PlaitEngine):
            log.info("%s: no idealized cost for calls on a %s", self.engine, type(self.engine).__name__)
            return None
        config = self.engine.engine.model.config
        try:
            return architecture(config)
        except TypeError:
            log.warning("%s: no idealized cost model for %s", self.engine.model, type(config).__name__)
            return None

    def __call__(self, prompt_tokens: int, completion_tokens: int, forced_tokens: int) -> float | None:
        arch = self.architecture()
        if arch is None:
            return None
        return call_cost(arch, prompt_tokens, completion_tokens, forced_tokens).seconds
