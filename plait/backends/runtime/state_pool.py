"""Decoding state for every running sequence, kept in preallocated slots.

The `StatePool` holds one tensor per layer and state name, shaped `[slots, *spec.shape]`
(the `StateSpec`s the model declares), where the sequence axis grows by doubling. The scheduler
keeps the decoding sequences in slots `0..B-1` (it moves a sequence down when one before it
finishes), so a batched decode step reads the pool through plain slicing views.
"""

import torch

from plait.backends.models.state import StateSpec
from plait.errors import ContextLengthError, MemoryBudgetError


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
                grown = torch.zeros(
                    (new_slots, *spec.concrete_shape(new_capacity)), dtype=spec.dtype, device=self.device
                )
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
