"""`RecordingEngine`: every LM call of a run is written to the store, and replayed from it.

It wraps the engine of a `dspy.LM` (plait's local engine, or any DSPy custom engine). A call is
keyed by a hash of the whole request (messages, sampling settings, grammar): if the run
already has a response for that key — the run was killed and is being resumed — the stored
response is returned without touching the model; otherwise the call runs and its response is
stored before it is returned. This is what lets *any* DSPy optimizer resume: it replays its
own steps deterministically, and every step that finished before the crash costs nothing.

Responses are stored as lm15's JSON form (`response_to_dict`), never pickled, with the tokens
the grammar forced and the call's idealized seconds (`CallPricer`). A replayed call reports the
stored cost, so a resumed run's costs are those of the run it resumes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dspy._vendor.lm15.serde import request_to_dict, response_from_dict, response_to_dict

from plait.compilers.hashing import digest
from plait.compilers.pricing import CallPricer
from plait.compilers.usage import Usage, UsageMeter

log = logging.getLogger(__name__)


def request_key(request: Any) -> str:
    return digest(request_to_dict(request))


class RecordingEngine:
    """Sync DSPy engine: replay from `store` for run `run_id`, else call `inner` and record."""

    def __init__(self, inner: Any, store: Any, run_id: int, meter: UsageMeter):
        self.inner = inner
        self.store = store
        self.run_id = run_id
        self.meter = meter
        self.pricer = CallPricer(inner)

    def __getattr__(self, name: str) -> Any:
        # Capabilities (supports_*, accepts_grammar, ...) are the wrapped engine's.
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def complete(self, request: Any) -> Any:
        key = request_key(request)
        stored = self.store.cached_lm_call(self.run_id, key)
        if stored is not None:
            self.meter.add(self._usage(stored, replayed=True))
            return response_from_dict(stored["response"])
        response, forced = self._call(request)
        record = {"response": response_to_dict(response), "forced_tokens": forced}
        usage = self._usage(record, replayed=False)
        record["ideal_seconds"] = usage.cost
        self.store.record_lm_call(self.run_id, key, record)
        self.meter.add(usage)
        return response

    def _usage(self, record: dict[str, Any], *, replayed: bool) -> Usage:
        """The call's usage; its idealized cost as stored, else priced now (a call recorded
        before costs were)."""
        tokens = record["response"].get("usage") or {}
        usage = Usage(
            calls=1,
            replayed=int(replayed),
            prompt_tokens=int(tokens.get("input_tokens") or 0),
            completion_tokens=int(tokens.get("output_tokens") or 0),
            forced_tokens=int(record.get("forced_tokens") or 0),
        )
        cost = (
            record["ideal_seconds"]
            if "ideal_seconds" in record
            else self.pricer(usage.prompt_tokens, usage.completion_tokens, usage.forced_tokens)
        )
        if cost is None:
            usage.unpriced = 1
        else:
            usage.ideal_seconds = float(cost)
        return usage

    def _call(self, request: Any) -> tuple[Any, int]:
        """Run the call; also return how many completion tokens the grammar forced. plait's
        engine reports that on its request handle, so use its start/wait when it has one (its
        `_response` reads the answer back from the started call)."""
        start, respond = getattr(self.inner, "start", None), getattr(self.inner, "_response", None)
        if start is not None and respond is not None:
            call = start(request)
            call.handle.wait()
            return respond(request, call), int(getattr(call.handle.usage, "forced_tokens", 0) or 0)
        response = self.inner.complete(request)
        plait_data = (
            (response.provider_data or {}).get("plait", {})
            if isinstance(response.provider_data, dict)
            else {}
        )
        return response, int(plait_data.get("forced_tokens", 0) or 0)

    def stream(self, request: Any):
        """Streaming is not recorded (compile never streams); delegate."""
        return self.inner.stream(request)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class AsyncRecordingEngine:
    """The async twin: the same replay/record logic, off the event loop."""

    def __init__(self, sync: RecordingEngine):
        self.sync = sync

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "sync":
            raise AttributeError(name)
        return getattr(self.sync, name)

    async def complete(self, request: Any) -> Any:
        return await asyncio.to_thread(self.sync.complete, request)

    async def aclose(self) -> None:
        self.sync.close()


def recording_lm(lm: Any, store: Any, run_id: int, meter: UsageMeter) -> Any:
    """A copy of `lm` whose calls are recorded in (and replayed from) the store. An LM on one
    of DSPy's built-in engines (a provider string) is returned as is: only custom engines can
    be wrapped, and such a run resumes from its evaluations alone."""
    if isinstance(lm.engine, str):
        log.warning("%s uses DSPy's %r engine: its calls are not recorded for resume", lm.model, lm.engine)
        return lm
    engine = RecordingEngine(lm.engine, store, run_id, meter)
    return lm.copy(engine=engine, async_engine=AsyncRecordingEngine(engine))
