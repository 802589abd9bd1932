"""Spherical k-means in numpy for the centroid candidate stage.

The embeddings are unit vectors and scored by inner product, so centroids are re-normalised
means and points go to the centroid with the largest dot product. Trained on a bounded sample
of token embeddings (never the whole index), in float32 blocks so memory stays small.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def assign(points: np.ndarray, centroids: np.ndarray, block: int = 8192) -> np.ndarray:
    """Index of the nearest (max inner product) centroid for each row of `points`."""
    out = np.empty(len(points), dtype=np.int32)
    for start in range(0, len(points), block):
        chunk = np.asarray(points[start : start + block], dtype=np.float32)
        out[start : start + len(chunk)] = np.argmax(chunk @ centroids.T, axis=1)
    return out


def spherical_kmeans(
    sample: np.ndarray,
    k: int,
    iterations: int = 10,
    seed: int = 0,
    on_iteration: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Return `k` unit-norm centroids (float32, k x dim) fitted to `sample` (n x dim, n >= k).
    `on_iteration(i)` is told when iteration i (from 1) is done: a build's progress."""
    rng = np.random.default_rng(seed)
    sample = np.asarray(sample, dtype=np.float32)
    if len(sample) < k:
        raise ValueError(f"k-means needs at least k={k} points, got {len(sample)}")
    centroids = sample[rng.choice(len(sample), size=k, replace=False)].copy()
    for iteration in range(1, iterations + 1):
        labels = assign(sample, centroids)
        sums = torch.zeros(centroids.shape, dtype=torch.float32)
        sums.index_add_(0, torch.from_numpy(labels).long(), torch.from_numpy(sample))
        sums = sums.numpy()
        counts = np.bincount(labels, minlength=k)
        empty = counts == 0
        # Re-seed empty clusters with random points so every centroid stays useful.
        if empty.any():
            sums[empty] = sample[rng.choice(len(sample), size=int(empty.sum()), replace=False)]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = sums / np.maximum(norms, 1e-12)
        if on_iteration is not None:
            on_iteration(iteration)
    return centroids.astype(np.float32)


def default_num_centroids(num_tokens: int) -> int:
    """A power of two near 4*sqrt(tokens), between 8 and 8192 (PLAID uses ~16*sqrt on GPUs)."""
    target = 4 * np.sqrt(max(num_tokens, 1))
    k = 2 ** int(np.floor(np.log2(max(target, 8))))
    return int(min(max(k, 8), 8192, max(num_tokens, 1)))
