"""Document ids and texts on disk: `docs.jsonl` plus a byte-offset array for random access.

A plain, greppable format (one JSON object per line, never pickle); `docs.offsets.npy` holds
n+1 int64 byte offsets so any document is one seek away and the file stays memory-mapped
rather than loaded: texts do not count against the serving process's private memory.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

from plait.retrievers.corpus import Document

DOCS_FILE = "docs.jsonl"
OFFSETS_FILE = "docs.offsets.npy"


class DocStoreWriter:
    """Appends documents; `close()` writes the offsets."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._file = open(directory / DOCS_FILE, "wb")
        self._offsets = [0]

    def add(self, doc: Document) -> None:
        line = json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}, ensure_ascii=False)
        data = line.encode("utf-8") + b"\n"
        self._file.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def close(self) -> None:
        self._file.close()
        np.save(self.directory / OFFSETS_FILE, np.asarray(self._offsets, dtype=np.int64))


class DocStore:
    """Read-only, thread-safe access to the documents of an opened index."""

    def __init__(self, directory: Path, in_memory: bool = False):
        self.offsets = np.load(directory / OFFSETS_FILE, mmap_mode=None if in_memory else "r")
        with open(directory / DOCS_FILE, "rb") as f:
            if in_memory:
                self._data: bytes | mmap.mmap = f.read()
            elif self.offsets[-1] == 0:
                self._data = b""
            else:
                self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, index: int) -> Document:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        row = json.loads(self._data[start:end])
        return Document(row["id"], row["title"], row["text"])

    def ids(self) -> list[str]:
        """All document ids in index order (read once, then cached; ids are small)."""
        if self._ids is None:
            self._ids = [self.get(i).id for i in range(len(self))]
        return self._ids
