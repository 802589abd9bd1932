"""A compiled program as the server exposes it: named, with typed inputs, callable and streamable.

`ServedProgram` wraps a `LoadedArtifact` (`plait.compilers.artifact`) with what serving needs:

- its **inputs**, read from the program itself: a single predictor's signature input fields
  (`dspy.Predict`, `dspy.ChainOfThought`, any `forward(**kwargs)` module), else `forward`'s
  named parameters. They become a pydantic model, so a request with a missing, unknown or
  wrongly typed field is refused (422) before any token is generated.
- its **outputs**: every predictor's output fields (what `?stream=true` streams).
- **calling** it in the caller's thread under `dspy.context(lm=..., adapter=...)`, so many
  programs (and many calls of one program) run side by side on the server's worker threads,
  each with its own settings, while the one shared engine batches their LM calls.
- **prompt-aware prefill** (`plait serve`'s default): its predictors' instructions and demos
  pinned in the engine's prefix cache before the first call, and its `prefill_stage` hints
  acted on during calls (`plait.modules.prefill`).
- **streaming** it with `dspy.streamify`, its output fields split as they are generated
  (`plait.modules.fields`), the program itself run by the caller's `run` (the server's
  `ScopedRun`, which can stop it) on the thread DSPy gives it.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dspy
import pydantic
from dspy.adapters.json_adapter import JSONAdapter
from dspy.clients.engines.streaming import EngineChunk
from dspy.streaming import StreamListener
from dspy.streaming.messages import StatusMessage, StreamResponse

from plait.modules.fields import FieldSplitter
from plait.modules.prefill import PinnedPrefix, pin_static_prefixes, stage_prefill
from plait.serve.config import ADAPTERS
from plait.serve.errors import ApiError

log = logging.getLogger(__name__)

#: Program names appear in URLs: keep them simple.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

#: Adapter names, as `plait compile --adapter` spells them.


@dataclass(frozen=True)
class InputSpec:
    name: str
    annotation: Any
    required: bool
    default: Any = None
    description: str | None = None


@dataclass(frozen=True)
class OutputSpec:
    predictor: str
    name: str
    annotation: Any
    description: str | None = None


@dataclass
class CallResult:
    """A finished program call: its outputs as JSON-ready values, and the tokens it used."""

    outputs: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    prediction: Any = field(default=None, repr=False)


def type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


def _field_description(info: Any) -> str | None:
    extra = getattr(info, "json_schema_extra", None) or {}
    desc = extra.get("desc") if isinstance(extra, dict) else None
    return None if not desc or desc.startswith("${") else str(desc)


def _signature(fn: Any) -> inspect.Signature:
    """`fn`'s signature with string annotations (`from __future__ import annotations`) resolved."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # an annotation that does not evaluate here: keep the strings
        return inspect.signature(fn)


def program_inputs(program: Any) -> list[InputSpec]:
    """The fields a caller must (or may) give the program."""
    # the class attribute: reading `program.forward` makes DSPy warn about calling it directly
    forward = getattr(type(program), "forward", None)
    params = list(_signature(forward).parameters.values())[1:] if forward is not None else []
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    predictors = program.predictors() if hasattr(program, "predictors") else []
    if takes_kwargs and not named and len(predictors) == 1:
        signature = predictors[0].signature
        return [
            InputSpec(name, info.annotation, True, description=_field_description(info))
            for name, info in signature.input_fields.items()
        ]
    specs = []
    for p in named:
        required = p.default is inspect.Parameter.empty
        annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
        specs.append(InputSpec(p.name, annotation, required, None if required else p.default))
    return specs


def program_outputs(program: Any) -> list[OutputSpec]:
    return [
        OutputSpec(name, field_name, info.annotation, _field_description(info))
        for name, predictor in program.named_predictors()
        for field_name, info in predictor.signature.output_fields.items()
    ]


def input_model(name: str, inputs: list[InputSpec]) -> type[pydantic.BaseModel]:
    """A pydantic model of the inputs; unknown fields are refused (they are usually typos)."""
    fields: dict[str, Any] = {}
    for spec in inputs:
        annotation = spec.annotation
        try:
            pydantic.TypeAdapter(annotation)
        except Exception:  # a type pydantic cannot check: accept any value
            annotation = Any
        fields[spec.name] = (annotation, ... if spec.required else spec.default)
    model_name = re.sub(r"\W", "_", name) + "Inputs"
    config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return pydantic.create_model(model_name, __config__=config, **fields)


