"""The sparse first stage: BM25 over bm25s's CSC score matrix, memory-mapped at search time.

Why our own analyzer and vocabulary instead of `bm25s.Tokenizer`: its query-time path may
update its vocabulary dictionaries, which is not safe with many threads searching one index.
Here the analyzer is a pure function and the vocabulary a read-only dict, so `scores()` can be
called from any number of threads. bm25s does the scoring (index build, `get_scores_from_ids`,
optionally numba-compiled), and saves/loads the matrix as .npy files we open with `mmap=True`.

Build is streamed: term ids are appended to a flat int32 file and fed to bm25s through a
lazy sequence, so the corpus text is never held in memory.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from plait.retrievers.errors import IndexCorruptError

log = logging.getLogger(__name__)

BM25_DIR = "bm25"
_WORD = re.compile(r"(?u)\b\w\w+\b")


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def s_stem(word: str) -> str:
    """Harman's "S" stemmer: conflate English plurals only (cells -> cell, studies -> study).

    A deliberately weak stemmer that needs no dependency; it never over-conflates.
    """
    if len(word) > 3 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


def analyze(text: str, stem: bool = True) -> list[str]:
    """Lowercase, split into words of 2+ characters, drop English stopwords, optionally stem."""
    stop = _stopwords()
    words = [w for w in _WORD.findall(text.lower()) if w not in stop]
    return [s_stem(w) for w in words] if stem else words


class TermWriter:
    """Streams each document's term ids to disk while growing the vocabulary."""

    def __init__(self, path: Path, stem: bool):
        self.path = path
        self.stem = stem
        self.vocab: dict[str, int] = {}
        self.lengths: list[int] = []
        self._file = open(path, "wb")

    def add(self, text: str) -> None:
        ids = [self.vocab.setdefault(t, len(self.vocab)) for t in analyze(text, self.stem)]
        self._file.write(np.asarray(ids, dtype=np.int32).tobytes())
        self.lengths.append(len(ids))

    def close(self) -> None:
        self._file.close()


class _TermSequence(Sequence):
    """Read-only view of the streamed term ids, one Python list per document, as bm25s expects."""

    def __init__(self, path: Path, lengths: list[int]):
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        total = int(self.offsets[-1])
        self.flat = np.memmap(path, dtype=np.int32, mode="r", shape=(total,)) if total else np.zeros(0, np.int32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        return self.flat[self.offsets[i] : self.offsets[i + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            yield self[i]


def build_bm25(terms: TermWriter, out_dir: Path, k1: float, b: float) -> list[str]:
    """Build and save the BM25 matrix; returns the written file names relative to the index."""
    import bm25s

    terms.close()
    seq = _TermSequence(terms.path, terms.lengths)
    vocab = dict(terms.vocab)
    # An always-absent "" term keeps the matrix non-empty for corpora without indexable words.
    vocab.setdefault("", len(vocab))
    model = bm25s.BM25(k1=k1, b=b, method="lucene", backend="numpy")
    model.scores = model.build_index_from_ids(
        unique_token_ids=list(vocab.values()), corpus_token_ids=seq, show_progress=False
    )
    model.vocab_dict = vocab
    target = out_dir / BM25_DIR
    model.save(str(target), show_progress=False)
    del seq
    return [f"{BM25_DIR}/{p.name}" for p in sorted(target.iterdir())]


@functools.cache
def _jit_scorer():
    """bm25s's numba scorer, compiled once per process (not once per opened index)."""
    try:
        from bm25s.scoring import _compute_relevance_from_scores_jit_ready
        from numba import njit
    except ImportError:
        return None
    return njit(_compute_relevance_from_scores_jit_ready)


class BM25Stage:
    """Thread-safe BM25 scoring of a whole corpus for one query."""

    def __init__(self, index_dir: Path, stem: bool, in_memory: bool = False, use_numba: bool = True):
        import bm25s

        self.stem = stem
        try:
            self.model = bm25s.BM25.load(
                str(index_dir / BM25_DIR), mmap=not in_memory, backend="numpy", show_progress=False
            )
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise IndexCorruptError(f"cannot load the BM25 index in {index_dir / BM25_DIR}: {exc}") from exc
        # bm25s keeps a set of every term id for its own tokenizer path; we never use it.
        self.model.unique_token_ids_set = None
        self.vocab: dict[str, int] = self.model.vocab_dict
        self.num_docs = int(self.model.scores["num_docs"])
        self._lock = threading.Lock()
        self._jit = _jit_scorer() if use_numba else None
        self._jit_ready = False

    def warmup(self) -> None:
        """Compile the numba scorer now rather than inside the first real query."""
        if self.vocab:
            self._score(np.asarray([next(iter(self.vocab.values()))], dtype=np.int32))

    def term_ids(self, query: str) -> np.ndarray:
        ids = [self.vocab[t] for t in analyze(query, self.stem) if t in self.vocab]
        return np.asarray(ids, dtype=np.int32)

    def _score(self, ids: np.ndarray) -> np.ndarray:
        s = self.model.scores
        if self._jit is not None:
            if not self._jit_ready:
                with self._lock:  # the first call compiles; let one thread do it
                    out = self._jit(s["data"], s["indptr"], s["indices"], self.num_docs, ids, np.dtype(np.float32))
                    self._jit_ready = True
                    return out
            return self._jit(s["data"], s["indptr"], s["indices"], self.num_docs, ids, np.dtype(np.float32))
        return self.model.get_scores_from_ids(ids)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (float32, zeros if no query term is in the vocabulary)."""
        ids = self.term_ids(query)
        if len(ids) == 0:
            return np.zeros(self.num_docs, dtype=np.float32)
        return np.asarray(self._score(ids), dtype=np.float32)
