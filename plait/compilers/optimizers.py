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
(JSON values: `--optimizer-arg max_bootstrapped_demos=8`). `check_overrides` checks them
against the optimizer's own constructor and `compile` signatures before any work starts: a
misspelt name or a value of the wrong type would otherwise surface only when the optimizer
runs, after the baseline evaluation.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy
import pydantic

from plait.compilers.errors import OptimizerError

CLASSES: dict[str, type] = {
    "labeled": dspy.LabeledFewShot,
    "bootstrap": dspy.BootstrapFewShot,
    "random-search": dspy.BootstrapFewShotWithRandomSearch,
    "mipro": dspy.MIPROv2,
    "gepa": dspy.GEPA,
    "simba": dspy.SIMBA,
}
OPTIMIZERS = tuple(CLASSES)
#: What plait passes the optimizer itself (objects, not JSON): not settable by --optimizer-arg.
PLAIT_SETS = frozenset(
    {"metric", "student", "teacher", "trainset", "valset", "prompt_model", "task_model", "reflection_lm"}
)


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


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named parameters of `cls()` and `cls().compile()`, annotations resolved where they can
    be (DSPy writes some as strings)."""
    found: dict[str, inspect.Parameter] = {}
    for function in (cls.__init__, cls.compile):
        try:
            signature = inspect.signature(function, eval_str=True)
        except Exception:  # an annotation that does not resolve here: keep the strings
            signature = inspect.signature(function)
        for parameter in signature.parameters.values():
            if parameter.name != "self" and parameter.kind in (
                parameter.POSITIONAL_OR_KEYWORD,
                parameter.KEYWORD_ONLY,
            ):
                found.setdefault(parameter.name, parameter)
    return found


def _expected_type(parameter: inspect.Parameter) -> Any:
    """The type a JSON value for `parameter` must have: its annotation, else the type of its
    plain default (`max_rounds=1` takes an int); None when neither says (anything goes)."""
    annotation = parameter.annotation
    if annotation is not inspect.Parameter.empty and not isinstance(annotation, str):
        return annotation
    default = parameter.default
    return type(default) if type(default) in (bool, int, float, str) else None


def _type_name(expected: Any) -> str:
    return expected.__name__ if isinstance(expected, type) else repr(expected).replace("typing.", "")


def check_overrides(name: str, overrides: dict[str, Any]) -> None:
    """Raise `OptimizerError` unless optimizer `name` takes every override, each value of the
    type its parameter declares (strictly: `true` is not an int, `"3"` is not a number)."""
    if name not in CLASSES:
        raise OptimizerError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    cls = CLASSES[name]
    parameters = _parameters(cls)
    settable = sorted(set(parameters) - PLAIT_SETS)
    for key, value in overrides.items():
        if key in PLAIT_SETS:
            raise OptimizerError(f"--optimizer-arg {key}: plait sets {key} itself")
        if key not in parameters:
            raise OptimizerError(
                f"--optimizer-arg {key}: {name} ({cls.__name__}) has no such setting; it takes "
                f"{', '.join(settable)}"
            )
        expected = _expected_type(parameters[key])
        if expected is None:
            continue
        try:
            adapter = pydantic.TypeAdapter(expected)
        except pydantic.PydanticSchemaGenerationError:  # an object type (an LM, a callable)
            continue
        try:
            adapter.validate_python(value, strict=True)
        except pydantic.ValidationError:
            raise OptimizerError(
                f"--optimizer-arg {key}={json.dumps(value)}: {name} ({cls.__name__}) expects "
                f"{_type_name(expected)}"
            ) from None


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
        optimizer, rest = _construct(CLASSES["labeled"], {"k": 8}, overrides)
        return Plan(optimizer, {"trainset": trainset, **rest}, uses_devset=False)
    if name == "bootstrap":
        optimizer, rest = _construct(
            CLASSES["bootstrap"],
            {"metric": metric, "max_bootstrapped_demos": 4, "max_labeled_demos": 4},
            overrides,
        )
        return Plan(optimizer, {"trainset": trainset, **rest}, uses_devset=False)
    if name == "random-search":
        optimizer, rest = _construct(
            CLASSES["random-search"],
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
            CLASSES["mipro"],
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
        optimizer, rest = _construct(CLASSES["gepa"], defaults, overrides)
        return Plan(optimizer, {"trainset": trainset, "valset": devset, **rest}, uses_devset=True)
    if name == "simba":
        optimizer, rest = _construct(
            CLASSES["simba"],
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
