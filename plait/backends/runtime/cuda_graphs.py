"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small batch is hundreds of small kernel launches; on a GPU the launches,
not the maths, set its speed. Capturing the step once as a CUDA graph and replaying it costs
one launch. A graph replays fixed shapes at fixed addresses, so:

* the batch is padded up to a bucket (2, 4, 8, ... rows). Padding rows have cache length 0
  and token 0: they compute a throwaway first token in the free slots after the batch, and no
  real row can see them (every row's state and attention are its own);
* the ids and cache lengths are copied into static tensors the graph reads, and the logits
  are read from the static tensor it writes;
* attention runs the Triton decode kernel, which reads each row's length on the device; the
  PyTorch fallback reads the pool's whole KV capacity under a mask computed on the device
  (`GraphBatch`), instead of slicing to the longest row, which would need the host to know it;
* nothing in the captured step may ask the host anything: on CUDA the Mamba, MoE and attention
  layers run the Triton kernels, which need no sync (see mamba2.py, moe.py, attention.py).

Graphs are captured against the pool's tensors; when the pool grows (new tensors) they are
dropped and recaptured. A bucket of one row exists only with the kernels: the PyTorch
attention's one-row path reads a cache length on the host. A step that does not fit (its
rows are not the last live slots, so padding would land on another sequence; more rows than
the largest bucket; a pool too small and no budget to grow it) returns None and the caller
runs the model eagerly.

`DecodeGraphs(..., capture=False)` does the same bucketing and padding and runs the padded
step eagerly: that is how the bucket logic is tested on CPU.
"""

import logging
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plait.backends.kernels.dispatch import use_kernels
from plait.backends.models.base import CausalLM
from plait.backends.models.state import Batch
from plait.backends.runtime.state_pool import StatePool
from plait.errors import MemoryBudgetError

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class HostSyncs(TorchDispatchMode):
    """Records the ops run inside it that make the host wait for the device's result.

    On a GPU such an op (`.item()`, `int(t)`, `bool(t)`, boolean-mask indexing, `nonzero`,
    `unique`) stalls the step, and inside CUDA-graph capture it is an error: this is how a CPU
    test proves that a decode step can be captured. Ops are judged by what they ask, not by
    where they run, so it works on CPU tensors too.
    """

    SYNCING = frozenset(
        {
            "aten::_local_scalar_dense",
            "aten::nonzero",
            "aten::masked_select",
            "aten::_unique2",
            "aten::unique_dim",
            "aten::unique_consecutive",
            "aten::equal",
        }
    )
    MASK_INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_"})

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name in self.MASK_INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        counted = func._overloadname in ("Tensor", "self_Tensor") and "output_size" not in (kwargs or {})
        if name in self.SYNCING or masked or (name == "aten::repeat_interleave" and counted):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def bucket_for(rows: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket that holds `rows` rows, or None when none does."""
    return next((b for b in buckets if b >= rows), None)


class GraphBatch(Batch):
    """A decode `Batch` whose attention mask covers the pool's whole capacity.

    Its shape depends on the pool only, and it is computed from `cache_lens` on the device,
    so a graph that captured it stays right for any lengths it replays with.
    """

    def key_length(self, new_tokens: int) -> int:
        return self.pool.capacity


class _Captured:
    def __init__(self, graph, ids: torch.Tensor, lens: torch.Tensor, logits: torch.Tensor):
        self.graph, self.ids, self.lens, self.logits = graph, ids, lens, logits


class DecodeGraphs:
    """Runs one-token decode steps of `model` on `pool` from captured graphs."""

    def __init__(
        self, model: CausalLM, pool: StatePool, buckets: tuple[int, ...] = BUCKETS, capture: bool = True
    ):
        self.model, self.pool, self.buckets = model, pool, buckets
        self.capture = capture
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self._pool_shape = (pool.slots, pool.capacity)
        self._mempool = None
        self.failed = False

    @classmethod
    def for_device(cls, model: CausalLM, pool: StatePool) -> "DecodeGraphs | None":
        """Graphs for a CUDA pool (unless PLAIT_CUDA_GRAPHS=0); None elsewhere."""
        if pool.device.type != "cuda" or os.environ.get("PLAIT_CUDA_GRAPHS") == "0":
            return None
        kernels = use_kernels(next(model.parameters()))
        return cls(model, pool, BUCKETS if kernels else BUCKETS[1:])

    def run(
        self, ids: torch.Tensor, first_slot: int, cache_lens: torch.Tensor, live_slots: int
    ) -> torch.Tensor | None:
        """Decode ids [B, 1] for slots first_slot.. (cache_lens [B]); -> logits [B, 1, V], or
        None when this step cannot be padded safely (the caller then runs it eagerly).
        `live_slots`: slots 0..live_slots-1 hold sequences; padding may only use the rest."""
        rows = ids.shape[0]
        bucket = bucket_for(rows, self.buckets)
        if self.failed or bucket is None or ids.shape[1] != 1 or first_slot + rows != live_slots:
            return None
        if first_slot + bucket > self.pool.slots:
            try:
                self.pool.reserve(first_slot + bucket, self.pool.capacity)
            except MemoryBudgetError:
                return None
        if (self.pool.slots, self.pool.capacity) != self._pool_shape:  # new pool tensors
            self.graphs.clear()
            self._pool_shape = (self.pool.slots, self.pool.capacity)
        if not self.capture:
            padded_ids, padded_lens = self._padded(ids, cache_lens, bucket)
            return self.model(padded_ids, GraphBatch(self.pool, first_slot, padded_lens), last_only=True)[
                :rows
            ]
        captured = self.graphs.get((first_slot, bucket))
        if captured is None:
            try:
                captured = self.graphs[(first_slot, bucket)] = self._capture(first_slot, bucket)
            except Exception:  # e.g. a layer without a sync-free path on this install
                log.warning("CUDA graph capture failed; decoding eagerly from now on", exc_info=True)
                self.failed = True
                return None
        captured.ids[:rows].copy_(ids)
        captured.ids[rows:].zero_()
        captured.lens[:rows].copy_(cache_lens)
        captured.lens[rows:].zero_()
        captured.graph.replay()
        return captured.logits[:rows].clone()

    @staticmethod
    def _padded(ids: torch.Tensor, lens: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        extra = bucket - ids.shape[0]
        return (torch.cat([ids, ids.new_zeros(extra, 1)]), torch.cat([lens, lens.new_zeros(extra)]))

    def _slots_state(self, first_slot: int, bucket: int) -> list[dict[str, torch.Tensor]]:
        rows = slice(first_slot, first_slot + bucket)
        return [{name: t[rows].clone() for name, t in layer.items()} for layer in self.pool.layers]

    def _capture(self, first_slot: int, bucket: int) -> _Captured:
        """Warm up (compiles the Triton kernels, lets cuBLAS pick its kernels), then capture.

        Warm-up runs really execute and write the slots' state, so those slots are saved first
        and put back before capturing (capturing itself executes nothing).
        """
        device = self.pool.device
        ids = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        lens = torch.zeros(bucket, dtype=torch.long, device=device)
        saved = self._slots_state(first_slot, bucket)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(ids, GraphBatch(self.pool, first_slot, lens), last_only=True)
        torch.cuda.current_stream(device).wait_stream(side)
        rows = slice(first_slot, first_slot + bucket)
        for layer, kept in zip(self.pool.layers, saved):
            for name, t in kept.items():
                layer[name][rows].copy_(t)
        del saved
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = self.model(ids, GraphBatch(self.pool, first_slot, lens), last_only=True)
        return _Captured(graph, ids, lens, logits)
