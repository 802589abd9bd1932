"""Multi-stage search over one opened index.

Stages (`stage=`):
- "bm25":   BM25 over the whole corpus, top k.
- "late":   centroid candidates -> exact MaxSim from the mapped embeddings, ranked by MaxSim.
- "hybrid": BM25 top-n  union  centroid candidates -> exact MaxSim -> fusion
            a * z(BM25) + (1 - a) * z(MaxSim) over that candidate set; after the first stages,
            one call of the C kernel where it runs (`cpu_hybrid.c`), else numpy, with the same
            hits and scores.

Everything here reads shared, immutable state and allocates per call (MaxSim's reused buffers
are per thread), so many threads may search one `Searcher` concurrently; `search_batch` encodes
all its queries in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from plait.backends.kernels import cpu_retrieval
from plait.retrievers.encoder import ColBERTEncoder
from plait.retrievers.errors import BadQueryError
from plait.retrievers.fusion import DEFAULT_ALPHA, check_alpha, fuse
from plait.retrievers.limits import MAX_K
from plait.retrievers.maxsim import maxsim
from plait.retrievers.store import IndexStore

STAGES = ("bm25", "late", "hybrid")


@dataclass(frozen=True)
class SearchParams:
    """Knobs of the multi-stage pipeline; defaults chosen on SciFact train.

    Train nDCG@10 of hybrid at a=0.3 was 0.727-0.731 for every candidate mix in
    {50,100,200} BM25 x {50,100} centroid (BM25 alone 0.686), so the cheapest mix is the
    default: fewer candidates means less MaxSim work per query. With k > bm25_candidates,
    BM25 contributes k candidates.
    """

    alpha: float = DEFAULT_ALPHA
    bm25_candidates: int = 50
    centroid_candidates: int = 50
    nprobe: int = 4
    refine_factor: int = 4


@dataclass(frozen=True)
class Hit:
    doc: int  # position in the index (ColBERT's "pid")
    score: float


def _top_k(docs: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
    # Sort by score descending, ties by document position: deterministic across runs and threads.
    order = np.lexsort((docs, -np.asarray(scores, dtype=np.float64)))[:k]
    return [Hit(int(docs[i]), float(scores[i])) for i in order]


def best_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the `n` highest `scores` (in no particular order), the lower positions kept
    among equals at the cut, as `cpu_hybrid.c` keeps them. argpartition alone picks among equals
    in an order of its own, and BM25 ties at its n-th score where fewer than n documents hold a
    query term (the rest all score 0) or documents match alike (7 of SciFact's 1,009 queries at
    n = 50)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    cut = -np.partition(-scores, n - 1)[n - 1]
    above = np.flatnonzero(scores > cut)
    return np.concatenate([above, np.flatnonzero(scores == cut)[: n - len(above)]])


def _shown(value: object, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters: error messages travel back to HTTP clients and
    must not echo a megabyte they were sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_request(query: object, k: object, stage: object) -> None:
    if not isinstance(query, str) or not query.strip():
        raise BadQueryError("query must be a non-empty string")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadQueryError(f"k must be an integer between 1 and {MAX_K}, got {_shown(k)}")
    if stage not in STAGES:
        raise BadQueryError(f"stage must be one of {', '.join(STAGES)}, got {_shown(stage)}")


class Searcher:
    def __init__(
        self,
        store: IndexStore,
        encoder: ColBERTEncoder,
        params: SearchParams | None = None,
        bf16_products: bool = False,
    ):
        """`bf16_products`: MaxSim on products of bf16-rounded operands where the C kernel
        runs (`maxsim.maxsim`), else exact fp32."""
        self.store = store
        self.encoder = encoder
        self.params = params or SearchParams()
        self.bf16_products = bf16_products

    def late_scores(self, query_vectors: np.ndarray, docs: np.ndarray) -> np.ndarray:
        return maxsim(query_vectors, self.store.embeddings, self.store.doc_offsets, docs, self.bf16_products)

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = 10,
        stage: str = "hybrid",
        params: SearchParams | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits per query; the queries share one encoder forward and one centroid product."""
        for q in queries:
            check_request(q, k, stage)
        p = params or self.params
        if stage == "bm25":
            return [self._bm25(q, k) for q in queries]
        vectors = self.encoder.encode_queries(list(queries))
        centroid_scores = self.store.centroids.scores(vectors)
        return [
            self.search_one(q, qv, qc, k, stage, p) for q, qv, qc in zip(queries, vectors, centroid_scores)
        ]

    def search_one(
        self, query: str, qv: np.ndarray, qc: torch.Tensor, k: int, stage: str, p: SearchParams
    ) -> list[Hit]:
        """A late or hybrid search for an encoded query (`qv`) and its centroid scores (`qc`)."""
        if stage == "late":
            cands = self.store.centroids.candidates(
                qc, max(k, p.centroid_candidates), p.nprobe, p.refine_factor
            )
            return _top_k(cands, self.late_scores(qv, cands), k)
        check_alpha(p.alpha)
        lib = cpu_retrieval.library()
        if lib is None or not cpu_retrieval.fits_maxsim(self.store.embeddings, qv):
            cands, sparse, late = self.hybrid_candidates(query, qv, k, p, qc)
            return _top_k(cands, fuse(sparse, late, p.alpha), k)
        sparse, n, centroid_docs = self.first_stages(query, qv, k, p, qc)
        st = self.store
        docs, scores = cpu_retrieval.hybrid(
            lib, sparse, n, centroid_docs, qv, st.embeddings, st.doc_offsets, self.bf16_products, p.alpha, k
        )
        return [Hit(d, s) for d, s in zip(docs.tolist(), scores.tolist())]

    def _bm25(self, query: str, k: int) -> list[Hit]:
        scores = self.store.bm25.scores(query)
        top = best_n(scores, min(k, len(scores)))
        return _top_k(top, scores[top], k)

    def first_stages(
        self, query: str, qv: np.ndarray, k: int, p: SearchParams, qc: torch.Tensor | None
    ) -> tuple[np.ndarray, int, np.ndarray]:
        """(every document's BM25 score, how many of the best to keep, the centroid candidates)."""
        sparse_all = self.store.bm25.scores(query)
        n = min(max(k, p.bm25_candidates), len(sparse_all))
        if p.centroid_candidates <= 0:
            return sparse_all, n, np.zeros(0, dtype=np.int64)
        qc = self.store.centroids.scores([qv])[0] if qc is None else qc
        from_centroids = self.store.centroids.candidates(qc, p.centroid_candidates, p.nprobe, p.refine_factor)
        return sparse_all, n, from_centroids

    def hybrid_candidates(
        self, query: str, qv: np.ndarray, k: int, p: SearchParams, qc: torch.Tensor | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate docs, BM25 scores, MaxSim scores) for the fusion stage, in numpy (the C
        hybrid stage's reference); `qc`: the query's centroid scores, when they were computed
        with others' (`CentroidStage.scores`)."""
        sparse_all, n, from_centroids = self.first_stages(query, qv, k, p, qc)
        cands = np.unique(np.concatenate([best_n(sparse_all, n), from_centroids])).astype(np.int64)
        return cands, sparse_all[cands], self.late_scores(qv, cands)
