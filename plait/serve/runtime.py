"""What a running server holds: programs by name, engines by model, and the shared machinery.

One `ServeRuntime` is built before the app starts (loading weights and artifacts takes
seconds to minutes; a server that answers `/healthz` must already be able to serve). Every
program of the same model shares one engine, and the OpenAI-compatible endpoints use that
same engine, so program calls and raw completions are batched together.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.serve.bridge import WorkerPool
from plait.serve.config import ServeConfig
from plait.serve.errors import ApiError
from plait.serve.limits import AdmissionGate
from plait.serve.metrics import ServerMetrics
from plait.serve.programs import ServedProgram, make_adapter
from plait.serve.tracing import TraceStore, TraceWriter

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A local engine behind the OpenAI-compatible endpoints, and the names it answers to."""

    id: str
    engine: Any
    names: set[str] = field(default_factory=set)


def program_name(path: str | Path) -> str:
    """`sentiment.json` -> `sentiment` (the default URL name of an artifact)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).stem).strip("-.") or "program"


class ServeRuntime:
    """Programs, models, worker threads, admission gate, metrics and the trace writer."""

    def __init__(self, config: ServeConfig, *, store: TraceStore | None = None):
        self.config = config
        self.programs: dict[str, ServedProgram] = {}
        self.models: dict[str, ServedModel] = {}
        self.metrics = ServerMetrics()
        self.gate = AdmissionGate(config.max_inflight)
        self.pool = WorkerPool(config.workers)
        self.traces = TraceWriter(store, record_io=config.trace_io)
        self.metrics.add_gauge(
            "plait_inflight_calls",
            "Generation calls admitted and not finished.",
            lambda: [((), float(self.gate.inflight))],
        )
        self.metrics.add_gauge(
            "plait_rejected_calls",
            "Calls refused by admission control (503) so far.",
            lambda: [((), float(self.gate.rejected))],
        )
        self.metrics.add_gauge(
            "plait_engine_running",
            "Sequences decoding in the engine, by model.",
            lambda: self._engine_values(lambda s: len(s.rows)),
        )
        self.metrics.add_gauge(
            "plait_engine_waiting",
            "Requests queued in the engine, by model.",
            lambda: self._engine_values(lambda s: len(s.waiting)),
        )
        self.metrics.add_gauge(
            "plait_engine_steps",
            "Scheduler iterations so far, by model.",
            lambda: self._engine_values(lambda s: s.steps),
        )
        for name, help_, read in (
            (
                "plait_engine_state_bytes",
                "Decoding state (KV cache, Mamba state) held, by model.",
                lambda m: m.state_bytes,
            ),
            (
                "plait_engine_state_budget_bytes",
                "The decoding state's budget, by model.",
                lambda m: m.state_budget_bytes or 0,
            ),
            (
                "plait_engine_prefix_cache_bytes",
                "Cached prompt blocks held, by model.",
                lambda m: m.prefix_cache_bytes,
            ),
            (
                "plait_engine_prefix_cache_budget_bytes",
                "The prefix cache's budget, by model.",
                lambda m: m.prefix_cache_budget_bytes,
            ),
        ):
            self.metrics.add_gauge(name, help_, lambda read=read: self._engine_memory(read))
        self.metrics.add_gauge(
            "plait_engine_preemptions",
            "Sequences whose state was given up to stay in the memory budget (recomputed), by model.",
            lambda: self._engine_values(lambda s: s.preemptions),
        )
        for name, help_, attribute in (
            (
                "plait_engine_drafted_tokens",
                "Tokens drafted by speculative decoding so far, by model.",
                "drafted_tokens",
            ),
            (
                "plait_engine_accepted_tokens",
                "Drafted tokens the model agreed with so far, by model.",
                "accepted_tokens",
            ),
        ):
            self.metrics.add_gauge(
                name, help_, lambda attribute=attribute: self._engine_values(lambda s: getattr(s, attribute))
            )
        self.metrics.add_gauge(
            "plait_traces_dropped",
            "Traces that could not be written to the store.",
            lambda: [((), float(self.traces.dropped))],
        )

    def _engine_values(self, read: Any) -> list[tuple[tuple[tuple[str, str], ...], float]]:
        values = []
        for model in self.models.values():
            scheduler = getattr(model.engine, "scheduler", None)
            if scheduler is not None:
                values.append(((("model", model.id),), float(read(scheduler))))
        return values

    def _engine_memory(self, read: Any) -> list[tuple[tuple[tuple[str, str], ...], float]]:
        values = []
        for model in self.models.values():
            memory = getattr(model.engine, "memory", None)
            if memory is not None:
                values.append(((("model", model.id),), float(read(memory()))))
        return values

    # ---- building ----------------------------------------------------------------------------
    def add_model(self, name: str, engine: Any) -> ServedModel:
        """Serve `engine` on the OpenAI endpoints as `name` (and its model id)."""
        model_id = getattr(engine, "model_id", name)
        served = self.models.get(model_id)
        if served is None:
            served = self.models[model_id] = ServedModel(model_id, engine)
        served.names.update({name, model_id, f"plait/{model_id}"})
        return served

    def add_program(self, program: ServedProgram) -> None:
        if program.name in self.programs:
            raise ApiError(400, f"two programs are named {program.name!r}: name one NAME=path.json")
        self.programs[program.name] = program

    def load_artifact(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        adapter: str = "auto",
        lm_options: dict[str, Any] | None = None,
        lm: Any = None,
        program: str | None = None,
    ) -> ServedProgram:
        """Load a compiled artifact, give it an LM on its model, and serve it as `name`.

        `lm` replaces the local engine for the artifact's model: e.g. `remote_lm(...)` keeps
        the programs on this machine and sends their LM calls to a GPU server. `program`
        (`FILE.py:Class`) is the program the user names for an artifact compiled from a file.
        """
        from plait.backends.clients.local import LM
        from plait.compilers.artifact import load_artifact

        loaded = load_artifact(path, program=program)
        model = loaded.model
        if lm is None:
            lm = LM(loaded.model, cache=self.config.dspy_cache, **(lm_options or {}))
            engine = getattr(getattr(lm, "engine", None), "engine", None)  # the shared local engine
            if engine is not None:
                self.add_model(loaded.model, engine)
        else:
            model = str(getattr(lm, "model", model))
        program = ServedProgram(
            name or program_name(path),
            loaded.program,
            lm,
            adapter=make_adapter(adapter, lm, loaded.meta),
            artifact=loaded,
            model=model,
            stage_prefill=self.config.prompt_prefill,
        )
        self.add_program(program)
        log.info("serving %s (%s on %s) from %s", program.name, loaded.program_path, loaded.model, path)
        if self.config.prompt_prefill:
            program.pin_prompts()
        return program

    def load_model(self, name: str, lm_options: dict[str, Any] | None = None) -> ServedModel:
        """Load (or share) the engine of `name` for the OpenAI endpoints only."""
        from plait.backends.clients.local import LM

        lm = LM(name, cache=False, **(lm_options or {}))
        return self.add_model(name, lm.engine.engine)

    # ---- lookups -----------------------------------------------------------------------------
    def model(self, name: str | None) -> ServedModel:
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            known = ", ".join(sorted(self.models)) or "none"
            raise ApiError(400, f"'model' is required (served: {known})", code="model_required")
        for served in self.models.values():
            if name in served.names:
                return served
        served_names = ", ".join(sorted(self.models)) or "none"
        raise ApiError(
            404,
            f"model {name!r} is not served here (served: {served_names})",
            "not_found_error",
            "model_not_found",
        )

    def program(self, name: str) -> ServedProgram:
        program = self.programs.get(name)
        if program is None:
            known = ", ".join(sorted(self.programs)) or "none"
            raise ApiError(
                404, f"no program named {name!r} (served: {known})", "not_found_error", "program_not_found"
            )
        return program

    def close(self) -> None:
        self.traces.close()
        self.pool.close()
