"""Exact late-interaction (MaxSim) scores for candidate documents read from the mapped index.

score(q, d) = sum over query tokens i of max over document tokens j of <q_i, d_j>.

A query's candidates are scored without a Python loop over them: `token_rows` turns the
candidates into the row numbers of their tokens once; each block of up to `block_rows` of those
rows is one gather from the map, one fp16 -> fp32 conversion and one product (query tokens x
dim) @ (dim x block tokens); one reduction per document along contiguous rows ends it. Why
blocks rather than one product over all of a query's ~18k candidate rows (SciFact): a block
converted to fp32 is still in cache when the product reads it, where converting everything
first streams 3x the rows' bytes through memory; and the buffers are each thread's own, reused
from query to query, where a serving process (which returns large buffers to the OS,
`memory.return_large_buffers_to_os`) paid page faults for fresh ones on every query - one-piece
MaxSim took ~40 ms a query there, blocks in reused buffers ~7 ms (SciFact, one core, loaded
machine). Only the candidates' pages of the map are read; a thread's scratch is one block
(4.5 MB at 384 dims), and a query allocates only its (query tokens x candidate tokens) scores.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from plait.backends.kernels import cpu_retrieval

BLOCK_ROWS = 2048


def token_rows(doc_offsets: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, lengths): the row numbers of `docs`' tokens, document after document, and each
    document's token count; `doc_offsets[d]:doc_offsets[d + 1]` are document d's rows."""
    docs = np.asarray(docs, dtype=np.int64)
    starts = np.asarray(doc_offsets[docs], dtype=np.int64)
    lengths = np.asarray(doc_offsets[docs + 1], dtype=np.int64) - starts
    ends = np.cumsum(lengths)
    # Row r of the result is starts[doc] + (r - first result row of doc).
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(len(shift)) + shift, lengths


def segment_max(sim: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(query tokens, documents): each query token's max over each document's tokens, where
    `sim` is (query tokens, document tokens) with `lengths` consecutive columns per document;
    0 for an empty document. (Reducing along rows, each max runs over contiguous memory: ~7x
    faster than the (document tokens, query tokens) layout, whose rows are only as long as the
    query.)"""
    out = np.zeros((len(sim), len(lengths)), dtype=np.float32)
    nonempty = lengths > 0
    if nonempty.any():
        out[:, nonempty] = np.maximum.reduceat(sim, (np.cumsum(lengths) - lengths)[nonempty], axis=1)
    return out


class _Scratch(threading.local):
    """One thread's gather and conversion buffers for a block of rows, reused across queries."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, dtype: torch.dtype, rows: int, dim: int) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.shape[1] != dim or len(buf) < rows:
            buf = self.buffers[dtype] = torch.empty(rows, dim, dtype=dtype)
        return buf[:rows]


_scratch = _Scratch()


def maxsim(
    query: np.ndarray,
    matrix: torch.Tensor,
    doc_offsets: np.ndarray,
    docs: np.ndarray,
    bf16_products: bool = False,
) -> np.ndarray:
    """float32 MaxSim score for each document index in `docs` (in the same order).

    `matrix` is the index's token embeddings as a tensor over the mapped file (`IndexStore.
    embeddings`). fp16 rows are scored by the C MaxSim where it runs (`cpu_maxsim.c`: each
    candidate row read once in place, no gathered copies), in fp32 or, with `bf16_products`,
    on products of bf16-rounded operands (scores move by ~1e-3): 3.8 and 2.0 ms for a SciFact
    hybrid query's ~18k rows on one Zen 4 core, where PyTorch takes ~6.3.
    Elsewhere `maxsim_torch` scores them in fp32; it also scores bf16 rows and queries of
    more than 32 tokens."""
    lib = cpu_retrieval.library()
    q = np.asarray(query)
    if lib is not None and cpu_retrieval.fits_maxsim(matrix, q):
        return cpu_retrieval.maxsim(lib, q, matrix, doc_offsets, docs, bf16=bf16_products)
    return maxsim_torch(query, matrix, doc_offsets, docs)


def maxsim_torch(
    query: np.ndarray,
    matrix: torch.Tensor,
    doc_offsets: np.ndarray,
    docs: np.ndarray,
    block_rows: int = BLOCK_ROWS,
) -> np.ndarray:
    """`maxsim` in PyTorch, the C kernel's reference: fp16 rows are scored in fp32; bf16 rows
    directly in bf16 (the product then rounds to bf16, as CPUs with bf16 dot products compute it)."""
    rows, lengths = token_rows(doc_offsets, docs)
    q = np.ascontiguousarray(query, dtype=np.float32)
    sim = np.empty((len(q), len(rows)), dtype=np.float32)  # (query tokens, candidates' tokens)
    compute = torch.bfloat16 if matrix.dtype == torch.bfloat16 else torch.float32
    index = torch.from_numpy(rows)
    with torch.inference_mode():
        q_t = torch.from_numpy(q).to(compute)
        sim_t = torch.from_numpy(sim)
        for start in range(0, len(rows), block_rows):
            n = min(block_rows, len(rows) - start)
            block = torch.index_select(
                matrix, 0, index[start : start + n], out=_scratch.get(matrix.dtype, n, matrix.shape[1])
            )
            if block.dtype != compute:
                block = _scratch.get(compute, n, matrix.shape[1]).copy_(block)
            sim_t[:, start : start + n] = torch.mm(q_t, block.T)
    return segment_max(sim, lengths).sum(axis=0)
