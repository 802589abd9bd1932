"""Optimizer names -> DSPy optimizers, with budgets sized for a small local model on a CPU.

| name            | DSPy                               | what it changes                                |
| --------------- | ---------------------------------- | ---------------------------------------------- |
| labeled         | LabeledFewShot                     | k labelled demos, no LM calls                  |
| bootstrap       | BootstrapFewShot                   | demos the program itself got right             |
| random-search   | BootstrapFewShotWithRandomSearch   | best of several bootstrapped demo sets on dev  |
| mipro           | MIPROv2 (auto="light")             | instructions + demos, Bayesian search (optuna) |
| gepa            | GEPA (auto="light")                | instructions by reflective evolution           |
| simba           | SIMBA                              | demos + rules from hard examples               |

Every default can be overridden from the command line with `--optimizer-arg key=value`
(JSON values: `--optimizer-arg max_bootstrapped_demos=8`).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy

from plait.compilers.errors import OptimizerError

OPTIMIZERS = ("labeled", "bootstrap", "random-search", "mipro", "gepa", "simba")


@dataclass
class Plan:
    """How to run one optimizer: the object, and the keyword arguments of its `compile`."""

    optimizer: Any
    compile_kwargs: dict[str, Any]
    uses_devset: bool  # the optimizer selects on the dev set (then "after" on dev is optimistic)


def parse_optimizer_args(items: list[str] | None) -> dict[str, Any]:
    """`["k=8", "auto=\"light\""]` -> `{"k": 8, "auto": "light"}` (values are JSON, else text)."""
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise OptimizerError(f"--optimizer-arg expects key=value, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def _feedback_metric(metric: Callable[..., Any]) -> Callable[..., Any]:
    """GEPA calls metric(gold, pred, trace, pred_name, pred_trace); plain metrics take three."""

    def gepa_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return metric(gold, pred, trace)

    gepa_metric.__name__ = getattr(metric, "__name__", "metric")
    return gepa_metric


def _construct(cls: type, defaults: dict[str, Any], overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Build `cls` from defaults+overrides; overrides that `cls()` does not take go to compile()."""
    init_params = set(inspect.signature(cls.__init__).parameters)
    init = {**defaults, **{k: v for k, v in overrides.items() if k in init_params}}
    rest = {k: v for k, v in overrides.items() if k not in init_params}
    try:
        return cls(**init), rest
    except (TypeError, ValueError) as exc:
        raise OptimizerError(f"cannot configure {cls.__name__}: {exc}") from exc


def build(
    name: str,
    metric: Callable[..., Any],
    *,
    trainset: list,
    devset: list,
    threads: int,
    seed: int,
    lm: Any,
    overrides: dict[str, Any] | None = None,
) -> Plan:
    """The optimizer `name`, ready to `compile(student, **plan.compile_kwargs)`."""
    overrides = dict(overrides or {})
    if name == "labeled":
        optimizer, rest = _construct(dspy.LabeledFewShot, {"k": 8}, overrides)
        return Plan(optimizer, {"trainset": trainset, **rest}, uses_devset=False)
    if name == "bootstrap":
        optimizer, rest = _construct(
            dspy.BootstrapFewShot,
            {"metric": metric, "max_bootstrapped_demos": 4, "max_labeled_demos": 4},
            overrides,
        )
        return Plan(optimizer, {"trainset": trainset, **rest}, uses_devset=False)
    if name == "random-search":
        optimizer, rest = _construct(
            dspy.BootstrapFewShotWithRandomSearch,
            {
                "metric": metric,
                "max_bootstrapped_demos": 4,
                "max_labeled_demos": 4,
                "num_candidate_programs": 4,
                "num_threads": threads,
            },
            overrides,
        )
        return Plan(optimizer, {"trainset": trainset, "valset": devset, **rest}, uses_devset=True)
    if name == "mipro":
        if importlib.util.find_spec("optuna") is None:
            raise OptimizerError("--optimizer mipro needs optuna: pip install optuna")
        optimizer, rest = _construct(
            dspy.MIPROv2,
            {
                "metric": metric,
                "auto": "light",
                "num_threads": threads,
                "seed": seed,
                "prompt_model": lm,
                "task_model": lm,
                "max_bootstrapped_demos": 2,
                "max_labeled_demos": 2,
            },
            overrides,
        )
        return Plan(
            optimizer,
            {
                "trainset": trainset,
                "valset": devset,
                "seed": seed,
                "requires_permission_to_run": False,
                "minibatch_size": min(35, max(1, len(devset))),
                **rest,
            },
            uses_devset=True,
        )
    if name == "gepa":
        defaults = {
            "metric": _feedback_metric(metric),
            "reflection_lm": lm,
            "num_threads": threads,
            "seed": seed,
        }
        if not {"auto", "max_full_evals", "max_metric_calls"} & set(overrides):
            defaults["auto"] = "light"
        optimizer, rest = _construct(dspy.GEPA, defaults, overrides)
        return Plan(optimizer, {"trainset": trainset, "valset": devset, **rest}, uses_devset=True)
    if name == "simba":
        optimizer, rest = _construct(
            dspy.SIMBA,
            {
                "metric": metric,
                "bsize": min(8, max(1, len(trainset))),
                "num_candidates": 4,
                "max_steps": 4,
                "max_demos": 4,
                "num_threads": threads,
                "prompt_model": lm,
            },
            overrides,
        )
        return Plan(optimizer, {"trainset": trainset, "seed": seed, **rest}, uses_devset=False)
    raise OptimizerError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
