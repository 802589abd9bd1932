"""DSPy's own streaming (`dspy.streamify` with `dspy.streaming.StreamListener`) on plait's
adapters and engine, as a DSPy user writes it: field by field, sync and async, with status
messages, a ReAct agent's reused listener, and the JSON adapter."""

import asyncio
import json

import dspy
import pytest
from dspy.streaming import StatusMessage, StatusMessageProvider, StreamListener, StreamResponse

import plait


@pytest.fixture(scope="module")
def lm():
    return plait.LM("smollm2-135m", cache=False, max_tokens=96)


def collect(stream, **inputs) -> list:
    async def gather() -> list:
        return [value async for value in stream(**inputs)]

    return asyncio.run(gather())


def field_text(values: list, field: str) -> str:
    chunks = [v for v in values if isinstance(v, StreamResponse)]
    return "".join(v.chunk for v in chunks if v.signature_field_name == field)


def test_streamify_streams_each_field_in_order(lm):
    """ChainOfThought under ConstrainedAdapter: `reasoning` then `answer` arrive as chunks,
    each field's last chunk is marked, and the chunks add up to the prediction's fields."""
    listeners = [StreamListener(signature_field_name=name) for name in ("reasoning", "answer")]
    stream = dspy.streamify(dspy.ChainOfThought("question -> answer"), stream_listeners=listeners)
    with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter()):
        values = collect(stream, question="What is the capital of France?")
    prediction = values[-1]
    assert isinstance(prediction, dspy.Prediction)
    chunks = [v for v in values if isinstance(v, StreamResponse)]
    fields = [c.signature_field_name for c in chunks]
    assert fields.index("answer") > max(i for i, f in enumerate(fields) if f == "reasoning")
    assert sum(len(c.chunk) > 0 for c in chunks if c.signature_field_name == "answer") > 1  # in pieces
    assert [c.is_last_chunk for c in chunks if c.signature_field_name == "answer"][-1]
    for field in ("reasoning", "answer"):
        assert field_text(values, field).strip() == prediction[field].strip()


def test_sync_streaming_with_status_messages(lm):
    """`async_streaming=False` gives a plain generator; a `StatusMessageProvider`'s messages
    come through beside the field chunks."""

    class Progress(StatusMessageProvider):
        def module_start_status_message(self, instance, inputs):
            return f"running {type(instance).__name__}"

    program = dspy.ChainOfThought("question -> answer")
    stream = dspy.streamify(
        program,
        stream_listeners=[StreamListener(signature_field_name="answer")],
        status_message_provider=Progress(),
        async_streaming=False,
    )
    with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter()):
        values = list(stream(question="Name a primary colour."))
    statuses = [v.message for v in values if isinstance(v, StatusMessage)]
    assert any(m.startswith("running") for m in statuses)
    assert field_text(values, "answer").strip() == values[-1].answer.strip()


def test_react_agent_streams_its_thoughts(lm):
    """A ReAct agent's `next_thought` streams through a reusable listener; the chunks of each
    step add up to that step's thought in the trajectory."""

    def lookup(city: str) -> str:
        """The country a city is in."""
        return {"paris": "France"}.get(city.strip().lower(), "unknown")

    agent = dspy.ReAct("question -> answer", tools=[lookup], max_iters=2)
    listener = StreamListener(signature_field_name="next_thought", allow_reuse=True)
    stream = dspy.streamify(agent, stream_listeners=[listener])
    with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter()):
        values = collect(stream, question="Which country is Paris in?")
    trajectory = values[-1].trajectory
    thoughts = [trajectory[k] for k in trajectory if k.startswith("thought_")]
    assert thoughts and field_text(values, "next_thought").strip() == "".join(thoughts).strip()


def test_reused_listener_fires_for_every_call(lm):
    """`allow_reuse=True` (what ReAct's loop needs): a predictor called twice in one program
    streams both answers, each ending with its own last chunk."""

    class TwoAnswers(dspy.Module):
        def __init__(self):
            super().__init__()
            self.ask = dspy.Predict("question -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            first = self.ask(question=question)
            return self.ask(question=f"{question} Answer again: {first.answer}")

    listener = StreamListener(signature_field_name="answer", allow_reuse=True)
    stream = dspy.streamify(TwoAnswers(), stream_listeners=[listener])
    with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter()):
        values = collect(stream, question="Name a fruit.")
    chunks = [v for v in values if isinstance(v, StreamResponse)]
    assert sum(c.is_last_chunk for c in chunks) == 2


def test_json_adapter_streams_fields(lm):
    """ConstrainedJSONAdapter's answers are JSON objects; the listener streams a field's value
    as JSON text, as DSPy's listener does for JSONAdapter (a string keeps its quotes)."""
    stream = dspy.streamify(
        dspy.Predict("question -> answer"), stream_listeners=[StreamListener(signature_field_name="answer")]
    )
    with dspy.context(lm=lm, adapter=plait.ConstrainedJSONAdapter()):
        values = collect(stream, question="What colour is the sky on a clear day?")
    assert json.loads(field_text(values, "answer")) == values[-1].answer


def test_dspy_own_adapter_still_streams(lm):
    """Teaching the listeners plait's adapters leaves DSPy's own alone: a subclass unknown to
    DSPy that extends no adapter family is still refused, as DSPy refuses it."""
    from dspy.adapters.base import Adapter

    class Homemade(Adapter):
        pass

    listener = StreamListener(signature_field_name="answer")
    with dspy.context(adapter=Homemade()), pytest.raises(ValueError, match="Unsupported adapter"):
        listener.receive(None)
