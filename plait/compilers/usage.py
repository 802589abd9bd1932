"""Token and idealized-cost accounting for compile and eval: totals for the run and per example.

Every LM call of a run passes through `RecordingEngine`, which reports its usage here. A
thread can open `measure()` around one example: the calls made on that thread while it is open
are added to the example's `Usage` as well as to the total (DSPy's sync engine runs a call
on the thread that made it, so one example = one thread's calls).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields


@dataclass
class Usage:
    calls: int = 0
    replayed: int = 0  # calls answered from the store (a resumed run)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forced_tokens: int = 0  # completion tokens the grammar forced (no sampling step)
    ideal_seconds: float = 0.0  # idealized cost of the priced calls (plait.backends.models.cost)
    unpriced: int = 0  # calls without an idealized cost (a model plait has no cost model for)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def forced_share(self) -> float | None:
        """Forced share of completion tokens; None when no completion tokens were counted."""
        return self.forced_tokens / self.completion_tokens if self.completion_tokens else None

    @property
    def cost(self) -> float | None:
        """Idealized seconds of all the calls; None when any call could not be priced (a
        partial sum would understate it)."""
        return None if self.unpriced else self.ideal_seconds

    def add(self, other: Usage) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def since(self, earlier: Usage) -> Usage:
        """What was used after `earlier` (a snapshot of the same totals) was taken."""
        return Usage(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, int | float | None]:
        return {**asdict(self), "total_tokens": self.total_tokens, "forced_share": self.forced_share}


class UsageMeter:
    """Thread-safe totals, plus per-thread `measure()` scopes."""

    def __init__(self) -> None:
        self.total = Usage()
        self._lock = threading.Lock()
        self._local = threading.local()

    def add(self, usage: Usage) -> None:
        with self._lock:
            self.total.add(usage)
        for scope in getattr(self._local, "scopes", ()):
            scope.add(usage)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Usage]:
        scope = Usage()
        scopes = self._local.__dict__.setdefault("scopes", [])
        scopes.append(scope)
        try:
            yield scope
        finally:
            scopes.remove(scope)

    def snapshot(self) -> Usage:
        with self._lock:
            copy = Usage()
            copy.add(self.total)
            return copy
