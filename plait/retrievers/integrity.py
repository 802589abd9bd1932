"""Structural checks of an index's small arrays, run every time an index is opened.

Why: the size check at open catches a truncated copy, but a file rewritten with the same size
(or with its manifest entry re-sealed) would reach search as out-of-range positions - an
IndexError at best, and in numba's BM25 scorer, which does not check bounds, a read outside the
array. So every array that search uses to index another one is checked against what it
indexes: dtype kind, shape, value range, offsets that start at 0, never go backwards and end
where the indexed data ends. Once these hold, no search path can index out of range.

Cost: one pass over the small arrays (offsets, codes, inverted file, BM25 postings), which is
a small fraction of the index; the embedding matrix is never read. Flipped bytes that keep the
structure valid (e.g. inside the embeddings) are what `--verify`'s sha256 check is for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plait.retrievers.errors import IndexCorruptError

_KINDS = {"integer": "iu", "float": "f"}


def corrupt(path: Path, problem: str) -> IndexCorruptError:
    """The error for a structurally wrong index file (raised by the caller)."""
    return IndexCorruptError(f"index file {path} is corrupt: {problem}; rebuild the index")


def check_array(path: Path, array: np.ndarray, kind: str, ndim: int = 1) -> None:
    """`array` has `ndim` dimensions and an element type of `kind` ("integer" or "float")."""
    if array.dtype.kind not in _KINDS[kind]:
        raise corrupt(path, f"its dtype is {array.dtype}, not {kind}")
    if array.ndim != ndim:
        raise corrupt(path, f"it has shape {array.shape}, expected {ndim} dimension(s)")


def check_offsets(path: Path, offsets: np.ndarray, count: int | None, end: int) -> None:
    """`offsets` delimits `count` consecutive ranges (any count if None) covering [0, end)."""
    check_array(path, offsets, "integer")
    if count is not None and len(offsets) != count + 1:
        raise corrupt(path, f"it has {len(offsets)} offsets, expected {count + 1}")
    if len(offsets) == 0:
        raise corrupt(path, "it is empty")
    if int(offsets[0]) != 0 or int(offsets[-1]) != end:
        raise corrupt(path, f"offsets run from {int(offsets[0])} to {int(offsets[-1])}, expected 0 to {end}")
    if np.any(offsets[1:] < offsets[:-1]):
        raise corrupt(path, "its offsets go backwards")


def check_positions(path: Path, positions: np.ndarray, upper: int, ndim: int = 1) -> None:
    """Every value of the integer array `positions` is in [0, upper)."""
    check_array(path, positions, "integer", ndim)
    if positions.size and (int(positions.min()) < 0 or int(positions.max()) >= upper):
        raise corrupt(
            path,
            f"its values span {int(positions.min())}..{int(positions.max())}, outside 0..{upper - 1}",
        )
