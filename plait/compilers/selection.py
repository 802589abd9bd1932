"""Choosing among a compile's candidates by score and idealized cost.

An optimizer that scores several candidate programs on the dev set (random search scores
zero-shot, labeled, and bootstrapped demo sets of random sizes) keeps the best-scoring one.
More demos make a longer prompt, so a candidate a point below the best may cost much less per
example. A `Selection` says how to trade one for the other:

- `cost_weight` w: maximise `score - w * cost` (score in points of 0-100, cost in idealized
  milliseconds per example), spelled `--objective "score - w*cost"`;
- `max_cost`: only candidates costing at most this many idealized ms per example;
- `score_tolerance` t: the cheapest candidate scoring within t points of the best one.

Without any of them the optimizer's own pick stands. The Pareto front (no other candidate
scores at least as well for at most the cost, and better in one of the two) is reported either
way: it is the menu the choice is made from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from plait.compilers.errors import SelectionError

_OBJECTIVE = re.compile(
    r"^\s*score\s*(?:-\s*(?P<weight>(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*\*?\s*cost)?\s*$", re.IGNORECASE
)


def parse_objective(text: str) -> float:
    """`"score"` -> 0, `"score - 2.5*cost"` -> 2.5 (points per idealized ms per example)."""
    match = _OBJECTIVE.match(text)
    if match is None:
        raise SelectionError(
            f"--objective expects 'score' or 'score - W*cost' (W: score points per idealized ms "
            f"per example), got {text!r}"
        )
    return float(match["weight"] or 0.0)


@dataclass(frozen=True)
class Selection:
    """How a compile picks its result among the candidates (see the module docstring)."""

    cost_weight: float | None = None
    max_cost_ms: float | None = None
    score_tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.cost_weight is not None and self.score_tolerance is not None:
            raise SelectionError("--objective and --score-tolerance are two ways to pick: use one")
        for name, value in (
            ("--objective's weight", self.cost_weight),
            ("--max-cost", self.max_cost_ms),
            ("--score-tolerance", self.score_tolerance),
        ):
            if value is not None and not value >= 0:
                raise SelectionError(f"{name} must be a number at least 0, got {value}")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.cost_weight, self.max_cost_ms, self.score_tolerance))

    def describe(self) -> str:
        if not self.active:
            return "the optimizer's pick"
        parts = []
        if self.cost_weight is not None:
            parts.append(f"the best score - {self.cost_weight:g}*cost")
        elif self.score_tolerance is not None:
            parts.append(f"the cheapest within {self.score_tolerance:g} points of the best score")
        else:
            parts.append("the best score")
        if self.max_cost_ms is not None:
            parts.append(f"costing at most {self.max_cost_ms:g} ms per example")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "cost_weight": self.cost_weight,
            "max_cost_ms": self.max_cost_ms,
            "score_tolerance": self.score_tolerance,
            "rule": self.describe(),
        }


@dataclass(frozen=True)
class Candidate:
    """A whole program scored on the dev set: its trial number, score (0-100), mean idealized
    cost per example in seconds (None: not priced), and its demos (what makes it cost)."""

    trial: int
    label: str
    state_hash: str
    score: float
    ideal_seconds: float | None
    demos: int
    program: Any = field(default=None, compare=False, repr=False)

    @property
    def cost_ms(self) -> float | None:
        return None if self.ideal_seconds is None else 1000 * self.ideal_seconds


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The priced candidates no other priced candidate dominates, cheapest first (of equal
    candidates, the earliest)."""
    priced = sorted(
        (c for c in candidates if c.cost_ms is not None), key=lambda c: (c.cost_ms, -c.score, c.trial)
    )
    front: list[Candidate] = []
    for candidate in priced:  # cheapest first: on the front iff it beats every cheaper score
        if not front or candidate.score > front[-1].score:
            front.append(candidate)
    return front


def pick(candidates: list[Candidate], selection: Selection) -> Candidate:
    """The candidate `selection` chooses. Ties go to the cheaper candidate, then the earlier."""
    priced = [c for c in candidates if c.cost_ms is not None]
    if not priced:
        raise SelectionError(
            "no candidate has an idealized cost (the model has no cost model), so none can be "
            "picked by cost: leave out --objective, --max-cost and --score-tolerance"
        )
    eligible = priced
    if selection.max_cost_ms is not None:
        eligible = [c for c in priced if c.cost_ms <= selection.max_cost_ms]
        if not eligible:
            cheapest = min(c.cost_ms for c in priced)
            raise SelectionError(
                f"no candidate costs at most {selection.max_cost_ms:g} ms per example (the cheapest "
                f"costs {cheapest:.3g} ms): raise --max-cost; re-running picks again from the stored run"
            )
    if selection.cost_weight is not None:
        weight = selection.cost_weight
        return min(eligible, key=lambda c: (-(c.score - weight * c.cost_ms), c.cost_ms, c.trial))
    if selection.score_tolerance is not None:
        best = max(c.score for c in eligible)
        eligible = [c for c in eligible if c.score >= best - selection.score_tolerance]
        return min(eligible, key=lambda c: (c.cost_ms, -c.score, c.trial))
    return min(eligible, key=lambda c: (-c.score, c.cost_ms, c.trial))
