"""Choosing the next token of every row of a batch: greedy, or temperature with top-k / top-p,
reproducible per seed, with one host sync for the whole batch.

Each sampled row draws from its own generator, so a request's tokens do not depend on what
else is in the batch. Rows whose logits give no distribution (NaN from a broken model, or a
grammar that allows nothing) get None instead of a token: the scheduler fails that row alone.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-4
"""Below this, `logits / temperature` overflows fp32 (softmax turns to NaN): such a request
asks for the most likely token, so it is decoded greedily."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int | None]:
    """One token per row of fp32 logits [B, V] (already masked by any grammar: -inf where
    disallowed); None for a row with no valid distribution."""
    valid = ~(torch.isnan(logits).any(-1) | torch.isneginf(logits).all(-1))
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        ok = valid.tolist()  # a NaN row must not reach multinomial (on CUDA it is a device assert)
        for i in sampled:
            if ok[i]:
                tokens[i] = _draw(logits[i], params[i], generators[i])
    return [t if t >= 0 else None for t in torch.where(valid, tokens, -1).tolist()]


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """A 1-element tensor: one sample from softmax(logits / temperature) under top-k / top-p."""
    return torch.multinomial(probabilities(logits, params), 1, generator=generator)[0]


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: softmax(logits / temperature), cut to the
    top-k tokens and to the smallest top-p mass."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def verify_draft(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, draft: int | None
) -> int | None:
    """The token a row keeps at a position where `draft` was proposed (None: nothing drafted
    there), from fp32 logits [V] already masked by any grammar; None when they give no
    distribution.

    Greedy rows keep the argmax, so a draft survives only where it is the argmax. Sampled rows
    use speculative sampling with a deterministic drafter (q = 1 on the draft): keep the draft
    with probability p(draft), else draw from p with the draft removed. The kept token is then
    distributed exactly as p — the drafted run is as likely as plain sampling makes it.
    """
    if torch.isnan(logits).any() or torch.isneginf(logits).all():
        return None
    if params.greedy:
        return int(logits.argmax())
    probs = probabilities(logits, params)
    if draft is not None:
        if float(torch.rand((), generator=generator)) < float(probs[draft]):
            return draft
        probs[draft] = 0.0
        if not bool(probs.sum() > 0):
            return None
    return int(torch.multinomial(probs, 1, generator=generator)[0])
