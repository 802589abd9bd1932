"""Hybrid score fusion: S = a * z(sparse) + (1 - a) * z(late) over one query's candidate set.

z-normalising each list over the candidates puts BM25's unbounded scores and MaxSim's
(roughly query-length-scaled) scores on one scale, per query, so one weight `a` works across
queries (ColBERT-serve's fusion; a near 0.3 was its best on MS MARCO).
"""

from __future__ import annotations

import numpy as np

# Chosen on the public SciFact *train* qrels (809 queries) with
# `python benchmarks/retrieval.py --tune`: nDCG@10 over a = 0.0, 0.1, ..., 1.0 with 50 BM25 +
# 50 centroid candidates was 0.713 0.720 0.729 0.729 0.728 0.724 0.719 0.713 0.706 0.697 0.686;
# a plateau over 0.2-0.4, whose middle is also ColBERT-serve's MS MARCO value.
DEFAULT_ALPHA = 0.3


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std; a constant list becomes all zeros rather than NaN."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return x
    std = x.std()
    return np.zeros_like(x) if std < 1e-12 else (x - x.mean()) / std


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def fuse(sparse: np.ndarray, late: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """The fused scores; `cpu_hybrid.c` computes the same float64 arithmetic, bitwise."""
    check_alpha(alpha)
    return alpha * zscore(sparse) + (1.0 - alpha) * zscore(late)
