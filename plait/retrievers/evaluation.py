"""Queries, qrels, TREC runs and the two metrics the benchmark reports (nDCG@k, Recall@k).

Formats are BEIR's: queries JSONL `{_id|id, text}`, qrels TSV `query-id corpus-id score` with
a header line (CRLF tolerated), and TREC run lines `qid Q0 docid rank score tag`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from plait.retrievers.errors import CorpusError

Run = dict[str, list[tuple[str, float]]]  # qid -> [(docid, score)] best first
Qrels = dict[str, dict[str, int]]


def load_queries(path: str | Path) -> list[tuple[str, str]]:
    """(qid, text) pairs from a JSONL file (`_id`/`id` + `text`) or a `qid<TAB>text` TSV."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"queries file {path} does not exist")
    out: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if path.suffix == ".tsv":
                qid, sep, text = line.partition("\t")
                if not sep:
                    raise CorpusError(f"{path}:{lineno}: expected 'qid<TAB>text'")
            else:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                qid = row.get("_id", row.get("id")) if isinstance(row, dict) else None
                text = row.get("text") if isinstance(row, dict) else None
                if qid is None or not isinstance(text, str):
                    raise CorpusError(f"{path}:{lineno}: a query row needs '_id' (or 'id') and 'text'")
            if not text.strip():
                raise CorpusError(f"{path}:{lineno}: query {qid!r} is empty")
            out.append((str(qid), text))
    return out


def load_qrels(path: str | Path) -> Qrels:
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.strip().split("\t")
            if len(parts) != 3 or parts[0] == "query-id":
                continue
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return qrels


def write_trec(run: Mapping[str, list[tuple[str, float]]], path: str | Path, tag: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for qid, hits in run.items():
            for rank, (docid, score) in enumerate(hits, 1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n")


def ndcg_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean nDCG@k over the queries in `qrels` (graded gains, log2 discount, as in BEIR/trec_eval)."""
    scores = []
    for qid, rels in qrels.items():
        hits = run.get(qid, [])[:k]
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, (d, _) in enumerate(hits))
        ideal = sorted(rels.values(), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        scores.append(dcg / idcg if idcg > 0 else 0.0)
    return sum(scores) / max(len(scores), 1)


def recall_at_k(run: Run, qrels: Qrels, k: int = 100) -> float:
    scores = []
    for qid, rels in qrels.items():
        relevant = {d for d, g in rels.items() if g > 0}
        if not relevant:
            continue
        got = {d for d, _ in run.get(qid, [])[:k]}
        scores.append(len(relevant & got) / len(relevant))
    return sum(scores) / max(len(scores), 1)


def subset(queries: Iterable[tuple[str, str]], qrels: Qrels) -> list[tuple[str, str]]:
    """The queries that have judgments."""
    return [(qid, text) for qid, text in queries if qid in qrels]
