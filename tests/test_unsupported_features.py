"""What plait does not do fails fast with a typed error that names it: never a hang, a silent
wrong answer, or an engine failure from deep inside (plait.backends.clients.features)."""

import dspy
import httpx
import pytest
from dspy.lm15 import Config, Message, Request, UnsupportedFeatureError

import plait
from plait.backends.clients.local import PlaitEngine, shared_engine
from plait.backends.clients.remote import RemoteEngine, remote_lm
from plait.errors import EngineClosedError
from plait.errors import UnsupportedFeatureError as PlaitUnsupportedFeatureError
from tests.test_dspy_bridge import _request, lm  # noqa: F401  (lm: the module's shared plait.LM)

PNG = (  # one white pixel
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA"
    "60e6kgAAAABJRU5ErkJggg=="
)


REFUSED = [
    ({"logprobs": 0}, "config.logprobs"),
    ({"logprobs": 3}, "config.logprobs"),
    ({"frequency_penalty": 0.5}, "config.frequency_penalty"),
    ({"presence_penalty": -0.5}, "config.presence_penalty"),
    ({"extensions": {"logit_bias": {"100": 5}}}, "config.extensions.logit_bias"),
]


def test_settings_the_engine_would_ignore_are_refused(lm):  # noqa: F811
    """Log probabilities used to come back empty and penalties were never applied. A zero
    penalty or an empty bias asks for nothing, and still runs."""
    for setting, feature in REFUSED:
        with pytest.raises(dspy.LMUnsupportedFeatureError) as info:
            lm(_request(lm, "Say hi.", max_tokens=2, **setting))
        assert info.value.feature == feature and feature.rsplit(".", 1)[1] in str(info.value)
    extensions = {"logit_bias": {}, "prediction": {"type": "content", "content": "hi"}}
    request = _request(lm, "Say hi.", max_tokens=2, frequency_penalty=0.0, extensions=extensions)
    assert lm(request).usage.output_tokens == 2


@pytest.mark.parametrize(
    ("signature", "value"),
    [
        ("image: dspy.Image -> caption", dspy.Image(PNG)),
        ("audio: dspy.Audio -> text", dspy.Audio(data="AAAA", audio_format="wav")),
    ],
)
def test_image_and_audio_inputs_are_unsupported_features(lm, signature, value):  # noqa: F811
    name = signature.split(":")[0]
    with dspy.context(lm=lm), pytest.raises(dspy.LMUnsupportedFeatureError, match="text only"):
        dspy.Predict(signature)(**{name: value})


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"top_p": 0.0}, "top_p"), ({"reasoning_effort": "high"}, "no thinking block")],
)
def test_settings_the_engine_cannot_take_are_invalid_requests(lm, setting, message):  # noqa: F811
    """They used to surface as `LMUnexpectedError`, DSPy's word for an engine bug."""
    with pytest.raises(dspy.LMInvalidRequestError, match=message):
        lm("Say hi.", **setting)


def test_text_completions_are_refused_when_the_lm_is_made():
    """`model_type="text"` asks for raw prompts; plait would apply the chat template anyway."""
    with pytest.raises(PlaitUnsupportedFeatureError, match="model_type"):
        plait.LM("smollm2-135m", model_type="text")
    with pytest.raises(PlaitUnsupportedFeatureError, match="model_type"):
        remote_lm("http://example.invalid/v1", "m", model_type="text")


def test_remote_sends_logprobs_and_refuses_what_plait_serve_would_ignore():
    request = Request(model="remote/m", messages=(Message.user("Hi"),), config=Config(logprobs=3))
    body = RemoteEngine("http://example.invalid/v1", "m", dialect="vllm").body(request)
    assert (body["logprobs"], body["top_logprobs"]) == (True, 3)
    penalised = Request(model="remote/m", messages=(Message.user("Hi"),), config=Config(presence_penalty=1.0))
    with pytest.raises(UnsupportedFeatureError, match="presence_penalty"):
        RemoteEngine("http://example.invalid/v1", "m", dialect="plait").body(penalised)


def test_remote_dialect_is_asked_again_after_the_server_was_unreachable():
    """A server down at the first call used to be taken for plain OpenAI for good: grammars
    went out as JSON schemas (or not at all) once it was back."""
    up = False

    def answer(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "plait"}]})

    engine = RemoteEngine("http://example.invalid/v1", "m")
    engine._client = httpx.Client(transport=httpx.MockTransport(answer))
    assert engine.dialect == "openai" and not engine.accepts_grammar
    up = True
    assert engine.dialect == "plait" and engine.accepts_grammar


@pytest.mark.slow
def test_a_closed_shared_engine_is_loaded_again_and_a_closed_engine_says_so():
    options = {"device": "cpu", "max_batch_size": 3}  # an engine of this test's own
    closed = shared_engine("smollm2-135m", **options)
    own = plait.LM("smollm2-135m", cache=False, max_batch_size=3)
    assert own(_request(own, "Say hi.", max_tokens=2)).usage.output_tokens == 2
    closed.close()
    with pytest.raises(EngineClosedError, match="Engine.load"):
        closed.submit("Say hi.", max_tokens=2)
    assert own(_request(own, "Say hi.", max_tokens=2)).usage.output_tokens == 2  # on a freshly loaded engine
    fresh = shared_engine("smollm2-135m", **options)
    assert fresh is not closed and own.engine.engine is fresh
    with pytest.raises(EngineClosedError, match="Engine.load"):  # an engine handed in stays closed
        PlaitEngine("smollm2-135m", engine=closed).complete(_request(own, "Say hi.", max_tokens=2))
    fresh.close()
