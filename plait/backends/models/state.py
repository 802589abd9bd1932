"""What a layer reads and writes for each sequence it continues: state specs and batches.

A model declares what state each layer needs (`StateSpec`s: attention keys/values grow with the
sequence, Mamba conv/SSM states have a fixed size). The runtime keeps that state in slots
(`plait.backends.runtime.state_pool.StatePool`); a `Batch` names the rows of one forward pass,
a contiguous run of slots, so a layer reads its state through plain slicing views: no gather,
no copy of the KV cache per step.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

SEQ = -1
"""Marks the axis of a `StateSpec.shape` that grows with the sequence (attention KV)."""


@dataclass(frozen=True)
class StateSpec:
    """The per-sequence shape and dtype of one piece of layer state."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def seq_axis(self) -> int | None:
        return self.shape.index(SEQ) if SEQ in self.shape else None

    def concrete_shape(self, capacity: int) -> tuple[int, ...]:
        return tuple(capacity if d == SEQ else d for d in self.shape)


def has_fixed_state(layer_specs: list[dict[str, StateSpec]]) -> bool:
    """Whether any layer keeps state that does not grow with the sequence (Mamba conv/SSM):
    such state sums up everything fed in, so it cannot be cut at an arbitrary token."""
    return any(spec.seq_axis is None for specs in layer_specs for spec in specs.values())


class StateStore(Protocol):
    """Where a batch's state lives: per layer, one tensor per state name, shaped
    `[slots, *spec.shape]` (`plait.backends.runtime.state_pool.StatePool`)."""

    layers: list[dict[str, torch.Tensor]]


@dataclass
class Batch:
    """The rows of one forward pass: slots `first_slot .. first_slot+B-1` of a pool.

    `cache_lens[r]` is how many tokens row r already has in the pool; the new tokens of row r
    take positions `cache_lens[r] ..`. Rows of a multi-token pass (prefill, forced spans) are
    one row or several padded rows (`new_tokens`); decode passes have one token per row.
    """

    pool: StateStore
    first_slot: int
    cache_lens: torch.Tensor  # [B] int64
    new_tokens: torch.Tensor | None = None
    """[B] real tokens per row when several rows share a multi-token pass, each padded on the
    right to the pass's length (None: every row's tokens fill the pass). Padding writes keys and
    values past a row's end, where nothing reads them before real tokens overwrite them."""
    logit_count: int = 1
    """How many of each row's last real positions a `last_only` pass returns logits for: one
    to sample the next token; 1 + k to verify k drafted tokens (speculative decoding)."""
    step_clamp: bool = False
    """Treat every position as a one-token decode step where the dt clamp differs between the
    two (`plait.backends.models.mamba2.DtClamp`): a verify pass computes the tokens that plain
    decoding would have fed one at a time, so it must round them the same way."""

    @property
    def size(self) -> int:
        return int(self.cache_lens.shape[0])

    def layer(self, index: int) -> "LayerState":
        """Views `[B, ...]` of this batch's slots for one layer's state."""
        rows = slice(self.first_slot, self.first_slot + self.size)
        return LayerState({name: t[rows] for name, t in self.pool.layers[index].items()}, self)

    def key_mask(self, new_tokens: int) -> torch.Tensor:
        """`[B, 1, T, L]` bool: may query t of row r see cached position j (j <= cache_len + t)?

        L is the longest row's length after this pass; shorter rows mask their tail.
        """
        mask = self._masks.get(new_tokens)
        if mask is None:
            keys = torch.arange(self.key_length(new_tokens), device=self.cache_lens.device)
            last = self.positions(new_tokens)
            mask = self._masks[new_tokens] = (keys[None, None, :] <= last[:, :, None])[:, None]
        return mask

    def key_length(self, new_tokens: int) -> int:
        """L of `key_mask`: the longest row's length after this pass."""
        return int(self.cache_lens.max()) + new_tokens

    def positions(self, new_tokens: int) -> torch.Tensor:
        """`[B, T]` positions of this pass's new tokens (one tensor per pass, shared by layers)."""
        positions = self._positions.get(new_tokens)
        if positions is None:
            steps = torch.arange(new_tokens, device=self.cache_lens.device)
            positions = self._positions[new_tokens] = self.cache_lens[:, None] + steps
        return positions

    def last_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [B, logit_count, ...]: each row's last real positions (a row with
        fewer real tokens repeats its first position in front)."""
        count = self.logit_count
        if self.new_tokens is None:
            return x[:, -count:]
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        ends = self.new_tokens.to(x.device)[:, None]
        positions = (ends - count + torch.arange(count, device=x.device)).clamp(min=0)
        return x[rows, positions]

    def __post_init__(self) -> None:
        self._masks: dict[int, torch.Tensor] = {}
        self._positions: dict[int, torch.Tensor] = {}


@dataclass
class LayerState:
    """One layer's state views for a batch, plus the batch (positions, masks)."""

    tensors: dict[str, torch.Tensor]
    batch: Batch
