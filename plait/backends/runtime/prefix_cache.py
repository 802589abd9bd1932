"""Prompt prefixes computed once: KV blocks plus Mamba state checkpoints, keyed by block hash.

A prompt is cut into blocks of `block_size` tokens; block i is keyed by a hash chain over the
token ids of blocks 0..i, so equal keys mean equal prefixes. A block holds:

* the attention keys/values of its positions, for every attention layer, and
* for models with fixed-size state (Mamba conv + SSM), a checkpoint of that state at the
  block's end — only where a pass of the scheduler ended exactly there. The scheduler makes
  prefill passes end on block boundaries, and `block_size` is a multiple of the SSD
  `chunk_size`, so every full block of a prompt gets its checkpoint.

A new request resumes from the deepest cached block that has everything it needs, and
computes only its own suffix. Because each block carries its own checkpoint, there is no
"checkpoint not on the shared boundary" and no "node split drops the checkpoint" failure of
radix trees that keep Mamba state only at node ends. Eviction is LRU over leaf blocks (a block
with cached children is never evicted before them) under a byte budget; pinned blocks (a served
program's static prompt prefixes) are never evicted.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from plait.backends.models.state import StateSpec, has_fixed_state
from plait.backends.runtime.state_pool import StatePool


def block_hashes(ids: list[int], block_size: int) -> list[int]:
    """Hash chain over the full blocks of `ids`: hashes[i] identifies ids[: (i+1)*block_size]."""
    hashes, parent = [], 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


@dataclass
class Block:
    tokens: tuple[int, ...]
    parent: int | None
    seq_state: list[dict[str, torch.Tensor]]  # per layer: this block's KV slice
    fixed_state: list[dict[str, torch.Tensor]] | None = None  # per layer: state at the block's end
    children: int = 0
    nbytes: int = 0
    hits: int = field(default=0)
    pinned: bool = False  # never evicted (see `PrefixCache.pin`)


class PrefixCache:
    def __init__(self, layer_specs: list[dict[str, StateSpec]], block_size: int, budget_bytes: int):
        self.layer_specs = layer_specs
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self.has_fixed_state = has_fixed_state(layer_specs)
        self.blocks: OrderedDict[int, Block] = OrderedDict()
        self.nbytes = 0
        self.hit_tokens = 0
        self.lookups = 0

    # ---- reading --------------------------------------------------------------------------------
    def match(self, ids: list[int], hashes: list[int]) -> int:
        """Tokens of `ids` that can be restored (block-aligned; at least one token stays to compute)."""
        self.lookups += 1
        usable = 0
        for i, key in enumerate(hashes):
            block = self.blocks.get(key)
            end = (i + 1) * self.block_size
            if block is None or end >= len(ids) or block.tokens != tuple(ids[end - self.block_size : end]):
                break
            if not self.has_fixed_state or block.fixed_state is not None:
                usable = end
        return usable

    def restore(self, hashes: list[int], tokens: int, pool: StatePool, slot: int) -> None:
        """Copy the first `tokens` (block-aligned) positions of state into a pool slot."""
        count = tokens // self.block_size
        chain = [self.blocks[h] for h in hashes[:count]]
        for i, block in enumerate(chain):
            lo = i * self.block_size
            for layer, saved in enumerate(block.seq_state):
                for name, tensor in saved.items():
                    axis = self.layer_specs[layer][name].seq_axis
                    pool.layers[layer][name][slot].narrow(axis, lo, self.block_size).copy_(tensor)
        if self.has_fixed_state and chain:
            for layer, saved in enumerate(chain[-1].fixed_state):
                for name, tensor in saved.items():
                    pool.layers[layer][name][slot].copy_(tensor)
        for key in reversed(hashes[:count]):  # parents end up most recent: leaves are evicted first
            self.blocks.move_to_end(key)
            self.blocks[key].hits += 1
        self.hit_tokens += tokens

    def cached_blocks(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` the cache holds (their full state, Mamba
        checkpoints included): a prefill of that many blocks has nothing left to compute."""
        count = 0
        for key in hashes:
            block = self.blocks.get(key)
            if block is None or (self.has_fixed_state and block.fixed_state is None):
                break
            count += 1
        return count

    # ---- writing --------------------------------------------------------------------------------
    def insert(
        self, ids: list[int], hashes: list[int], cached: int, pool: StatePool, slot: int, pin: bool = False
    ) -> None:
        """Save the blocks of a slot's prompt that are now fully in its cache (with `pin`,
        pinned before anything is evicted to make room for them).

        The fixed-size state in the pool is the state after `cached` tokens, so it is a valid
        checkpoint only for a block ending exactly at `cached`.
        """
        for i in range(min(cached // self.block_size, len(hashes))):
            key = hashes[i]
            end = (i + 1) * self.block_size
            block = self.blocks.get(key)
            if block is None:
                seq_state = []
                for layer, specs in enumerate(self.layer_specs):
                    seq_state.append(
                        {
                            name: pool.layers[layer][name][slot]
                            .narrow(spec.seq_axis, end - self.block_size, self.block_size)
                            .clone()
                            for name, spec in specs.items()
                            if spec.seq_axis is not None
                        }
                    )
                block = Block(
                    tuple(ids[end - self.block_size : end]), hashes[i - 1] if i else None, seq_state
                )
                block.nbytes = sum(t.nbytes for layer in seq_state for t in layer.values())
                self._add(key, block)
            if self.has_fixed_state and end == cached and block.fixed_state is None:
                block.fixed_state = [
                    {
                        name: pool.layers[layer][name][slot].clone()
                        for name, spec in specs.items()
                        if spec.seq_axis is None
                    }
                    for layer, specs in enumerate(self.layer_specs)
                ]
                added = sum(t.nbytes for layer in block.fixed_state for t in layer.values())
                block.nbytes += added
                self.nbytes += added
            block.pinned = block.pinned or pin
        self._evict()

    def pin(self, hashes: list[int]) -> int:
        """Keep the cached blocks among `hashes` for good: eviction passes them by (they still
        count against the budget). Returns how many blocks are pinned."""
        pinned = 0
        for key in hashes:
            block = self.blocks.get(key)
            if block is not None:
                block.pinned = True
                pinned += 1
        return pinned

    @property
    def pinned_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values() if b.pinned)

    def clear(self) -> None:
        """Drop every block, pinned ones too (the hit counters keep counting)."""
        self.blocks.clear()
        self.nbytes = 0

    def _add(self, key: int, block: Block) -> None:
        self.blocks[key] = block
        self.nbytes += block.nbytes
        if block.parent is not None and block.parent in self.blocks:
            self.blocks[block.parent].children += 1

    def _evict(self) -> None:
        while self.nbytes > self.budget_bytes and self.blocks:
            key = next((k for k, b in self.blocks.items() if b.children == 0 and not b.pinned), None)
            if key is None:
                break
            block = self.blocks.pop(key)
            self.nbytes -= block.nbytes
            if block.parent is not None and block.parent in self.blocks:
                self.blocks[block.parent].children -= 1
