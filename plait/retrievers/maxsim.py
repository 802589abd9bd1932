"""Exact late-interaction (MaxSim) scores for candidate documents read from the mapped index.

score(q, d) = sum over query tokens i of max over document tokens j of <q_i, d_j>.

Candidates' rows are copied out of the memory map in blocks of at most `block_tokens` rows
(8192 x 384 fp32 = 12 MB), so scoring 1,000 long documents never materialises more than that;
only the pages of the candidates are touched, and the small transient blocks keep the serving
process's private memory (RssAnon) low even with many concurrent queries.
"""

from __future__ import annotations

import numpy as np
import torch

from plait.retrievers.embeddings import as_torch


def maxsim(
    query: np.ndarray,
    matrix: np.ndarray,
    doc_offsets: np.ndarray,
    docs: np.ndarray,
    dtype: str,
    block_tokens: int = 8192,
) -> np.ndarray:
    """float32 MaxSim score for each document index in `docs` (in the same order)."""
    docs = np.asarray(docs, dtype=np.int64)
    out = np.empty(len(docs), dtype=np.float32)
    if len(docs) == 0:
        return out
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    if dtype == "bfloat16":
        q = q.to(torch.bfloat16)
    starts = doc_offsets[docs]
    ends = doc_offsets[docs + 1]
    lengths = ends - starts
    i = 0
    while i < len(docs):
        # Take documents until the block is full (always at least one).
        j = i + 1
        total = int(lengths[i])
        while j < len(docs) and total + lengths[j] <= block_tokens:
            total += int(lengths[j])
            j += 1
        rows = np.concatenate([matrix[starts[n] : ends[n]] for n in range(i, j)])
        with torch.inference_mode():
            sim = (as_torch(rows, dtype) @ q.T).float().numpy()  # (tokens, query tokens)
        bounds = np.concatenate([[0], np.cumsum(lengths[i:j])[:-1]])
        out[i:j] = np.maximum.reduceat(sim, bounds, axis=0).sum(axis=1)
        i = j
    return out
