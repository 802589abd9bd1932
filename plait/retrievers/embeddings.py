"""The token-embedding matrix on disk: one raw row-major file, fp16 or bf16, memory-mapped.

Why a raw file and not .npy: it is written incrementally while the corpus streams through the
encoder, before the total token count is known; shape and dtype live in the manifest.

Why bf16 is offered next to fp16: on CPUs with AVX512-BF16/AMX, torch multiplies bf16
matrices directly, while fp16 rows must first be converted to fp32 and multiplied at fp32's
rate (a block of 2048 candidate rows against a 18-token query, one Zen 4 core: ~0.18 ms in
bf16, ~0.39 ms in fp32 plus ~0.05 ms of conversion). bf16 keeps fp32's range with 8 mantissa
bits; for unit-norm vectors the rounding error (~0.4%) is far below the score gaps that decide
rankings.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

DTYPES = {"float16": "embeddings.f16", "bfloat16": "embeddings.bf16"}
ITEM_BYTES = 2  # bytes per stored element, the same for both dtypes


def file_name(dtype: str) -> str:
    return DTYPES[dtype]


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows -> the on-disk element type (bf16 as its raw 16-bit pattern)."""
    if dtype == "float16":
        return np.asarray(x, dtype=np.float16)
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        .to(torch.bfloat16)
        .view(torch.int16)
        .numpy()
    )


class EmbeddingWriter:
    """Appends each document's token embeddings; remembers the per-document token counts."""

    def __init__(self, path: Path, dim: int, dtype: str):
        self.dim = dim
        self.dtype = dtype
        self.lengths: list[int] = []
        self._file: BinaryIO = open(path, "wb")

    def add(self, doc_embeddings: np.ndarray) -> None:
        assert doc_embeddings.ndim == 2 and doc_embeddings.shape[1] == self.dim
        self._file.write(to_storage(doc_embeddings, self.dtype).tobytes())
        self.lengths.append(len(doc_embeddings))

    def close(self) -> None:
        self._file.close()


def open_matrix(path: Path, num_tokens: int, dim: int, dtype: str, in_memory: bool = False) -> np.ndarray:
    """The (tokens, dim) matrix as a read-only memmap (default) or loaded into RAM (the peer)."""
    np_dtype = np.float16 if dtype == "float16" else np.int16
    if num_tokens == 0:
        return np.zeros((0, dim), dtype=np_dtype)
    if in_memory:
        return np.fromfile(path, dtype=np_dtype).reshape(num_tokens, dim)
    return np.memmap(path, dtype=np_dtype, mode="r", shape=(num_tokens, dim))


def as_float32(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Decode stored rows to float32 (used by k-means and code assignment at build time)."""
    if dtype == "float16":
        return np.asarray(rows, dtype=np.float32)
    return torch.from_numpy(np.array(rows, dtype=np.int16)).view(torch.bfloat16).float().numpy()


def as_tensor(matrix: np.ndarray, dtype: str) -> torch.Tensor:
    """The whole stored matrix as a tensor sharing its memory (the map's pages, never a copy),
    for MaxSim to gather candidates' rows from; bf16 rows are reinterpreted, not converted."""
    with warnings.catch_warnings():
        # A read-only map: torch warns that writing would be undefined; nothing writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(matrix)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