def jsonable_output(value: Any) -> Any:
    """A program output as JSON (pydantic models dumped, enums by value, the rest as text)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable_output(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable_output(v) for k, v in value.items()}
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        return jsonable_output(value.value)
    try:
        return pydantic.TypeAdapter(type(value)).dump_python(value, mode="json")
    except Exception:
        return str(value)


def usage_tokens(prediction: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of every LM call a prediction took (DSPy's usage tracker)."""
    usage = prediction.get_lm_usage() if hasattr(prediction, "get_lm_usage") else None
    prompt = completion = 0
    for entry in (usage or {}).values():
        if isinstance(entry, dict):
            prompt += int(entry.get("prompt_tokens") or 0)
            completion += int(entry.get("completion_tokens") or 0)
    return prompt, completion


def make_adapter(choice: str, lm: Any, meta: dict[str, Any]) -> Any:
    """The adapter a program is served with: the same choice `plait compile`/`eval` make
    (`plait.compilers.runtime.select_adapter`), so a program is served as it was scored.

    `auto`: the artifact's `extra["adapter"]` when it records one, else plait's constrained
    adapter when the LM decodes under grammars (answers always parse), else DSPy's ChatAdapter.
    """
    from plait.compilers.runtime import select_adapter

    if choice == "auto" and meta.get("adapter") in ADAPTERS:
        choice = str(meta["adapter"])
    return select_adapter(lm, choice)


class _RunBy:
    """The program as `dspy.streamify` sees it: called through `run` on DSPy's worker thread,
    with the program's predictors for the stream listeners."""

    def __init__(self, program: Any, run: Callable[..., Any]):
        self.program, self.run = program, run

    def named_predictors(self) -> list[tuple[str, Any]]:
        return self.program.named_predictors()

    def __call__(self, **inputs: Any) -> Any:
        return self.run(self.program, **inputs)


