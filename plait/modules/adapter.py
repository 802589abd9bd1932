"""`ConstrainedAdapter`: DSPy's ChatAdapter, decoded under the signature's grammar.

It formats prompts exactly like `dspy.ChatAdapter` and parses with ChatAdapter's parser; the
one difference is that each LM call carries the grammar of the expected answer
(`plait.modules.signature_grammar.chat_grammar`), and plait's engine decodes under it. The answer
therefore always parses, so the adapter never falls back to a second, JSON-mode call.

How the grammar reaches the engine: DSPy turns an LM call's keyword arguments into a
`dspy.lm15.Request`, and lm15 refuses unknown top-level keys. `metadata` is forwarded verbatim
into `request.config.extensions["metadata"]`, so the adapter sends
`metadata={"plait_grammar": spec.to_json()}` and the engine reads it back with
`plait.backends.grammar.spec.grammar_spec_from_request(request)`. The grammar is part of DSPy's
cache key, as it should be: a different grammar is a different request.

The LM must be a plait LM (its engine declares `accepts_grammar = True`); any other LM would
send the metadata to a provider that ignores it, so that is refused up front.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dspy.adapters.chat_adapter import ChatAdapter
from dspy.adapters.json_adapter import JSONAdapter
from dspy.clients.base_lm import BaseLM
from dspy.signatures.signature import Signature
from dspy.utils.callback import BaseCallback

from plait.backends.clients.local import DEFAULT_MAX_TOKENS
from plait.backends.grammar.spec import EXTENSION_KEY, GrammarError, GrammarSpec
from plait.modules.signature_grammar import GrammarOptions, chat_grammar, json_grammar, offered_tools
from plait.modules.streaming import teach_stream_listeners

teach_stream_listeners()  # dspy.streamify's listeners then know these adapters' field markers


def accepts_grammar(lm: BaseLM) -> bool:
    """Whether `lm` decodes under a `plait_grammar`: its engine (or the LM itself) says so."""
    engine = getattr(lm, "engine", None)
    return bool(getattr(engine, "accepts_grammar", False) or getattr(lm, "accepts_grammar", False))


def attach_grammar(lm_kwargs: dict[str, Any], lm: BaseLM, spec: GrammarSpec) -> None:
    """Put `spec` into the call's `metadata`, keeping any metadata the caller set."""
    metadata = {**(getattr(lm, "kwargs", {}) or {}).get("metadata", {}), **lm_kwargs.get("metadata", {})}
    lm_kwargs["metadata"] = {**metadata, EXTENSION_KEY: spec.to_json()}


def _max_tokens(lm: BaseLM, lm_kwargs: dict[str, Any]) -> int:
    for source in (lm_kwargs, getattr(lm, "kwargs", {}) or {}):
        for key in ("max_tokens", "max_completion_tokens"):
            if source.get(key):
                return int(source[key])
    return DEFAULT_MAX_TOKENS


class _GrammarMixin:
    """Shared by the chat and JSON adapters: build the grammar for the signature DSPy will
    parse (after its own preprocessing) and attach it to the call."""

    grammar_options: GrammarOptions
    require_grammar_engine: bool

    def _grammar(self, signature: type[Signature], options: GrammarOptions) -> GrammarSpec:
        raise NotImplementedError

    def _call_preprocess(
        self, lm: BaseLM, lm_kwargs: dict[str, Any], signature: type[Signature], inputs: dict[str, Any]
    ) -> type[Signature]:
        processed = super()._call_preprocess(lm, lm_kwargs, signature, inputs)  # type: ignore[misc]
        if not accepts_grammar(lm):
            if self.require_grammar_engine:
                raise GrammarError(
                    f"{type(self).__name__} needs an LM that decodes under a grammar (plait.LM); "
                    f"{getattr(lm, 'model', lm)!r} does not. Use dspy.ChatAdapter for other LMs, "
                    "or pass require_grammar_engine=False to send unconstrained calls."
                )
            return processed
        if not processed.output_fields:  # native tool calls are the whole answer
            return processed
        options = dataclasses.replace(
            self.grammar_options,
            max_tokens=_max_tokens(lm, lm_kwargs),
            tools=offered_tools(processed, inputs),
        )
        attach_grammar(lm_kwargs, lm, self._grammar(processed, options))
        return processed


