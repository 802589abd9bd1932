"""Decoding state for every running sequence, kept in slots.

The `StatePool` holds one tensor per layer and state name, shaped `[slots, *spec.shape]`
(the `StateSpec`s the model declares), where the sequence axis is `capacity` long. The scheduler
keeps the decoding sequences in slots `0..B-1` (it moves a sequence down when one before it
finishes), so a batched decode step reads the pool through plain slicing views.
"""

import math

import torch

from plait.backends.models.state import StateSpec
from plait.errors import ContextLengthError, MemoryBudgetError

SLOT_BLOCK = 4
"""Slots are allocated in blocks of this many sequences."""

TOKEN_BLOCK = 128
"""The sequence axis is allocated in blocks of this many tokens."""

GROWTH = 1.25
"""Growing allocates this much more than needed, so a decoding batch does not reallocate (and
copy the whole pool) every block; shrinking waits until less than half is in use."""


def _bytes(spec: StateSpec, capacity: int) -> int:
    return math.prod(spec.concrete_shape(capacity)) * spec.dtype.itemsize


def _round_up(value: int, block: int) -> int:
    return -(-value // block) * block


class StatePool:
    """Slots of per-layer state, sized to what the running sequences need under a byte budget.

    Memory is slots x the longest sequence's length; both axes grow and shrink in blocks
    (`fit`), so a burst of long requests does not leave the process large for good.
    """

    def __init__(
        self,
        layer_specs: list[dict[str, StateSpec]],
        device: torch.device | str = "cpu",
        max_length: int = 8192,
        budget_bytes: int | None = None,
        slots: int = 1,
        capacity: int = TOKEN_BLOCK,
    ):
        self.layer_specs = layer_specs
        self.device = torch.device(device)
        self.max_length = max_length
        self.budget_bytes = budget_bytes
        self.slots = 0
        self.capacity = 0
        self.layers: list[dict[str, torch.Tensor]] = [{} for _ in layer_specs]
        # a slot's bytes are fixed + per_token * capacity: the scheduler asks every step
        specs = [spec for layer in layer_specs for spec in layer.values()]
        self._fixed_bytes = sum(_bytes(spec, 0) for spec in specs if spec.seq_axis is None)
        self._token_bytes = sum(_bytes(spec, 1) for spec in specs if spec.seq_axis is not None)
        self.reserve(slots, min(capacity, max_length))

    def bytes_for(self, slots: int, capacity: int) -> int:
        return slots * (self._fixed_bytes + self._token_bytes * capacity)

    def nbytes(self) -> int:
        return self.bytes_for(self.slots, self.capacity)

    def fits(self, slots: int, length: int) -> bool:
        """Whether `slots` sequences of up to `length` tokens fit the budget."""
        return (
            self.budget_bytes is None
            or self.bytes_for(slots, min(length, self.max_length)) <= self.budget_bytes
        )

    def reserve(self, slots: int, length: int) -> None:
        """Make room for at least `slots` sequences of up to `length` tokens (grows only)."""
        self._check_length(length)
        if slots <= self.slots and length <= self.capacity:
            return
        self._resize(*self._grown(max(slots, self.slots), max(length, self.capacity)))

    def fit(self, slots: int, length: int, *, shrink: bool = False) -> None:
        """Hold what a step needs, in blocks: grow to `slots` x `length`, and shrink an axis
        that is more than twice its need (hysteresis: no reallocation back and forth), or any
        axis larger than its need with `shrink` (the engine is idle)."""
        self._check_length(length)
        slots, length = max(slots, 1), max(length, 1)
        slack = 1 if shrink else 2
        target_slots, target_length = self.slots, self.capacity
        if slots > self.slots or slack * _round_up(slots, SLOT_BLOCK) < self.slots:
            target_slots = slots
        if length > self.capacity or slack * _round_up(length, TOKEN_BLOCK) < self.capacity:
            target_length = length
        if not self.fits(target_slots, target_length):  # the slack kept would break the budget
            target_slots, target_length = slots, length
        if (target_slots, target_length) != (self.slots, self.capacity):
            self._resize(*self._grown(target_slots, target_length))

    def _check_length(self, length: int) -> None:
        if length > self.max_length:
            raise ContextLengthError(
                f"sequence of {length} tokens exceeds the context window of {self.max_length} tokens"
            )

    def _grown(self, slots: int, length: int) -> tuple[int, int]:
        """The allocation for a need: in blocks, with room to grow, without leaving the budget
        when the need itself fits (then the need exactly)."""
        roomy_slots = _round_up(slots if slots <= self.slots else int(slots * GROWTH), SLOT_BLOCK)
        roomy_length = _round_up(length if length <= self.capacity else int(length * GROWTH), TOKEN_BLOCK)
        roomy = (max(roomy_slots, slots), min(max(roomy_length, length), self.max_length))
        return roomy if self.fits(*roomy) else (slots, length)

    def _resize(self, slots: int, capacity: int) -> None:
        needed = self.bytes_for(slots, capacity)
        if self.budget_bytes is not None and needed > self.budget_bytes:
            raise MemoryBudgetError(
                f"decoding state for {slots} sequences of {capacity} tokens needs {needed / 2**20:.0f} MiB, "
                f"over the engine's budget of {self.budget_bytes / 2**20:.0f} MiB: lower the concurrency or "
                "max_tokens, or raise memory_budget_mb"
            )
        for specs, tensors in zip(self.layer_specs, self.layers):
            for name, spec in specs.items():
                resized = torch.zeros(
                    (slots, *spec.concrete_shape(capacity)), dtype=spec.dtype, device=self.device
                )
                old = tensors.pop(name, None)
                if old is not None:
                    kept = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, resized.shape))
                    resized[kept] = old[kept]
                    del old
                tensors[name] = resized
        self.slots, self.capacity = slots, capacity

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

    def save_fixed(self, first_slot: int, count: int) -> list[dict[str, torch.Tensor]]:
        """A copy of the fixed-size state (Mamba conv/SSM) of slots `first_slot ..
        first_slot+count-1`: what a speculative pass must be able to go back to, since that
        state cannot be cut back to an earlier token the way a KV cache can."""
        rows = slice(first_slot, first_slot + count)
        return [
            {name: tensors[name][rows].clone() for name, spec in specs.items() if spec.seq_axis is None}
            for specs, tensors in zip(self.layer_specs, self.layers)
        ]

    def restore_fixed(self, saved: list[dict[str, torch.Tensor]], index: int, slot: int) -> None:
        """Put row `index` of a `save_fixed` copy back into `slot`."""
        for copies, tensors in zip(saved, self.layers):
            for name, copy in copies.items():
                tensors[name][slot].copy_(copy[index])
