"""Output fields handed to the program the moment the grammar closes them.

A DSPy predictor returns when its whole answer is generated. Under plait's constrained
ChatAdapter format an output field is final earlier: as soon as the model has written the next
field's marker (the grammar allows nothing else once a field's text ends). `on_fields_closed`
streams every LM call made inside it (`plait.backends.clients.local.observing`) through a
`FieldSplitter` and calls `callback(field, value)` for each watched field the moment it is
final — while the call is still generating the fields after it — so dependent work (a search
on a `query` field, a tool call, the next stage's prompt) can start early:

    with ThreadPoolExecutor(1) as pool, on_fields_closed(
        lambda name, value: futures.setdefault(name, pool.submit(search, value)), ["query"]
    ):
        prediction = self.plan(question=question)   # fields: query, then rationale
    passages = futures["query"].result()            # searched while `rationale` was written

The value is the field's text as the adapter will parse it (stripped); typed fields are parsed
by the predictor as always. Calls on other LMs, and calls DSPy answers from its cache, report
nothing (the callback never runs; the program goes on as it would).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from plait.backends.clients.local import observing
from plait.modules.fields import FieldSplitter

FieldCallback = Callable[[str, str], object]


class _FieldWatcher:
    """One LM call's text: the callback for each watched field as it closes."""

    def __init__(self, callback: FieldCallback, fields: list[str]):
        self.callback = callback
        self.splitter = FieldSplitter(fields)
        self.values: dict[str, list[str]] = {}

    def __call__(self, piece: str | None) -> None:
        chunks = self.splitter.finish() if piece is None else self.splitter.feed(piece)
        for chunk in chunks:
            self.values.setdefault(chunk.field, []).append(chunk.chunk)
            if chunk.last:
                self.callback(chunk.field, "".join(self.values.pop(chunk.field)))


@contextlib.contextmanager
def on_fields_closed(callback: FieldCallback, fields: Iterable[str]) -> Iterator[None]:
    """Within this block, `callback(field, value)` runs on the calling thread as each of
    `fields` is closed by the grammar in a plait LM call (see the module docstring)."""
    watched = list(fields)
    with observing(lambda: _FieldWatcher(callback, watched)):
        yield
