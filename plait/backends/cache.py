"""Decoding state for every running sequence, kept in preallocated slots.

A model declares what state each layer needs (`StateSpec`s: attention keys/values grow with the
sequence, Mamba conv/SSM states have a fixed size). The `StatePool` holds one tensor per layer
and state name, shaped `[slots, *spec.shape]`, where the sequence axis grows by doubling.

The scheduler keeps the decoding sequences in slots `0..B-1` (it moves a sequence down when one
before it finishes), so a batched decode step reads the pool through plain slicing views: no
gather, no copy of the KV cache per step. A `Batch` names the rows of one forward pass.
"""

from dataclasses import dataclass

import torch

from plait.errors import ContextLengthError, MemoryBudgetError

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


class StatePool:
    """Slots of per-layer state; grows on demand up to a memory budget and a context limit."""

    def __init__(
        self,
        layer_specs: list[dict[str, StateSpec]],
        device: torch.device | str = "cpu",
        max_length: int = 8192,
        budget_bytes: int | None = None,
        slots: int = 1,
        capacity: int = 256,
    ):
        self.layer_specs = layer_specs
        self.device = torch.device(device)
        self.max_length = max_length
        self.budget_bytes = budget_bytes
        self.slots = 0
        self.capacity = 0
        self.layers: list[dict[str, torch.Tensor]] = [{} for _ in layer_specs]
        self.reserve(slots, min(capacity, max_length))

    def bytes_for(self, slots: int, capacity: int) -> int:
        total = 0
        for specs in self.layer_specs:
            for spec in specs.values():
                numel = slots
                for d in spec.concrete_shape(capacity):
                    numel *= d
                total += numel * torch.empty((), dtype=spec.dtype).element_size()
        return total

    def nbytes(self) -> int:
        return self.bytes_for(self.slots, self.capacity)

    def reserve(self, slots: int, length: int) -> None:
        """Make room for `slots` sequences of up to `length` tokens (doubling, never shrinking)."""
        if length > self.max_length:
            raise ContextLengthError(
                f"sequence of {length} tokens exceeds the context window of {self.max_length} tokens"
            )
        new_slots, new_capacity = max(self.slots, 1), max(self.capacity, 1)
        while new_slots < slots:
            new_slots *= 2
        while new_capacity < length:
            new_capacity *= 2
        new_capacity = min(new_capacity, self.max_length)
        if (new_slots, new_capacity) == (self.slots, self.capacity):
            return
        needed = self.bytes_for(new_slots, new_capacity)
        if self.budget_bytes is not None and needed > self.budget_bytes:
            raise MemoryBudgetError(
                f"decoding state for {slots} sequences of {length} tokens needs {needed / 2**20:.0f} MiB, "
                f"over the engine's budget of {self.budget_bytes / 2**20:.0f} MiB: lower the concurrency or "
                "max_tokens, or raise memory_budget_mb"
            )
        for specs, tensors in zip(self.layer_specs, self.layers):
            for name, spec in specs.items():
                grown = torch.zeros((new_slots, *spec.concrete_shape(new_capacity)), dtype=spec.dtype,
                                    device=self.device)
                old = tensors.get(name)
                if old is not None:
                    region = [slice(0, self.slots)] + [slice(0, d) for d in old.shape[1:]]
                    grown[tuple(region)] = old
                tensors[name] = grown
        self.slots, self.capacity = new_slots, new_capacity

    def clear(self, slot: int) -> None:
        """Zero the fixed-size states of a slot so a new sequence starts from nothing."""
        for specs, tensors in zip(self.layer_specs, self.layers):
            for name, spec in specs.items():
                if spec.seq_axis is None:
                    tensors[name][slot].zero_()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's state (its first `length` positions of KV) from one slot to another."""
        for specs, tensors in zip(self.layer_specs, self.layers):
            for name, spec in specs.items():
                t = tensors[name]
                if spec.seq_axis is None:
                    t[dst].copy_(t[src])
                else:
                    index = [slice(None)] * (t.dim() - 1)
                    index[spec.seq_axis] = slice(0, length)
                    t[dst][tuple(index)] = t[src][tuple(index)]


@dataclass
class Batch:
    """The rows of one forward pass: slots `first_slot .. first_slot+B-1` of a pool.

    `cache_lens[r]` is how many tokens row r already has in the pool; the new tokens of row r
    take positions `cache_lens[r] ..`. Rows of a multi-token pass (prefill, forced spans) are
    one row or several padded rows (`new_tokens`); decode passes have one token per row.
    """

    pool: StatePool
    first_slot: int
    cache_lens: torch.Tensor  # [B] int64
    new_tokens: torch.Tensor | None = None
    """[B] real tokens per row when several rows share a multi-token pass, each padded on the
    right to the pass's length (None: every row's tokens fill the pass). Padding writes keys and
    values past a row's end, where nothing reads them before real tokens overwrite them."""

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
        """[B, T, ...] -> [B, 1, ...]: each row's last real position."""
        if self.new_tokens is None:
            return x[:, -1:]
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, self.new_tokens.to(x.device) - 1][:, None]

    def __post_init__(self) -> None:
        self._masks: dict[int, torch.Tensor] = {}
        self._positions: dict[int, torch.Tensor] = {}


@dataclass
class LayerState:
    """One layer's state views for a batch, plus the batch (positions, masks)."""

    tensors: dict[str, torch.Tensor]
    batch: Batch
