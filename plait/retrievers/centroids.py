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

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from plait.backends.kernels import cpu_retrieval
from plait.retrievers.maxsim import segment_max, token_rows


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
        self.codes = codes
        self.ivf_docs = ivf_docs
        self.ivf_offsets = ivf_offsets
        self.doc_offsets = doc_offsets
        self.num_docs = len(doc_offsets) - 1

    @cached_property
    def _centroids_t(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.centroids, dtype=np.float32))

    @cached_property
    def _packed(self) -> torch.Tensor:
        return cpu_retrieval.pack_centroids(self.centroids)

    def scores(self, queries: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each query's (query tokens x centroids) scores, from one product for all of them:
        the centroid matrix (6 MB for SciFact's 4096) is read once per batch, not per query.
        By the C product where it runs (centroids in 64s: 0.6 against PyTorch's 0.8-1.0 ms a
        SciFact query; see `cpu_centroids.c`), else by PyTorch."""
        if not queries:
            return []
        lib = cpu_retrieval.library()
        tokens = np.concatenate(queries).astype(np.float32, copy=False)
        if lib is not None and len(self.centroids) % cpu_retrieval.CENTROID_PANEL == 0:
            product = cpu_retrieval.centroid_scores(lib, tokens, self._packed)
        else:
            with torch.inference_mode():
                product = torch.from_numpy(tokens) @ self._centroids_t.T
        return list(product.split([len(q) for q in queries]))

    def candidates(self, qc: torch.Tensor, n: int, nprobe: int = 4, refine_factor: int = 4) -> np.ndarray:
        """Indices of up to `n` documents most likely to have a high MaxSim with the query whose
        centroid scores (`scores`) are `qc`: by the C stage where it runs (`cpu_centroids.c`,
        0.3 against 1.5 ms a SciFact query; the same scores, and documents scored the same as
        the last one kept picked by index), else by `candidates_numpy`."""
        lib = cpu_retrieval.library()
        if lib is not None and 0 < len(qc) <= cpu_retrieval.MAX_QUERY_TOKENS:
            ivf = (self.ivf_docs, self.ivf_offsets)
            return cpu_retrieval.centroid_candidates(
                lib, qc, n, nprobe, refine_factor, ivf, self.codes, self.doc_offsets
            )
        return self.candidates_numpy(qc, n, nprobe, refine_factor)

    def candidates_numpy(
        self, qc: torch.Tensor, n: int, nprobe: int = 4, refine_factor: int = 4
    ) -> np.ndarray:
        """`candidates` in torch and numpy, the C stage's reference."""
        with torch.inference_mode():
            probes = torch.topk(qc, min(nprobe, qc.shape[1]), dim=1)
        approx = self.probe_scores(probes.values.numpy(), probes.indices.numpy())
        found = np.flatnonzero(approx)
        if len(found) == 0:
            return found
        shortlist = _top(found, approx[found], n * refine_factor)
        if len(shortlist) <= n:
            return shortlist
        refined = self.centroid_interaction(qc, shortlist)
        return _top(shortlist, refined, n)

    def probe_scores(self, scores: np.ndarray, probes: np.ndarray) -> np.ndarray:
        """Per document, the sum over query tokens of the best of the token's probed centroids
        (`probes`, with their `scores`: query tokens x nprobe) that the document has a token in,
        0 for none. All tokens' posting lists are read in one pass, without a Python loop."""
        rows, lengths = token_rows(self.ivf_offsets, probes.ravel())
        docs = self.ivf_docs[rows]
        score = np.repeat(scores.ravel(), lengths)
        # Group the postings by (query token, document), best score first; keep each group's first.
        pair = np.repeat(np.arange(probes.size) // probes.shape[1], lengths) * self.num_docs + docs
        order = np.lexsort((-score, pair))
        first = np.ones(len(order), dtype=bool)
        first[1:] = pair[order[1:]] != pair[order[:-1]]
        best = order[first]
        approx = np.zeros(self.num_docs, dtype=np.float32)
        # Unbuffered and in the order given, query token after query token: each document's
        # float32 sum is added up in the order the token-by-token loop it replaces used.
        np.add.at(approx, docs[best], score[best])
        return approx

    def centroid_interaction(self, qc: torch.Tensor, docs: np.ndarray) -> np.ndarray:
        """MaxSim with each document token replaced by its centroid (codes read from the map)."""
        rows, lengths = token_rows(self.doc_offsets, docs)
        # One gather of the centroid scores' columns: (query tokens, document tokens).
        sim = qc.index_select(1, torch.from_numpy(self.codes[rows].astype(np.int64)))
        return segment_max(sim.numpy(), lengths).sum(axis=0)


def _top(items: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    if len(items) <= n:
        return items[np.argsort(-scores, kind="stable")]
    part = np.argpartition(-scores, n - 1)[:n]
    return items[part[np.argsort(-scores[part], kind="stable")]]
