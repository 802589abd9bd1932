"""Synthetic training queries for an index: generated for sampled passages, then filtered.

Generation is the slow stage (an LM call per passage), so its output is a JSONL file that
grows as it goes, `{"doc": position, "query": text}` a line, and a rerun continues where the
file ends. The passages are a seeded permutation of the index's documents, so the first N of
a run asking for more queries are the N a smaller run already generated.

Filtering keeps a pair only when the index, as it is, ranks the passage within the top
`keep_rank` hybrid hits for its query (InPars' consistency filter with the retriever as
teacher): a small LM's query that restates nothing of its passage, or echoes the prompt, has
its passage far down the list. The hits above and below the passage are kept as the pair's
hard negatives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from plait.retrievers.errors import SettingsError
from plait.retrievers.searcher import Searcher, SearchParams

QueryWriter = Callable[[Sequence[str]], list[str]]
"""Passages -> one query each (e.g. `plait.pipelines.synthetic_queries.QueryWriter`)."""

#: Hybrid hits looked at per query: the passage must be among the first `keep_rank`, and
#: the others are its hard negatives.
CANDIDATES = 32
#: Queries of a hybrid search batch while filtering (one encoder forward).
FILTER_BATCH = 16


class Counter(Protocol):
    def __call__(self, done: int) -> None: ...


def sample_documents(num_docs: int, n: int, seed: int) -> np.ndarray:
    """The first `n` documents of a seeded permutation (a prefix of the same order for any n)."""
    return np.random.default_rng(seed).permutation(num_docs)[: min(n, num_docs)]


def read_queries(path: Path) -> list[tuple[int, str]]:
    """(document, query) pairs written so far; a line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                pairs.append((int(row["doc"]), str(row["query"])))
            except (ValueError, KeyError, TypeError):
                break  # only the last line can be partial: everything before it was flushed
    return pairs


def generate_queries(
    path: Path,
    docs: np.ndarray,
    passage: Callable[[int], str],
    writer: QueryWriter,
    chunk: int,
    on_done: Counter,
) -> list[tuple[int, str]]:
    """A query for each document of `docs` (positions), written to `path` `chunk` at a time;
    queries already in the file are kept, so a rerun continues. Returns every pair."""
    pairs = read_queries(path)
    if [d for d, _ in pairs] != [int(d) for d in docs[: len(pairs)]]:
        raise SettingsError(
            f"{path} holds queries for other passages (another seed or index); start over with --restart"
        )
    pairs = pairs[: len(docs)]
    _write_lines(path, [_line(doc, query) for doc, query in pairs])  # drops a line cut short
    with open(path, "a", encoding="utf-8") as f:
        on_done(len(pairs))
        for start in range(len(pairs), len(docs), chunk):
            batch = [int(d) for d in docs[start : start + chunk]]
            for doc, query in zip(batch, writer([passage(d) for d in batch]), strict=True):
                f.write(_line(doc, query))
                pairs.append((doc, query))
            f.flush()
            on_done(len(pairs))
    return pairs


def _line(doc: int, query: str) -> str:
    return json.dumps({"doc": doc, "query": query}, ensure_ascii=False) + "\n"


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    """Replace `path` with `lines`, atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)


@dataclass(frozen=True)
class TrainingPair:
    """A kept synthetic query, its passage and the passages ranked near it."""

    query: str
    doc: int
    negatives: tuple[int, ...]
    rank: int  # the passage's hybrid rank (1 = first)
    teacher: tuple[float, ...]  # hybrid scores of the passage, then of each negative


def filter_queries(
    searcher: Searcher,
    pairs: Sequence[tuple[int, str]],
    keep_rank: int,
    on_done: Counter,
    params: SearchParams | None = None,
) -> list[TrainingPair]:
    """The pairs whose passage the hybrid ranks within `keep_rank`, each with the other top
    `CANDIDATES` hits (best first) as its hard negatives."""
    kept = []
    usable = [(d, q) for d, q in pairs if q.strip()]
    for start in range(0, len(usable), FILTER_BATCH):
        batch = usable[start : start + FILTER_BATCH]
        hits = searcher.search_batch([q for _, q in batch], max(CANDIDATES, keep_rank), "hybrid", params)
        for (doc, query), ranked in zip(batch, hits, strict=True):
            order = [h.doc for h in ranked]
            if doc in order[:keep_rank]:
                rank = order.index(doc)
                others = ranked[:rank] + ranked[rank + 1 :]
                teacher = (ranked[rank].score, *(h.score for h in others))
                kept.append(TrainingPair(query, doc, tuple(h.doc for h in others), rank + 1, teacher))
        on_done(min(start + FILTER_BATCH, len(usable)))
    return kept


def write_pairs(path: Path, pairs: Sequence[TrainingPair]) -> None:
    _write_lines(path, [json.dumps(asdict(p)) + "\n" for p in pairs])


def read_pairs(path: Path) -> list[TrainingPair]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [
        TrainingPair(r["query"], r["doc"], tuple(r["negatives"]), r["rank"], tuple(r["teacher"]))
        for r in rows
    ]
