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
from plait.retrievers.docstore import OFFSETS_FILE, DocStore
from plait.retrievers.errors import IndexCorruptError
from plait.retrievers.integrity import check_array, check_offsets, check_positions, corrupt
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
            self.encoder_info: dict[str, Any] = dict(m["encoder"])
            bm25_info = dict(m["bm25"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptError(f"{self.path}/manifest.json lacks a required field: {exc}") from exc
        if self.dtype not in emb.DTYPES:
            raise IndexCorruptError(f"{self.path}: unknown embedding dtype {self.dtype!r}")
        if self.num_docs < 1 or self.num_tokens < 0 or self.dim < 1:
            raise IndexCorruptError(f"{self.path}/manifest.json has impossible document/token/dim counts")
        self.in_memory = in_memory
        mode = None if in_memory else "r"
        matrix_file = self.path / emb.file_name(self.dtype)
        projection_file = self._listed_file("projection")
        query_map_file = self._listed_file("query_map")
        try:
            matrix_bytes, expected_bytes = (
                matrix_file.stat().st_size,
                self.num_tokens * self.dim * emb.ITEM_BYTES,
            )
            if matrix_bytes != expected_bytes:
                raise corrupt(matrix_file, f"it has {matrix_bytes} bytes, expected {expected_bytes}")
            self.doc_offsets = np.load(self.path / "doc_offsets.npy", mmap_mode=mode)
            self.matrix = emb.open_matrix(matrix_file, self.num_tokens, self.dim, self.dtype, in_memory)
            self.docs = DocStore(self.path, in_memory=in_memory)
            centroids = np.load(self.path / "centroids.npy")
            codes = np.load(self.path / "codes.npy", mmap_mode=mode)
            ivf_docs = np.load(self.path / "ivf_docs.npy", mmap_mode=mode)
            ivf_offsets = np.load(self.path / "ivf_offsets.npy")
            self.projection = np.load(self.path / projection_file) if projection_file else None
            self.query_map = np.load(self.path / query_map_file) if query_map_file else None
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"cannot read index {self.path}: {exc}") from exc
        self._check_structure(centroids, codes, ivf_docs, ivf_offsets)
        # Plain ndarray views of the same pages: a search indexes these a few times, and each
        # np.memmap slice or view runs memmap's Python hooks.
        self.doc_offsets, codes, ivf_docs = map(np.asarray, (self.doc_offsets, codes, ivf_docs))
        self.embeddings = emb.as_tensor(self.matrix, self.dtype)  # MaxSim's view of the same pages
        self.centroids = CentroidStage(centroids, codes, ivf_docs, ivf_offsets, self.doc_offsets)
        self.bm25 = BM25Stage(self.path, stem=bool(bm25_info.get("stem", True)), in_memory=in_memory)
        if self.bm25.num_docs != self.num_docs:
            raise IndexCorruptError(
                f"{self.path}: BM25 index has {self.bm25.num_docs} docs, manifest {self.num_docs}"
            )

    def _listed_file(self, key: str) -> str | None:
        """The file the manifest's encoder entry names under `key` (None: no such file); it
        must be one the manifest lists, so its size was checked like every other file's."""
        name = self.encoder_info.get(key)
        if name is not None and (not isinstance(name, str) or name not in self.manifest["files"]):
            raise IndexCorruptError(f"{self.path}/manifest.json names a {key} file it does not list")
        return name

    def _check_structure(
        self, centroids: np.ndarray, codes: np.ndarray, ivf_docs: np.ndarray, ivf_offsets: np.ndarray
    ) -> None:
        """Every array search indexes with agrees with what it indexes (see `integrity`)."""
        path = self.path
        check_offsets(path / "doc_offsets.npy", self.doc_offsets, self.num_docs, self.num_tokens)
        if len(self.docs) != self.num_docs:
            raise corrupt(path / OFFSETS_FILE, f"it lists {len(self.docs)} documents, not {self.num_docs}")
        check_array(path / "centroids.npy", centroids, "float", ndim=2)
        if len(centroids) == 0 or centroids.shape[1] != self.dim:
            raise corrupt(
                path / "centroids.npy", f"it has shape {centroids.shape}, expected (>0, {self.dim})"
            )
        check_positions(path / "codes.npy", codes, len(centroids))
        if len(codes) != self.num_tokens:
            raise corrupt(path / "codes.npy", f"it has {len(codes)} codes for {self.num_tokens} tokens")
        check_offsets(path / "ivf_offsets.npy", ivf_offsets, len(centroids), len(ivf_docs))
        check_positions(path / "ivf_docs.npy", ivf_docs, self.num_docs)
        if self.projection is not None:
            file = path / str(self.encoder_info["projection"])
            check_array(file, self.projection, "float", ndim=2)
            expected = (self.dim, int(self.encoder_info.get("hidden_size", -1)))
            if self.projection.shape != expected:
                raise corrupt(file, f"it has shape {self.projection.shape}, expected {expected}")
        if self.query_map is not None:
            file = path / str(self.encoder_info["query_map"])
            check_array(file, self.query_map, "float", ndim=2)
            if self.query_map.shape != (self.dim, self.dim):
                raise corrupt(file, f"it has shape {self.query_map.shape}, expected {(self.dim, self.dim)}")

    def doc_tokens(self, index: int) -> np.ndarray:
        """Document `index`'s token embeddings as float32 (for inspection and tests)."""
        start, end = int(self.doc_offsets[index]), int(self.doc_offsets[index + 1])
        return emb.as_float32(self.matrix[start:end], self.dtype)

    def mapped_files(self) -> list[Path]:
        """Every file of the index (what the benchmark looks for in /proc/self/smaps)."""
        return [self.path / name for name in self.manifest["files"]]

    def disk_bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.manifest["files"].values())
