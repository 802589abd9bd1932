"""Token ids in, text out, at a cost linear in the output's length; stop strings cut the text.

Decoding the whole output again after every token (what a naive loop does) costs time
quadratic in its length. Decoding only the new tokens is not right either: a tokenizer's
decoder may join a token with its neighbours (a SentencePiece space, a UTF-8 character split
over byte tokens). So each step decodes a short window twice — the tokens since the last
complete piece of text, with and without the new ones — and keeps the difference, holding new
tokens back while they end in an incomplete character.

Stop strings are looked for only where a new one could end: in the new text plus the last
`len(stop) - 1` characters before it. That tail is also held back from a streaming caller,
since it may turn out to be the start of a stop string.
"""

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
"""What a decoder writes for bytes that are not (yet) a whole UTF-8 character."""


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self.stop = tuple(stop)
        self._hold = max((len(s) - 1 for s in self.stop), default=0)
        self._ids: list[int] = []
        self._window_start = 0  # first id of the window the next decode starts from
        self._decoded = 0  # ids up to here are in the text
        self._final: list[str] = []  # text that no stop string can still cut
        self._tail = ""  # text after that: may begin a stop string
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self._final) + self._tail

    def add(self, ids: Sequence[int]) -> str:
        """Take generated ids; returns the text that became final (safe to stream)."""
        if self.stopped:
            return ""
        self._ids.extend(ids)
        return self._take(self._new_text(complete_only=True))

    def finish(self) -> str:
        """No ids will follow: decode what an incomplete character held back and release the
        held tail; returns that last piece of text."""
        if self.stopped:
            return ""
        piece = self._take(self._new_text(complete_only=False))
        if self.stopped:
            return piece
        rest, self._tail = self._tail, ""
        self._final.append(rest)
        return piece + rest

    def _new_text(self, complete_only: bool) -> str:
        before = self._decode(self._ids[self._window_start : self._decoded])
        after = self._decode(self._ids[self._window_start :])
        if len(after) <= len(before) or (complete_only and after.endswith(REPLACEMENT)):
            return ""  # nothing yet, or an incomplete character: wait for the next ids
        self._window_start, self._decoded = self._decoded, len(self._ids)
        return after[len(before) :]

    def _take(self, new: str) -> str:
        if not new:
            return ""
        text = self._tail + new
        for stop in self.stop:  # the first stop string listed wins, wherever the others are
            at = text.find(stop)
            if at != -1:
                self._final.append(text[:at])
                self._tail, self.stopped = "", True
                return text[:at]
        keep = min(self._hold, len(text))
        ready, self._tail = text[: len(text) - keep], text[len(text) - keep :]
        self._final.append(ready)
        return ready
