"""A predictor's own LM in saved program state, rebuilt only when it is a plait LM.

`predictor.set_lm(plait.LM("smollm2-135m", temperature=0.3))` puts the LM into the program's
state: its model string, DSPy settings and the engine it runs on, recorded as a class path
(`plait.backends.clients.local:PlaitEngine`) and that engine's own state. DSPy rebuilds such an
engine only under `allow_unsafe_lm_state=True`, which trusts the whole file: it may then import
any class it names, point an LM at any endpoint (`api_base`, `base_url`) and pass any keyword.

plait reads the same state as data instead. An LM is rebuilt if and only if it is a plait LM
on the local engine, which `check_plait_lm_state` checks key by key: DSPy's own LM class, a
model string `plait/...`, the local engine's two classes (compared as strings: nothing named
in the file is imported), an engine model that is a registered name or a checkpoint path (not
a URL), engine options and DSPy settings from fixed lists with plain JSON values. The LM is
then built by `plait.LM(...)` from those values, and must come out with the saved model
string. Anything else is an `LMStateError` naming what was refused. The engine itself loads
on the first call, as for any `plait.LM`; the checkpoint it reads is what the artifact's own
`model` field may name too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plait.compilers.errors import LMStateError
from plait.errors import PlaitError

Refusal = Callable[[str], LMStateError]

#: DSPy's LM class as `dump_state` records it: the only one plait rebuilds.
DSPY_LM_CLASS = "dspy.clients.lm.LM"
#: Keys of DSPy's `LM.dump_state` with the only values a `plait.LM` gives them.
FIXED = {"model_type": "chat", "finetuning_model": None, "launch_kwargs": {}, "train_kwargs": {}}
#: DSPy settings a `plait.LM` may carry (sampling; `rollout_id` keys DSPy's cache).
SETTINGS = frozenset({"temperature", "max_tokens", "top_p", "top_k", "seed", "stop", "n", "rollout_id"})
#: The local engine's loading options besides `EngineOptions` (see `plait.LM`).
LOAD_OPTIONS = frozenset({"device", "dtype", "quantize"})
ENGINE_STATE = frozenset({"model", "engine_options", "reasoning"})

_SCALARS = (str, int, float, bool, type(None))


def _plain(key: str, value: Any) -> bool:
    """A JSON scalar, or for `stop` a list of strings too."""
    if key == "stop" and isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    return isinstance(value, _SCALARS)


def _engine_classes() -> dict[str, str]:
    """The class path DSPy records for each of the local engine's two halves."""
    from plait.backends.clients.local import AsyncPlaitEngine, PlaitEngine

    return {
        "engine": f"{PlaitEngine.__module__}:{PlaitEngine.__qualname__}",
        "async_engine": f"{AsyncPlaitEngine.__module__}:{AsyncPlaitEngine.__qualname__}",
    }


def check_plait_lm_state(state: Any, where: str) -> dict[str, Any]:
    """The engine state of `state` (a predictor's saved LM) once every key of it has been
    checked as a plait LM's; raises `LMStateError` naming the first key that is not."""

    def refuse(reason: str) -> LMStateError:
        return LMStateError(
            f"{where}: {reason}; plait loads a predictor's LM from a file only when it is a plait LM "
            "on the local engine (set it again after loading, or use DSPy's "
            "load(..., allow_unsafe_lm_state=True) for a file you trust)"
        )

    if not isinstance(state, dict):
        raise refuse(f"the LM state is a {type(state).__name__}, not an object")
    if state.get("_dspy_lm_class") != DSPY_LM_CLASS:
        raise refuse(f"the LM class is {state.get('_dspy_lm_class')!r}, not {DSPY_LM_CLASS}")
    model = state.get("model")
    engines = _engine_classes()
    if (
        not isinstance(model, str)
        or not model.startswith("plait/")
        or not isinstance(state.get("engine"), dict)
    ):
        raise refuse(f"the LM {model!r} is not a plait LM (no plait/ model on plait's engine)")
    known = {"_dspy_lm_class", "model", "cache", "num_retries", *engines, *FIXED, *SETTINGS}
    unknown = sorted(set(state) - known)
    if unknown:
        raise refuse(f"the LM state has key(s) a plait LM does not save: {', '.join(unknown)}")
    for key, value in FIXED.items():
        if key in state and state[key] != value:
            raise refuse(f"{key} is {state[key]!r}; a plait LM has {value!r}")
    if not isinstance(state.get("cache", True), bool) or type(state.get("num_retries", 0)) is not int:
        raise refuse("cache must be true/false and num_retries an integer")
    for key in SETTINGS & set(state):
        if not _plain(key, state[key]):
            raise refuse(f"the setting {key} is not a plain JSON value")
    engine_state = None
    for half, class_path in engines.items():
        record = state.get(half)
        if record is None and half == "async_engine":
            continue
        if not isinstance(record, dict) or set(record) != {"class", "state"}:
            raise refuse(f"{half} is not a {{class, state}} record")
        if record["class"] != class_path:
            raise refuse(f"{half} is {record['class']!r}, not plait's local engine {class_path}")
        checked = _check_engine_state(record["state"], refuse)
        if engine_state is not None and checked != engine_state:
            raise refuse("engine and async_engine differ")
        engine_state = checked
    return engine_state


