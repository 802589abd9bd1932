"""The sparse first stage: BM25 over bm25s's CSC score matrix, memory-mapped at search time.

Why our own analyzer and vocabulary instead of `bm25s.Tokenizer`: its query-time path may
update its vocabulary dictionaries, which is not safe with many threads searching one index.
Here the analyzer is a pure function and the vocabulary a read-only dict, so `scores()` can be
called from any number of threads. bm25s builds the score matrix (`build_index_from_ids`) and
saves it as .npy files; search memory-maps them and sums the query terms' columns.

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

from plait.backends.kernels import cpu_retrieval
from plait.retrievers.errors import IndexCorruptError
from plait.retrievers.integrity import check_array, check_offsets, check_positions, corrupt

log = logging.getLogger(__name__)

BM25_DIR = "bm25"
_WORD = re.compile(r"(?u)\b\w\w+\b")


STOPWORDS_FILE = "stopwords.json"


def english_stopwords() -> frozenset[str]:
    """bm25s's English list; copied into each index at build so search never imports bm25s."""
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


def analyze(text: str, stopwords: frozenset[str], stem: bool = True) -> list[str]:
    """Lowercase, split into words of 2+ characters, drop stopwords, optionally stem."""
    stop = stopwords
    words = [w for w in _WORD.findall(text.lower()) if w not in stop]
    return [s_stem(w) for w in words] if stem else words


class TermWriter:
    """Streams each document's term ids to disk while growing the vocabulary."""

    def __init__(self, path: Path, stem: bool):
        self.path = path
        self.stem = stem
        self.stopwords = english_stopwords()
        self.vocab: dict[str, int] = {}
        self.lengths: list[int] = []
        self._file = open(path, "wb")

    def add(self, text: str) -> None:
        ids = [self.vocab.setdefault(t, len(self.vocab)) for t in analyze(text, self.stopwords, self.stem)]
        self._file.write(np.asarray(ids, dtype=np.int32).tobytes())
        self.lengths.append(len(ids))

    def close(self) -> None:
        self._file.close()


class _TermSequence(Sequence):
    """Read-only view of the streamed term ids, one Python list per document, as bm25s expects."""

    def __init__(self, path: Path, lengths: list[int]):
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        total = int(self.offsets[-1])
        self.flat = (
            np.memmap(path, dtype=np.int32, mode="r", shape=(total,)) if total else np.zeros(0, np.int32)
        )

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
    (target / STOPWORDS_FILE).write_text(json.dumps(sorted(terms.stopwords)))
    del seq
    return [f"{BM25_DIR}/{p.name}" for p in sorted(target.iterdir())]


# Below this many documents numpy scores as fast as numba (SciFact, 5k docs: 0.22 vs 0.20 ms per
# query), and importing + compiling numba costs ~45 MB of private memory in the serving process.
NUMBA_MIN_DOCS = 100_000


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
    """Thread-safe BM25 scoring of a whole corpus for one query.

    Reads the CSC matrix bm25s saved (data/indices/indptr .npy, memory-mapped) and its
    vocabulary; scoring a query is a sum of the term columns, done here in numpy so that the
    serving process does not import bm25s/numba at all unless the corpus is large enough for
    numba's scorer to pay off (`use_numba=None` decides by `NUMBA_MIN_DOCS`).
    """

    def __init__(self, index_dir: Path, stem: bool, in_memory: bool = False, use_numba: bool | None = None):
        self.stem = stem
        root = index_dir / BM25_DIR
        mode = None if in_memory else "r"
        try:
            params = json.loads((root / "params.index.json").read_text())
            self.vocab: dict[str, int] = json.loads((root / "vocab.index.json").read_text(encoding="utf-8"))
            self.stopwords = frozenset(json.loads((root / STOPWORDS_FILE).read_text(encoding="utf-8")))
            self.data = np.load(root / "data.csc.index.npy", mmap_mode=mode)
            self.indices = np.load(root / "indices.csc.index.npy", mmap_mode=mode)
            self.indptr = np.load(root / "indptr.csc.index.npy", mmap_mode=mode)
            self.num_docs = int(params["num_docs"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexCorruptError(f"cannot load the BM25 index in {root}: {exc}") from exc
        self._check_structure(root)
        # Plain ndarray views of the maps for the C sum (`cpu_retrieval.bm25_scores`); None where
        # the saved dtypes are not the ones it reads.
        csc = (np.asarray(self.data), np.asarray(self.indices), np.asarray(self.indptr))
        fits = [a.dtype == t and a.flags.c_contiguous for a, t in zip(csc, (np.float32, np.int32, np.int64))]
        self._csc = csc if all(fits) else None
        if use_numba is None:
            use_numba = self.num_docs >= NUMBA_MIN_DOCS
        self._jit = _jit_scorer() if use_numba else None
        self._lock = threading.Lock()
        self._jit_ready = False

    def _check_structure(self, root: Path) -> None:
        """The CSC postings and the vocabulary agree (see `integrity`): numba's scorer reads them
        without bounds checks, so an out-of-range id must never reach it."""
        vocab_file = root / "vocab.index.json"
        if not isinstance(self.vocab, dict) or not all(
            type(i) is int and 0 <= i < len(self.vocab) for i in self.vocab.values()
        ):
            raise corrupt(vocab_file, f"it must map each term to an id in 0..{len(self.vocab) - 1}")
        check_array(root / "data.csc.index.npy", self.data, "float")
        check_offsets(root / "indptr.csc.index.npy", self.indptr, len(self.vocab), len(self.data))
        indices_file = root / "indices.csc.index.npy"
        if len(self.indices) != len(self.data):
            raise corrupt(indices_file, f"it has {len(self.indices)} entries, data has {len(self.data)}")
        check_positions(indices_file, self.indices, self.num_docs)

    def warmup(self) -> None:
        """Compile the numba scorer (if used) now rather than inside the first real query."""
        if self.vocab:
            self._score(np.asarray([next(iter(self.vocab.values()))], dtype=np.int32))

    def term_ids(self, query: str) -> np.ndarray:
        ids = [self.vocab[t] for t in analyze(query, self.stopwords, self.stem) if t in self.vocab]
        return np.asarray(ids, dtype=np.int32)

    def _score(self, ids: np.ndarray) -> np.ndarray:
        if self._jit is not None:
            args = (self.data, self.indptr, self.indices, self.num_docs, ids, np.dtype(np.float32))
            if not self._jit_ready:
                with self._lock:  # the first call compiles; let one thread do it
                    out = self._jit(*args)
                    self._jit_ready = True
                    return out
            return self._jit(*args)
        lib = cpu_retrieval.library() if self._csc is not None else None
        if lib is not None:
            return cpu_retrieval.bm25_scores(lib, ids, *self._csc, self.num_docs)
        return self.score_numpy(ids)

    def score_numpy(self, ids: np.ndarray) -> np.ndarray:
        """`_score` in numpy, the C sum's reference."""
        scores = np.zeros(self.num_docs, dtype=np.float32)
        for t in ids:
            start, end = self.indptr[t], self.indptr[t + 1]
            # A term's column lists each document once, so plain fancy-index += is exact.
            scores[self.indices[start:end]] += self.data[start:end]
        return scores

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (float32, zeros if no query term is in the vocabulary)."""
        ids = self.term_ids(query)
        if len(ids) == 0:
            return np.zeros(self.num_docs, dtype=np.float32)
        return np.asarray(self._score(ids), dtype=np.float32)