class ConstrainedAdapter(_GrammarMixin, ChatAdapter):
    """ChatAdapter whose answers are generated under the signature's grammar.

    Args:
        text_tokens: token budget of each free-text (str) output field.
        reasoning_tokens: token budget of ChainOfThought's `reasoning` field.
        grace_tokens: after a budget is spent, how many more tokens may be used to reach the
            end of a line before the field is closed.
        number_tokens, value_tokens: budgets of an int/float value and of a JSON value, past
            which the value is ended as soon as its grammar allows.
        field_tokens: per-field budgets, by output field name.
        require_grammar_engine: refuse LMs that cannot decode under a grammar (default), rather
            than silently sending unconstrained calls.
        use_native_function_calling: a signature with a `list[dspy.Tool]` input and a
            `dspy.ToolCalls` output offers the tools to the LM (DSPy's native function calling):
            plait's engine then decodes either tool calls in the model's own format or the
            other output fields under their grammar.
    """

    def __init__(
        self,
        callbacks: list[BaseCallback] | None = None,
        *,
        text_tokens: int = GrammarOptions.text_tokens,
        reasoning_tokens: int = GrammarOptions.reasoning_tokens,
        grace_tokens: int = GrammarOptions.grace_tokens,
        number_tokens: int = 24,
        value_tokens: int = 192,
        field_tokens: dict[str, int] | None = None,
        require_grammar_engine: bool = True,
        use_native_function_calling: bool = False,
    ):
        super().__init__(
            callbacks=callbacks,
            use_native_function_calling=use_native_function_calling,
            use_json_adapter_fallback=False,
        )
        self.grammar_options = GrammarOptions(
            text_tokens=text_tokens,
            reasoning_tokens=reasoning_tokens,
            grace_tokens=grace_tokens,
            field_tokens=tuple(sorted((field_tokens or {}).items())),
            number_tokens=number_tokens,
            value_tokens=value_tokens,
        )
        self.require_grammar_engine = require_grammar_engine

    def _grammar(self, signature: type[Signature], options: GrammarOptions) -> GrammarSpec:
        return chat_grammar(signature, options)


class ConstrainedJSONAdapter(_GrammarMixin, JSONAdapter):
    """JSONAdapter whose answers are generated under the outputs' JSON schema (keys in
    signature order, str fields budgeted like `ConstrainedAdapter`'s)."""

    def __init__(
        self,
        callbacks: list[BaseCallback] | None = None,
        *,
        text_tokens: int = GrammarOptions.text_tokens,
        reasoning_tokens: int = GrammarOptions.reasoning_tokens,
        field_tokens: dict[str, int] | None = None,
        require_grammar_engine: bool = True,
    ):
        super().__init__(callbacks=callbacks, use_native_function_calling=False)
        self.grammar_options = GrammarOptions(
            text_tokens=text_tokens,
            reasoning_tokens=reasoning_tokens,
            grace_tokens=0,
            field_tokens=tuple(sorted((field_tokens or {}).items())),
        )
        self.require_grammar_engine = require_grammar_engine

    def _prepare_response_format(
        self, lm: BaseLM, lm_kwargs: dict[str, Any], signature: type[Signature]
    ) -> None:
        """The grammar replaces `response_format`; with a grammar engine none is sent."""
        if not accepts_grammar(lm):
            super()._prepare_response_format(lm, lm_kwargs, signature)

    def _grammar(self, signature: type[Signature], options: GrammarOptions) -> GrammarSpec:
        return json_grammar(signature, options)


__all__ = ["ConstrainedAdapter", "ConstrainedJSONAdapter", "accepts_grammar", "attach_grammar"]