def _check_engine_state(state: Any, refuse: Refusal) -> dict[str, Any]:
    """`state` if it is what `PlaitEngine.dump_state` writes: a local model (a URL would send
    the program's prompts elsewhere), known options with plain values, a reasoning setting."""
    if not isinstance(state, dict):
        raise refuse("the engine state is not an object")
    unknown = sorted(set(state) - ENGINE_STATE)
    if unknown:
        raise refuse(f"the engine state has key(s) plait's engine does not save: {', '.join(unknown)}")
    from plait.backends.runtime.options import ENGINE_OPTIONS

    model = state.get("model")
    if not isinstance(model, str) or not model or "://" in model:
        raise refuse(f"the engine model {model!r} is not a registered model name or checkpoint path")
    options = state.get("engine_options") or {}
    if not isinstance(options, dict):
        raise refuse("engine_options is not an object")
    for key, value in options.items():
        if key not in ENGINE_OPTIONS | LOAD_OPTIONS:
            raise refuse(f"the engine option {key} is not one of plait's")
        if not isinstance(value, _SCALARS):
            raise refuse(f"the engine option {key} is not a plain JSON value")
    reasoning = state.get("reasoning")
    if isinstance(reasoning, bool) or not isinstance(reasoning, str | int | None):
        raise refuse("reasoning must be a word or a token budget")
    return state


def plait_lm_from_state(state: Any, where: str) -> Any:
    """A `plait.LM` rebuilt from a predictor's saved LM state, after `check_plait_lm_state`."""
    from plait.backends.clients.local import LM

    engine = check_plait_lm_state(state, where)
    settings = {key: state[key] for key in SETTINGS & set(state)}
    try:
        lm = LM(
            engine["model"],
            reasoning=engine.get("reasoning"),
            cache=state.get("cache", True),
            num_retries=state.get("num_retries", 0),
            **(engine.get("engine_options") or {}),
            **settings,
        )
    except (PlaitError, ValueError, TypeError) as exc:  # a model not installed here, a bad value
        raise LMStateError(f"{where}: its plait LM cannot be rebuilt: {exc}") from exc
    if lm.model != state["model"]:
        raise LMStateError(
            f"{where}: the LM is saved as {state['model']!r} but its engine state gives {lm.model!r}; "
            "the file was edited or comes from another plait: set the LM again after loading"
        )
    return lm


def load_program_state(program: Any, state: dict[str, Any], where: str) -> None:
    """`program.load_state(state)`, where each predictor's saved LM is rebuilt by
    `plait_lm_from_state` (or refused) rather than by DSPy, which refuses plait's engine."""
    rebuilt: list[tuple[Any, Any]] = []
    state = dict(state)
    for name, predictor in program.named_parameters():
        entry = state.get(name)
        if isinstance(entry, dict) and entry.get("lm") is not None:
            rebuilt.append((predictor, plait_lm_from_state(entry["lm"], f"{where}: predictor {name!r}")))
            state[name] = {**entry, "lm": None}
    program.load_state(state)  # everything else is applied as data by DSPy, as before
    for predictor, lm in rebuilt:
        predictor.lm = lm
