"""Document ids and texts on disk: `docs.jsonl` plus a byte-offset array for random access.

A plain, greppable format (one JSON object per line, never pickle); `docs.offsets.npy` holds
n+1 int64 byte offsets so any document is one seek away and the file stays memory-mapped
rather than loaded: texts do not count against the serving process's private memory.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from plait.retrievers.corpus import Document
from plait.retrievers.integrity import check_offsets, corrupt

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
    """Read-only, thread-safe access to the documents of an opened index.

    The offsets are checked at open (they index the text file); the rows themselves are not -
    docs.jsonl can be most of an index - so a damaged row is reported when it is read.
    """

    def __init__(self, directory: Path, in_memory: bool = False):
        self.path = directory / DOCS_FILE
        self.offsets = np.load(directory / OFFSETS_FILE, mmap_mode=None if in_memory else "r")
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            check_offsets(directory / OFFSETS_FILE, self.offsets, None, size)
            self.offsets = np.asarray(self.offsets)  # a plain view: `get` reads two per passage
            if in_memory:
                self._data: bytes | mmap.mmap = f.read()
            elif size == 0:
                self._data = b""  # mmap cannot map an empty file
            else:
                self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, index: int) -> Document:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        try:
            row = json.loads(self._data[start:end])
            return Document(row["id"], row["title"], row["text"])
        except (ValueError, KeyError, TypeError) as exc:  # bad JSON or UTF-8, missing fields
            raise corrupt(self.path, f"document {index} is not a valid row ({type(exc).__name__})") from None

    def ids(self) -> list[str]:
        """All document ids in index order (read once, then cached; ids are small)."""
        if self._ids is None:
            self._ids = [self.get(i).id for i in range(len(self))]
        return self._ids
