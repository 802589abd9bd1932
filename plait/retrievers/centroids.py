"""Centroid candidate generation (PLAID-style), without BM25.

Build time: every token gets the code of its nearest centroid; an inverted file lists, per
centroid, the documents having at least one token with that code.

Search time, two cheap approximations before exact MaxSim:
1. probe: each query token picks its `nprobe` best centroids; a document's score is the sum
   over query tokens of the best probed centroid it contains (0 if none);
2. refine: for the top `refine_factor * n` documents, "centroid interaction" - MaxSim with
   every document token replaced by its centroid, read from the per-token codes.
"""

from __future__ import annotations

import numpy as np
import torch


def build_inverted_file(
    codes: np.ndarray, doc_offsets: np.ndarray, num_centroids: int, block_docs: int = 4096
):
    """(ivf_docs int32, ivf_offsets int64): per centroid, the sorted unique document indices."""
    num_docs = len(doc_offsets) - 1
    pairs: list[np.ndarray] = []
    for start in range(0, num_docs, block_docs):
        end = min(start + block_docs, num_docs)
        lo, hi = int(doc_offsets[start]), int(doc_offsets[end])
        lengths = np.diff(doc_offsets[start : end + 1])
        doc_of_token = np.repeat(np.arange(start, end, dtype=np.int64), lengths)
        key = np.asarray(codes[lo:hi], dtype=np.int64) * num_docs + doc_of_token
        pairs.append(np.unique(key))
    keys = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
    centroid = keys // max(num_docs, 1)
    ivf_docs = (keys % max(num_docs, 1)).astype(np.int32)
    ivf_offsets = np.searchsorted(centroid, np.arange(num_centroids + 1)).astype(np.int64)
    return ivf_docs, ivf_offsets


class CentroidStage:
    """Read-only and thread-safe: every call allocates its own scratch arrays."""

    def __init__(
        self,
        centroids: np.ndarray,
        codes: np.ndarray,
        ivf_docs: np.ndarray,
        ivf_offsets: np.ndarray,
        doc_offsets: np.ndarray,
    ):
        self.centroids = centroids
        self._centroids_t = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
        self.codes = codes
        self.ivf_docs = ivf_docs
        self.ivf_offsets = ivf_offsets
        self.doc_offsets = doc_offsets
        self.num_docs = len(doc_offsets) - 1

    def candidates(self, query: np.ndarray, n: int, nprobe: int = 4, refine_factor: int = 4) -> np.ndarray:
        """Indices of up to `n` documents most likely to have a high MaxSim with `query`."""
        with torch.inference_mode():  # torch's GEMM is faster than numpy's for this shape
            qc = (torch.from_numpy(np.asarray(query, np.float32)) @ self._centroids_t.T).numpy()
        nprobe = min(nprobe, qc.shape[1])
        probes = np.argpartition(-qc, nprobe - 1, axis=1)[:, :nprobe]
        approx = np.zeros(self.num_docs, dtype=np.float32)
        best = np.zeros(self.num_docs, dtype=np.float32)
        for i in range(len(qc)):
            cs = probes[i][np.argsort(qc[i, probes[i]])]  # ascending: the best centroid writes last
            touched = []
            for c in cs:
                docs = self.ivf_docs[self.ivf_offsets[c] : self.ivf_offsets[c + 1]]
                best[docs] = qc[i, c]
                touched.append(docs)
            if touched:
                hit = np.concatenate(touched)
                approx[hit] += best[hit]
                best[hit] = 0.0
        found = np.flatnonzero(approx)
        if len(found) == 0:
            return found
        shortlist = _top(found, approx[found], n * refine_factor)
        if len(shortlist) <= n:
            return shortlist
        refined = self.centroid_interaction(qc, shortlist)
        return _top(shortlist, refined, n)

    def centroid_interaction(self, qc: np.ndarray, docs: np.ndarray) -> np.ndarray:
        """MaxSim with each document token replaced by its centroid (codes read from the map)."""
        starts, ends = self.doc_offsets[docs], self.doc_offsets[docs + 1]
        codes = np.concatenate([self.codes[s:e] for s, e in zip(starts, ends)])
        sim = qc[:, codes]  # (query tokens, gathered tokens)
        bounds = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
        return np.maximum.reduceat(sim, bounds, axis=1).sum(axis=0)


def _top(items: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    if len(items) <= n:
        return items[np.argsort(-scores, kind="stable")]
    part = np.argpartition(-scores, n - 1)[:n]
    return items[part[np.argsort(-scores[part], kind="stable")]]
