"""DSPy's streaming (`dspy.streamify` + `StreamListener`) for plait's adapters.

A `dspy.streaming.StreamListener` finds a field in the streamed text by the markers of the
adapter in use, looked up by the adapter's class *name* (`ChatAdapter`, `JSONAdapter`,
`XMLAdapter`); any other name is refused ("Unsupported adapter for streaming"). plait's
adapters write exactly the markers of the DSPy adapter they extend — `ConstrainedAdapter` is
ChatAdapter's `[[ ## field ## ]]` under a grammar, `ConstrainedJSONAdapter` is JSONAdapter's
keys — so a listener only has to be told which family an adapter belongs to.

`teach_stream_listeners()` (run when `plait.modules.adapter` is imported) makes every
listener, made before or after, resolve an adapter it does not know by name through the
adapter's base classes: a subclass of ChatAdapter streams as ChatAdapter does, and so on.
DSPy's own adapters resolve as before, and code that streams with them is unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import dspy
from dspy.streaming.streaming_listener import StreamListener


class _MarkersByFamily(dict):
    """A listener's table of adapter markers that also answers for subclasses: an unknown
    adapter name resolves to the nearest base class of the adapter now configured in DSPy
    whose markers the table has."""

    def _family(self, name: str) -> str | None:
        adapter = dspy.settings.adapter
        if adapter is None or type(adapter).__name__ != name:
            return None
        known = (base.__name__ for base in type(adapter).__mro__ if dict.__contains__(self, base.__name__))
        return next(known, None)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and self._family(name) is not None)

    def __missing__(self, name: str) -> Any:
        family = self._family(name)
        if family is None:
            raise KeyError(name)
        return dict.__getitem__(self, family)


def teach_stream_listeners() -> None:
    """Wrap `StreamListener.receive` once so a listener's marker table answers for adapter
    subclasses — listeners made before this ran included (idempotent)."""
    original = StreamListener.receive
    if getattr(original, "_plait_families", False):
        return

    @functools.wraps(original)
    def receive(self: StreamListener, chunk: Any) -> Any:
        if not isinstance(self.adapter_identifiers, _MarkersByFamily):
            self.adapter_identifiers = _MarkersByFamily(self.adapter_identifiers)
        return original(self, chunk)

    receive._plait_families = True  # type: ignore[attr-defined]
    StreamListener.receive = receive
