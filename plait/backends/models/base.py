"""What the engine needs from a model family, whatever its layers are."""

from dataclasses import dataclass

import torch
from torch import nn

from plait.backends.kernels.cpu_linear import FewRowLinear
from plait.backends.models.state import Batch, StateSpec


@dataclass
class ModelInfo:
    """Facts about a loaded checkpoint that the engine and the CLI report."""

    family: str
    context_length: int
    vocab_size: int
    num_parameters: int


class CausalLM(nn.Module):
    """A decoder that reads and writes its per-sequence state through a `Batch`.

    `forward(ids, None)` is one full pass with no cache (the reference the cached paths are
    tested against); `forward(ids, batch)` continues the batch's sequences from their state.
    """

    context_length: int
    vocab_size: int
    state_chunk: int = 1
    """Fixed-size state (Mamba) can be checkpointed only at multiples of this many tokens."""

    def state_specs(self, dtype: torch.dtype) -> list[dict[str, StateSpec]]:
        """Per layer, the state each sequence needs (empty dict for stateless layers)."""
        raise NotImplementedError

    def forward(
        self, input_ids: torch.Tensor, batch: Batch | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with `last_only`)."""
        raise NotImplementedError

    def fuse_projections(self) -> "CausalLM":
        """Merge the projections that read the same input (q/k/v, gate/up) into one matmul each:
        layers that can do so have a `fuse()` method; then plain linear layers become
        `FewRowLinear` (faster few-row passes on CPU). Done once after loading, before serving."""
        for module in list(self.modules()):
            if module is not self and callable(getattr(module, "fuse", None)):
                module.fuse()
        for module in self.modules():  # then every plain linear layer, fused ones included
            if type(module) is nn.Linear:
                module.__class__ = FewRowLinear
        return self

    def info(self, family: str) -> ModelInfo:
        return ModelInfo(
            family, self.context_length, self.vocab_size, sum(p.numel() for p in self.parameters())
        )
