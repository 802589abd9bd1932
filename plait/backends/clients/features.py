"""What a DSPy program may ask of plait's LMs, and a clear refusal of what plait does not do.

DSPy hands an engine every setting a program makes. One the engine silently ignored would give
an answer the program did not ask for (a penalty never applied, log probabilities that come
back empty, an image the model never saw), so each is refused before anything runs, with
lm15's `UnsupportedFeatureError` naming the setting and what to do instead: DSPy raises it as
`dspy.LMUnsupportedFeatureError` and does not retry it. Its cause is plait's own
`UnsupportedFeatureError`, so the caller of a served program gets a 400 (plait.serve.errors).

Settings that cannot change the answer are accepted and have no effect: `prediction`
(predicted outputs only save time), `metadata`, `user`, `store`, `service_tier`, and DSPy's
`prompt_cache` (plait's prefix cache needs no asking).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from dspy.lm15 import Request, UnsupportedFeatureError

from plait.backends.clients.messages import UnsupportedContentError, conversation
from plait.errors import UnsupportedFeatureError as PlaitUnsupportedFeatureError


def refuse(message: str, feature: str) -> NoReturn:
    """Raise DSPy's refusal of `feature` (the request's path to it, e.g. `config.logprobs`)."""
    raise UnsupportedFeatureError(message, feature=feature, provider="plait") from (
        PlaitUnsupportedFeatureError(message)
    )


def refuse_unsupported_settings(request: Request) -> None:
    """Refuse a request whose settings plait's engine would otherwise ignore: log
    probabilities, repetition penalties and `logit_bias`. A zero penalty or an empty bias
    changes nothing, so it passes."""
    config = request.config
    if config.logprobs is not None or config.probabilities == "required":
        refuse(
            "token log probabilities (logprobs, top_logprobs, probabilities='required') are not "
            "computed by plait's engine: leave them unset; to choose among fixed answers, decode "
            "under a grammar (a Literal output field with plait.ConstrainedAdapter)",
            "config.logprobs" if config.logprobs is not None else "config.probabilities",
        )
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(config, name):
            refuse(
                f"{name}: plait's sampler has no repetition penalties; leave it unset or 0 (to vary "
                "the answer, sample with temperature, top_p or top_k)",
                f"config.{name}",
            )
    if (config.extensions or {}).get("logit_bias"):
        refuse(
            "logit_bias: plait's sampler cannot bias tokens; to allow or forbid answers, decode under "
            "a grammar (plait.ConstrainedAdapter, or a response_format JSON schema)",
            "config.extensions.logit_bias",
        )


def text_conversation(request: Request) -> list[dict[str, Any]]:
    """The request's turns in OpenAI's chat form (`conversation`); content that is not text
    (what dspy.Image, dspy.Audio and dspy.File inputs become) is refused."""
    try:
        return conversation(request)
    except UnsupportedContentError as exc:
        refuse(str(exc), "messages")


def refuse_text_completions(settings: Mapping[str, Any]) -> None:
    """Refuse DSPy's `model_type="text"` among an LM's `settings`: plait's LMs send every call
    through the model's chat template, and would silently do so for raw prompts too."""
    if settings.get("model_type", "chat") == "text":
        raise PlaitUnsupportedFeatureError(
            "model_type='text': plait's LMs answer chat requests, rendered with the model's chat "
            "template; leave model_type at 'chat', or call plait.Engine.generate for a raw prompt"
        )
