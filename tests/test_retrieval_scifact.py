"""Integration: a 300-document SciFact subset, built from ../shared/data/scifact, searched end to end.

The subset holds every document judged relevant for the first 100 public test queries plus
the first other corpus documents up to 300, so every one of those queries has its answers in
the index. (The full-corpus figures are benchmarks/retrieval.py's job.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plait.retrievers import ColBERTServe, build_index
from plait.retrievers.evaluation import load_qrels, load_queries, ndcg_at_k, recall_at_k, subset

torch.set_num_threads(min(2, torch.get_num_threads()))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "corpus.jsonl").exists(), reason="SciFact data not present"),
]


@pytest.fixture(scope="module")
def scifact(tmp_path_factory):
    qrels = load_qrels(DATA / "qrels" / "test.tsv")
    qrels = {q: qrels[q] for q in sorted(qrels, key=int)[:100]}
    wanted = {d for rels in qrels.values() for d in rels}
    rows, fill = [], []
    with open(DATA / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            (rows if row["_id"] in wanted else fill).append(row)
    rows += fill[: max(0, 300 - len(rows))]
    root = tmp_path_factory.mktemp("scifact")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    idx = build_index(corpus, root / "idx")
    rm = ColBERTServe.open(idx, verify=True)
    queries = subset(load_queries(DATA / "queries.jsonl"), qrels)
    yield rm, queries, qrels
    rm.close()


def test_scifact_subset_all_stages(scifact):
    rm, queries, qrels = scifact
    assert rm.num_docs == 300 and len(queries) == 100
    metrics = {}
    for stage in ("bm25", "late", "hybrid"):
        run = {}
        for start in range(0, len(queries), 32):
            batch = queries[start : start + 32]
            for (qid, _), hits in zip(batch, rm.search_batch([t for _, t in batch], 20, stage)):
                run[qid] = [(p.id, p.score) for p in hits]
        metrics[stage] = (ndcg_at_k(run, qrels, 10), recall_at_k(run, qrels, 20))
    # On 300 documents every stage is strong; hybrid must not lose to either of its inputs.
    assert metrics["bm25"][0] > 0.7 and metrics["late"][0] > 0.7, metrics
    assert metrics["hybrid"][0] >= max(metrics["bm25"][0], metrics["late"][0]) - 0.01, metrics
    assert metrics["hybrid"][1] >= 0.9, metrics
