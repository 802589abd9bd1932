"""The trace writer: nothing in one trace stops the recording of the next (issue #12, item 2)."""

from __future__ import annotations

from plait.serve.tracing import MAX_TRACED_DEPTH, Trace, TraceWriter, jsonable
from tests.serve_fixtures import ListStore


def nested(depth: int) -> dict:
    """`{"k": {"k": ... {}}}`, `depth` objects deep."""
    root = inner = {}
    for _ in range(depth - 1):
        inner["k"] = {}
        inner = inner["k"]
    return root


def depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def trace(request_id: str, inputs: dict, outputs: dict | None = None) -> Trace:
    return Trace("sleep", request_id, inputs, outputs, "ok", 1.0)


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no text for this")


def test_jsonable_caps_depth_with_a_marker():
    value = jsonable({"body": nested(600), "list": [[[["deep"]]]]})
    assert depth_of(value) <= MAX_TRACED_DEPTH + 1
    flat = repr(value)
    assert "nested deeper than" in flat and "deep" in flat  # shallow parts are kept as they are
    assert jsonable(nested(MAX_TRACED_DEPTH)) == nested(MAX_TRACED_DEPTH)


def test_trace_writer_survives_any_trace_and_counts_drops():
    store = ListStore()
    writer = TraceWriter(store)
    try:
        writer.submit(trace("deep", {"extra": nested(600)}))  # killed the writer thread
        writer.submit(trace("unprintable", {"x": Unprintable()}))  # fails while preparing
        writer.submit(trace("db-down", {"x": 1}))  # fails while writing
        writer.submit(trace("after", {"x": 2}))
        assert writer.flush(10)
        assert [row["inputs"] for row in store.rows] == [jsonable({"extra": nested(600)}), {"x": 2}]
        assert writer.dropped == 2 and writer.written == 2
    finally:
        writer.close()
