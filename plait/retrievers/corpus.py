"""Reading a corpus JSONL file one row at a time, with errors that name the line.

Rows look like BEIR's: `{"_id" | "id": ..., "title"?: ..., "text": ...}`. Rows are streamed, so
indexing never holds the corpus in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plait.retrievers.errors import CorpusError


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """What both stages index: the title, then the body (BEIR's convention for dense models)."""
        return f"{self.title} {self.text}" if self.title else self.text

    @property
    def titled_text(self) -> str:
        """'Title | Body', the passage text ColBERTv2 servers answer with (DSPy's wiki17 index
        stores it so): programs written for them split on " | " to get the title back."""
        return f"{self.title} | {self.text}" if self.title else self.text


def parse_row(row: object, where: str) -> Document:
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    doc_id = row.get("_id", row.get("id"))
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
        raise CorpusError(f"{where}: row has no '_id' or 'id'")
    if not isinstance(doc_id, str | int):
        raise CorpusError(f"{where}: id must be a string or an integer, got {type(doc_id).__name__}")
    text = row.get("text")
    if not isinstance(text, str):
        raise CorpusError(f"{where}: row {doc_id!r} has no string 'text'")
    title = row.get("title") or ""
    if not isinstance(title, str):
        raise CorpusError(f"{where}: row {doc_id!r} has a non-string 'title'")
    if not (title.strip() or text.strip()):
        raise CorpusError(f"{where}: row {doc_id!r} has an empty title and text")
    return Document(str(doc_id), title, text)


def count_documents(path: str | Path) -> int | None:
    """How many documents a corpus file holds (its non-blank lines), counted before a build so
    its progress has a total; None when the file cannot be read (the build says why)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def iter_corpus(path: str | Path) -> Iterator[Document]:
    """Yield documents from a JSONL file; blank lines are skipped, ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist")
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{where}: invalid JSON ({exc.msg})") from exc
            doc = parse_row(row, where)
            if doc.id in seen:
                raise CorpusError(f"{where}: duplicate document id {doc.id!r}")
            seen.add(doc.id)
            yield doc
