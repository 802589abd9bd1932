"""Output fields streamed as they are generated, from ChatAdapter-format LM text.

DSPy's `StreamListener` expects a field's start marker, its text and its end marker to arrive
in separate, small chunks. plait's engine appends grammar-forced spans in one step, so a
single chunk often holds a whole marker plus text (`"[[ ## topic ## ]]\\nsc"`), or a field's
end and the completion marker together; the listener then misses the field. `FieldSplitter`
instead re-reads the text received so far: the current field is the one whose marker came
last, and text is released once it can no longer be part of a marker or of the whitespace
DSPy strips from a value. Whatever the chunking, the chunks of a field join to its value.

The format is ChatAdapter's (and `ConstrainedAdapter`'s): `[[ ## name ## ]]` on a line, the
value, a blank line, the next marker, ending with `[[ ## completed ## ]]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_MARKER_HEAD = "[[ ## "


@dataclass(frozen=True)
class FieldChunk:
    field: str
    chunk: str
    last: bool


def _held(tail: str) -> int:
    """How many trailing characters of `tail` to hold back: they may still become a marker, or
    whitespace that ends up stripped from the value."""
    at = tail.rfind("[")
    while at > 0 and tail[at - 1] == "[":
        at -= 1
    if at != -1:
        suffix = tail[at:]
        if _MARKER_HEAD.startswith(suffix) or (suffix.startswith(_MARKER_HEAD) and "]]" not in suffix):
            tail = tail[:at]
            return len(suffix) + len(tail) - len(tail.rstrip())
    return len(tail) - len(tail.rstrip())


class FieldSplitter:
    """Splits one LM response into chunks of the given output fields."""

    def __init__(self, fields: Iterable[str]):
        self.fields = set(fields)
        self.text = ""
        self.field: str | None = None  # the field being written
        self.start = 0  # where its value starts in `text`
        self.sent = 0  # how much of `text` was released
        self.done = False

    def feed(self, piece: str) -> list[FieldChunk]:
        """Chunks released by `piece`."""
        if self.done or not piece:
            return []
        self.text += piece
        out: list[FieldChunk] = []
        while True:
            marker = MARKER.search(self.text, self.sent if self.field is None else self.start)
            if marker is None:
                break
            if self.field is not None:
                out.extend(self._release(marker.start(), final=True))
            name = marker.group(1)
            self.field = name if name in self.fields else None
            self.start = self.sent = marker.end()
            if name == "completed":
                self.done = True
                return out
            while self.sent < len(self.text) and self.text[self.sent] in " \n":
                self.sent += 1  # the newline after a marker is not part of the value
            self.start = self.sent
        if self.field is not None:
            out.extend(self._release(len(self.text) - _held(self.text[self.sent :]), final=False))
        else:
            self.sent = max(self.sent, len(self.text) - _held(self.text[self.sent :]))
        return out

    def finish(self) -> list[FieldChunk]:
        """The rest of the open field, at the end of the response."""
        if self.done or self.field is None:
            return []
        self.done = True
        return self._release(len(self.text), final=True)

    def _release(self, end: int, final: bool) -> list[FieldChunk]:
        assert self.field is not None
        if self.sent < self.start:
            self.sent = self.start
        if self.sent == self.start:  # no text of this field released yet: skip leading blanks
            while self.sent < end and self.text[self.sent] in " \n":
                self.sent += 1
            self.start = self.sent
        piece = self.text[self.sent : end]
        if final:
            piece = piece.rstrip()
        self.sent = max(self.sent, end)
        if not piece and not final:
            return []
        return [FieldChunk(self.field, piece, final)]
