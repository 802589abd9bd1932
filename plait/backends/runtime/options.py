"""The engine's options, with their defaults written once."""

import os
from dataclasses import dataclass, fields

import torch

from plait.backends.runtime.drafting import SPECULATIVE_METHODS

DEFAULT_STATE_BUDGET_MB = 512
"""Decoding state (KV cache, Mamba state) on CPU, at most: with the 135M embedded model and
32 concurrent sequences this keeps `plait serve` under 2 GB, and a sequence that outgrows it
is paused and resumed later rather than growing the process."""


def machine_memory_budget_mb(device: torch.device) -> int:
    """A default budget for decoding state: on CUDA, 80% of the GPU memory still free after the
    weights; on CPU, `DEFAULT_STATE_BUDGET_MB`, or a tenth of the RAM on a smaller machine."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free / 2**20)
    ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    return int(min(DEFAULT_STATE_BUDGET_MB, ram_mb / 10))


@dataclass(frozen=True)
class EngineOptions:
    """How an engine schedules and how much memory it may use.

    `max_batch_size` sequences run at once; `max_queue` more wait (then `EngineOverloadedError`).
    `memory_budget_mb` bounds the decoding state (None: `machine_memory_budget_mb`). A
    scheduler step runs at most `step_tokens` tokens (decode rows first, prompt chunks share
    the rest, each at most `prefill_chunk`): long prompts cannot stall the others' decoding.
    `max_length` caps a sequence below the model's context. The prefix cache keeps prompt
    blocks (`prefix_block_size` tokens; default 16 for attention-only models, 64 rounded to
    the SSD chunk for hybrids) under `prefix_cache_mb`. `speculative` drafts tokens to verify
    in one pass ("ngram": prompt lookup; "mtp": the checkpoint's MTP heads; None: off), at most
    `draft_tokens` a step per sequence; outputs are the same tokens as without it. On CPU each
    pass gets the cores other processes leave free, up to torch's thread count
    (`cpu_threads=None`, see `plait.backends.runtime.cpu_threads`), or exactly `cpu_threads`.
    """

    max_batch_size: int = 32
    max_queue: int = 1024
    memory_budget_mb: int | None = None
    step_tokens: int | None = None
    prefill_chunk: int = 512
    max_length: int | None = None
    prefix_cache: bool = True
    prefix_cache_mb: int = 128
    prefix_block_size: int | None = None
    speculative: str | None = None
    draft_tokens: int = 4
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative must be {' or '.join(SPECULATIVE_METHODS)} (or None), not {self.speculative!r}"
            )
        for name in ("max_batch_size", "max_queue", "prefill_chunk", "draft_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("memory_budget_mb", "step_tokens", "max_length", "prefix_block_size", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.prefix_cache_mb < 0:
            raise ValueError("prefix_cache_mb must be >= 0")

    @classmethod
    def from_kwargs(cls, options: dict) -> "EngineOptions":
        unknown = sorted(set(options) - ENGINE_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(ENGINE_OPTIONS))}"
            )
        return cls(**options)

    def step_token_budget(self, device: torch.device) -> int:
        """Tokens per scheduler step: a CPU pass of 256 tokens keeps decode rows moving every few
        hundred milliseconds; a GPU takes far larger passes at the same latency."""
        return self.step_tokens or (2048 if device.type == "cuda" else 256)


ENGINE_OPTIONS = frozenset(f.name for f in fields(EngineOptions))
"""The keyword names that configure an engine (`plait.LM` passes the others to DSPy)."""
