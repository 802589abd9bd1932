"""What a model pass costs, learned from the passes an engine runs: seconds = fixed + per_token * positions.

On a GPU a pass of a few tokens costs about what a one-token pass costs (the weights are read
once either way), so drafting is nearly free; on a CPU each extra position is real compute,
and a step that needs a second pass (drafting rows beside plain decode rows) pays the weights
twice. The scheduler asks `PassCosts` whether a step's drafts are worth it
(`Scheduler._draft`), so speculation helps where the hardware rewards it and stays out of the
way where it does not.
"""

from dataclasses import dataclass

MAX_POSITIONS = 512
"""Passes larger than this (long prefill chunks) say little about decode-sized passes."""

DECAY = 0.98
"""Each new pass weighs this much more than the one before it: the fit follows the load."""


@dataclass
class PassCosts:
    """A weighted least-squares line through (positions, seconds) of recent passes."""

    _weight: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def record(self, positions: int, seconds: float) -> None:
        if positions > MAX_POSITIONS:
            return
        self._weight = DECAY * self._weight + 1.0
        self._x = DECAY * self._x + positions
        self._y = DECAY * self._y + seconds
        self._xx = DECAY * self._xx + positions * positions
        self._xy = DECAY * self._xy + positions * seconds

    def line(self) -> tuple[float, float] | None:
        """(fixed seconds per pass, seconds per position), or None before passes of at least
        two sizes were seen."""
        spread = self._weight * self._xx - self._x * self._x
        if self._weight < 2 or spread <= 1e-9 * max(1.0, self._xx * self._weight):
            return None
        per_token = max(0.0, (self._weight * self._xy - self._x * self._y) / spread)
        fixed = max(0.0, (self._y - per_token * self._x) / self._weight)
        return fixed, per_token
