"""Opening an index directory: verify the manifest, then memory-map every array.

`IndexStore` holds only read-only views, so one opened store is shared by every thread.
With `in_memory=True` the same files are read into RAM instead (the "peer" the benchmark
compares the mapped index against); search results are identical either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from plait.retrievers import embeddings as emb
from plait.retrievers.centroids import CentroidStage
from plait.retrievers.docstore import DocStore
from plait.retrievers.errors import IndexCorruptError
from plait.retrievers.lexical import BM25Stage
from plait.retrievers.manifest import check_files, read_manifest


class IndexStore:
    def __init__(self, path: str | Path, verify: bool = False, in_memory: bool = False):
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        check_files(self.path, self.manifest, verify=verify)
        m = self.manifest
        try:
            self.num_docs = int(m["num_docs"])
            self.num_tokens = int(m["num_tokens"])
            self.dim = int(m["dim"])
            self.dtype = str(m["dtype"])
            self.encoder_info: dict[str, Any] = m["encoder"]
            bm25_info = m["bm25"]
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptError(f"{self.path}/manifest.json lacks a required field: {exc}") from exc
        if self.dtype not in emb.DTYPES:
            raise IndexCorruptError(f"{self.path}: unknown embedding dtype {self.dtype!r}")
        self.in_memory = in_memory
        mode = None if in_memory else "r"
        try:
            self.doc_offsets = np.load(self.path / "doc_offsets.npy", mmap_mode=mode)
            self.matrix = emb.open_matrix(
                self.path / emb.file_name(self.dtype), self.num_tokens, self.dim, self.dtype, in_memory
            )
            self.docs = DocStore(self.path, in_memory=in_memory)
            centroids = np.load(self.path / "centroids.npy")
            codes = np.load(self.path / "codes.npy", mmap_mode=mode)
            ivf_docs = np.load(self.path / "ivf_docs.npy", mmap_mode=mode)
            ivf_offsets = np.load(self.path / "ivf_offsets.npy")
            projection_file = self.encoder_info.get("projection")
            self.projection = np.load(self.path / projection_file) if projection_file else None
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"cannot read index {self.path}: {exc}") from exc
        self._check_shapes(centroids, codes, ivf_offsets)
        self.centroids = CentroidStage(centroids, codes, ivf_docs, ivf_offsets, self.doc_offsets)
        self.bm25 = BM25Stage(self.path, stem=bool(bm25_info.get("stem", True)), in_memory=in_memory)
        if self.bm25.num_docs != self.num_docs:
            raise IndexCorruptError(
                f"{self.path}: BM25 index has {self.bm25.num_docs} docs, manifest {self.num_docs}"
            )

    def _check_shapes(self, centroids: np.ndarray, codes: np.ndarray, ivf_offsets: np.ndarray) -> None:
        problems = []
        if self.doc_offsets.shape != (self.num_docs + 1,) or int(self.doc_offsets[-1]) != self.num_tokens:
            problems.append("doc_offsets.npy does not match the document/token counts")
        if len(self.docs) != self.num_docs:
            problems.append("docs.offsets.npy does not match the document count")
        if centroids.ndim != 2 or centroids.shape[1] != self.dim:
            problems.append("centroids.npy has the wrong dimension")
        if codes.shape != (self.num_tokens,):
            problems.append("codes.npy does not match the token count")
        if ivf_offsets.shape != (len(centroids) + 1,):
            problems.append("ivf_offsets.npy does not match the centroid count")
        if problems:
            raise IndexCorruptError(f"index {self.path} is inconsistent: " + "; ".join(problems))

    def doc_tokens(self, index: int) -> np.ndarray:
        """Document `index`'s token embeddings as float32 (for inspection and tests)."""
        start, end = int(self.doc_offsets[index]), int(self.doc_offsets[index + 1])
        return emb.as_float32(self.matrix[start:end], self.dtype)

    def mapped_files(self) -> list[Path]:
        """Every file of the index (what the benchmark looks for in /proc/self/smaps)."""
        return [self.path / name for name in self.manifest["files"]]

    def disk_bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.manifest["files"].values())
