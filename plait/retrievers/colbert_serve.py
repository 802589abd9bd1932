"""`ColBERTServe`: the public retriever - open an index once, call it from anywhere.

    rm = ColBERTServe.open("idx/scifact")
    rm("white matter development", k=5)        # [Passage(pid=..., id=..., score=..., text=...)]
    dspy.configure(rm=rm)                       # dspy.Retrieve reads each passage's .long_text

Passages carry the keys the `dspy.ColBERTv2` HTTP protocol uses (`text`, `long_text`, `pid`,
`score`) plus the corpus `id`, `title` and `rank`, with attribute access like DSPy's dotdict.
In process a passage's text is what was indexed, "Title Body"; over HTTP (`colbertv2_topk`)
it is "Title | Body", the convention of the ColBERTv2 servers DSPy's tutorials query.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plait.backends.runtime.cpu_threads import set_own_thread_count, usable_cores
from plait.retrievers.batcher import MicroBatcher
from plait.retrievers.encoder import ColBERTEncoder, EncoderSettings, dtype_named
from plait.retrievers.errors import IndexFormatError
from plait.retrievers.searcher import STAGES, Hit, Searcher, SearchParams, check_request
from plait.retrievers.store import IndexStore
from plait.retrievers.versions import version_dir


class Passage(dict):
    """A search hit: a dict with attribute access (`p.long_text`, `p["pid"]`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def load_index_encoder(
    store: IndexStore, encoder: ColBERTEncoder | str | Path | None = None
) -> ColBERTEncoder:
    """The encoder an index was built with, configured with the index's settings and projection."""
    info = store.encoder_info
    if not isinstance(encoder, ColBERTEncoder):
        encoder = ColBERTEncoder.load(encoder if encoder is not None else info.get("path"))
    if encoder.name != info["name"]:
        raise IndexFormatError(
            f"index {store.path} was built with encoder {info['name']}, but {encoder.name} was given; "
            "queries must be encoded by the same weights as the documents"
        )
    settings = EncoderSettings.from_json(info.get("settings", {}))
    if store.projection is not None:
        encoder = ColBERTEncoder(encoder.model, encoder.tokenizer, settings, encoder.name, store.projection)
    else:
        encoder = encoder.with_settings(settings)
    if encoder.dim != store.dim:
        raise IndexFormatError(f"index {store.path} has dim {store.dim}, its encoder produces {encoder.dim}")
    return encoder.with_query_map(store.query_map)


def query_encoder(encoder: ColBERTEncoder, query_dtype: str) -> ColBERTEncoder:
    """The encoder that serves queries. "auto": the C encoder (`bert_cpu`: bf16 products, fp32
    otherwise, 2.3 ms a SciFact query on one Zen 4 core alone or batched, against PyTorch fp32's
    5.3 batched and 11 alone; the same nDCG@10 / Recall@100 to 4 decimals, and a query's answer
    does not depend on its batch), or PyTorch in float32 where it cannot run. "float32" /
    "bfloat16": PyTorch in that dtype (`encoder.QUERY_DTYPES`: bf16's answers depend on the batch)."""
    if query_dtype == "auto":
        return encoder.with_dtype(torch.float32).with_query_kernel()
    return encoder.with_dtype(dtype_named(query_dtype)).with_query_kernel(False)


def _one_torch_thread() -> None:
    """Run this thread's torch ops on this thread alone (the process's default is left as is)."""
    set_own_thread_count(1)


MAXSIM_DTYPES = ("auto", "float32")


@dataclass(frozen=True)
class _Request:
    query: str
    k: int
    stage: str
    params: SearchParams | None


class ColBERTServe:
    """A DSPy-compatible retriever over a memory-mapped ColBERT-serve index. Thread-safe.

    With `batching` (the default), every query that needs the encoder is searched by one of
    `workers` threads (default: one per usable core), each running torch on one thread of its
    own: concurrent callers' queries share encoder forwards, and however many callers there
    are, no more threads compute than cores - several callers each running torch ops start
    an OpenMP team each, and on a busy machine a team waits at every barrier for a member the
    OS has descheduled. BM25-only searches need no torch and run on the caller's thread.
    """

    def __init__(
        self,
        store: IndexStore,
        encoder: ColBERTEncoder,
        params: SearchParams | None = None,
        stage: str = "hybrid",
        batching: bool = True,
        workers: int | None = None,
        query_dtype: str = "auto",
        maxsim_dtype: str = "auto",
    ):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        if maxsim_dtype not in MAXSIM_DTYPES:
            raise ValueError(f"maxsim_dtype must be one of {MAXSIM_DTYPES}")
        self.store = store
        self.searcher = Searcher(
            store, query_encoder(encoder, query_dtype), params, bf16_products=maxsim_dtype == "auto"
        )
        self.stage = stage
        self._batcher: MicroBatcher[_Request, list[Hit]] | None = None
        if batching:
            self._batcher = MicroBatcher(
                self._search_requests,
                name="plait-search",
                workers=workers or usable_cores(),
                setup=_one_torch_thread,
            )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        version: int | None = None,
        encoder: ColBERTEncoder | str | Path | None = None,
        verify: bool = False,
        in_memory: bool = False,
        params: SearchParams | None = None,
        stage: str = "hybrid",
        batching: bool = True,
        workers: int | None = None,
        query_dtype: str = "auto",
        maxsim_dtype: str = "auto",
    ) -> ColBERTServe:
        """Open an index directory (checks sizes; `verify=True` also checks every sha256).

        `version`: which version of the index (see `versions`); None opens the newest.

        `in_memory=True` reads the files into RAM instead of mapping them.
        `batching` searches on `workers` threads that share encoder forwards between concurrent
        callers (see the class); without it each call searches on its caller's thread.
        `query_dtype`: "auto" encodes queries with the C encoder where it runs, else in float32;
        "float32" and "bfloat16" on PyTorch (see `query_encoder`).
        `maxsim_dtype`: "auto" scores MaxSim on bf16 products where the C kernel runs (1.9x
        the fp32 rate; SciFact's nDCG@10 and Recall@100 the same to every printed decimal), else
        in fp32; "float32" always in fp32 (see `maxsim.maxsim`).
        """
        store = IndexStore(version_dir(path, version), verify=verify, in_memory=in_memory)
        encoder = load_index_encoder(store, encoder)
        return cls(store, encoder, params, stage, batching, workers, query_dtype, maxsim_dtype)

    @property
    def num_docs(self) -> int:
        return self.store.num_docs

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

    def warmup(self) -> None:
        """Run one query through every stage (compiles the BM25 scorer, touches the encoder)."""
        self.store.bm25.warmup()
        for stage in STAGES:
            self.search_hits(["warmup"], k=1, stage=stage)

    def _search_requests(self, requests: list[_Request]) -> Iterator[list[Hit]]:
        """A worker's batch: one encoder forward and one centroid product for all its queries,
        then each search, handed back as soon as it is done."""
        s = self.searcher
        vectors = s.encoder.encode_queries([r.query for r in requests])
        for r, qv, qc in zip(requests, vectors, s.store.centroids.scores(vectors), strict=True):
            yield s.search_one(r.query, qv, qc, r.k, r.stage, r.params or s.params)

    def search_hits(
        self,
        queries: Sequence[str],
        k: int = 10,
        stage: str | None = None,
        params: SearchParams | None = None,
    ) -> list[list[Hit]]:
        stage = stage or self.stage
        queries = list(queries)
        for q in queries:
            check_request(q, k, stage)
        if stage == "bm25" or self._batcher is None:
            return self.searcher.search_batch(queries, k, stage, params)
        return self._batcher.submit_many([_Request(q, k, stage, params) for q in queries])

    def passage(self, hit: Hit, rank: int, *, titled: bool = False) -> Passage:
        """The hit as a passage; its text is what was indexed ("Title Body"), or with `titled`
        the "Title | Body" of the ColBERTv2 protocol."""
        doc = self.store.docs.get(hit.doc)
        text = doc.titled_text if titled else doc.full_text
        return Passage(
            pid=hit.doc, id=doc.id, title=doc.title, text=text, long_text=text, score=hit.score, rank=rank
        )

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = 10,
        stage: str | None = None,
        params: SearchParams | None = None,
    ) -> list[list[Passage]]:
        """Top-k passages for each query; the queries share one encoder forward pass."""
        return [
            [self.passage(h, r) for r, h in enumerate(hits, 1)]
            for hits in self.search_hits(queries, k, stage, params)
        ]

    def colbertv2_topk(self, query: str, k: int = 10, stage: str | None = None) -> list[dict[str, Any]]:
        """The `topk` list of a `dspy.ColBERTv2` answer: passages whose `text` and `long_text`
        are "Title | Body", as the ColBERTv2 servers of DSPy's tutorials send them."""
        hits = self.search_hits([query], k, stage)[0]
        return [dict(self.passage(h, r, titled=True)) for r, h in enumerate(hits, 1)]

    def __call__(
        self, query: str | Sequence[str], k: int = 5, stage: str | None = None, **kwargs: Any
    ) -> list[Passage] | list[list[Passage]]:
        """`rm(query, k)` -> passages; a list of queries gives a list of passage lists.

        Extra keyword arguments DSPy may pass (e.g. `by_prob`) are accepted and ignored.
        """
        if isinstance(query, str):
            return self.search_batch([query], k, stage)[0]
        return self.search_batch(list(query), k, stage)

    forward = __call__