class ServedProgram:
    """One compiled program behind `POST /v1/programs/{name}`."""

    def __init__(
        self,
        name: str,
        program: Any,
        lm: Any,
        *,
        adapter: Any = None,
        artifact: Any = None,
        model: str | None = None,
        stage_prefill: bool = False,
    ):
        """`stage_prefill`: act on the program's `prefill_stage` hints (plait.modules.prefill)."""
        if not NAME_PATTERN.match(name):
            raise ValueError(f"program name {name!r} must match {NAME_PATTERN.pattern}")
        self.name, self.program, self.lm, self.adapter = name, program, lm, adapter
        self.stage_prefill = stage_prefill
        self.pinned: list[PinnedPrefix] = []
        self.artifact = artifact
        self.model = model or getattr(artifact, "model", None) or getattr(lm, "model", "unknown")
        self.inputs = program_inputs(program)
        self.outputs = program_outputs(program)
        self.input_model = input_model(name, self.inputs)

    # ---- description -----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        artifact = self.artifact
        return {
            "name": self.name,
            "program": getattr(artifact, "program_path", type(self.program).__qualname__),
            "model": self.model,
            "signature_hash": getattr(artifact, "signature_hash", None),
            "artifact_sha256": getattr(artifact, "sha256", None),
            "adapter": type(self.adapter).__name__ if self.adapter is not None else "ChatAdapter",
            "pinned_prompt_tokens": {p.predictor: p.tokens for p in self.pinned},
            "inputs": [
                {
                    "name": s.name,
                    "type": type_name(s.annotation),
                    "required": s.required,
                    "description": s.description,
                }
                for s in self.inputs
            ],
            "outputs": [
                {
                    "predictor": s.predictor,
                    "name": s.name,
                    "type": type_name(s.annotation),
                    "description": s.description,
                }
                for s in self.outputs
            ],
        }

    # ---- inputs ----------------------------------------------------------------------------
    def validate(self, body: Any) -> dict[str, Any]:
        """The program's keyword arguments from a JSON body, or 422 saying what is wrong.

        The body is either the inputs themselves or `{"inputs": {...}}`.
        """
        if (
            isinstance(body, dict)
            and set(body) == {"inputs"}
            and isinstance(body["inputs"], dict)
            and "inputs" not in self.input_model.model_fields
        ):
            body = body["inputs"]
        if not isinstance(body, dict):
            raise ApiError(
                422,
                f"the body must be a JSON object of {self.name}'s inputs "
                f"({', '.join(s.name for s in self.inputs)})",
                code="invalid_inputs",
            )
        try:
            validated = self.input_model.model_validate(body)
        except pydantic.ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(p) for p in error.get("loc", ())) or "body"
                problems.append(f"{where}: {error.get('msg', 'invalid')}")
            raise ApiError(
                422, f"invalid inputs for {self.name}: " + "; ".join(problems), code="invalid_inputs"
            ) from None
        return {name: getattr(validated, name) for name in self.input_model.model_fields}

    # ---- calling ---------------------------------------------------------------------------
    def pin_prompts(self) -> list[PinnedPrefix]:
        """Prefill every predictor's instructions and demos into the engine's prefix cache and
        pin them there (before serving: it waits for the prefills)."""
        started = time.perf_counter()
        self.pinned = pin_static_prefixes(self.program, self.lm, self.adapter)
        if self.pinned:
            log.info(
                "%s: pinned %d predictors' static prompts (%d tokens, %d computed) in %.2f s",
                self.name,
                len(self.pinned),
                sum(p.tokens for p in self.pinned),
                sum(p.computed for p in self.pinned),
                time.perf_counter() - started,
            )
        return self.pinned

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        settings = dspy.context(lm=self.lm, adapter=self.adapter, track_usage=True)
        with settings, stage_prefill(self.stage_prefill):
            yield

    def call(self, inputs: dict[str, Any]) -> CallResult:
        """Run the program in this thread (a server worker)."""
        started = time.perf_counter()
        with self._context():
            prediction = self.program(**inputs)
        return self._result(prediction, time.perf_counter() - started)

    def _result(self, prediction: Any, seconds: float) -> CallResult:
        if isinstance(prediction, dspy.Prediction):
            outputs = {k: jsonable_output(v) for k, v in prediction.items()}
        elif isinstance(prediction, dict):
            outputs = {str(k): jsonable_output(v) for k, v in prediction.items()}
        else:
            outputs = {"output": jsonable_output(prediction)}
        prompt, completion = usage_tokens(prediction)
        return CallResult(outputs, prompt, completion, seconds, prediction)

    async def stream(self, inputs: dict[str, Any], run: Callable[..., Any]) -> AsyncIterator[tuple[str, Any]]:
        """(event, data) pairs: `field` chunks as output fields are generated, `status`
        messages, and finally one `prediction` with a `CallResult`. DSPy runs the program on
        a worker thread of its own, as `run(program, **inputs)`.

        ChatAdapter-format answers (plait's `ConstrainedAdapter` included) are split by
        `FieldSplitter`, which does not depend on how the text is chunked; JSON-format answers
        go through DSPy's own `StreamListener`s.
        """
        predictors = {
            id(p): (name, list(p.signature.output_fields)) for name, p in self.program.named_predictors()
        }
        listeners = []
        if isinstance(self.adapter, JSONAdapter):
            listeners = [
                StreamListener(field_name, predict=predictor, predict_name=name)
                for name, predictor in self.program.named_predictors()
                for field_name in predictor.signature.output_fields
            ]
        streamer = dspy.streamify(
            _RunBy(self.program, run),
            stream_listeners=listeners,
            include_final_prediction_in_output_stream=True,
        )
        splitters: dict[int, FieldSplitter] = {}
        started = time.perf_counter()
        with self._context():
            async for value in streamer(**inputs):
                if isinstance(value, StreamResponse):
                    yield (
                        "field",
                        {
                            "predictor": value.predict_name,
                            "field": value.signature_field_name,
                            "chunk": value.chunk,
                            "last": bool(value.is_last_chunk),
                        },
                    )
                elif isinstance(value, EngineChunk) and value.get("predict_id") in predictors:
                    name, fields = predictors[value["predict_id"]]
                    splitter = splitters.setdefault(value["predict_id"], FieldSplitter(fields))
                    choice = (value.get("choices") or [{}])[0]
                    chunks = splitter.feed((choice.get("delta") or {}).get("content") or "")
                    if choice.get("finish_reason"):  # the end of this LM call
                        chunks += splitter.finish()
                        del splitters[value["predict_id"]]
                    for chunk in chunks:
                        yield (
                            "field",
                            {
                                "predictor": name,
                                "field": chunk.field,
                                "chunk": chunk.chunk,
                                "last": chunk.last,
                            },
                        )
                elif isinstance(value, StatusMessage):
                    yield "status", {"message": value.message}
                elif isinstance(value, dspy.Prediction):
                    yield "prediction", self._result(value, time.perf_counter() - started)
