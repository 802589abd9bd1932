"""`plait index tune` on SciFact or HotPotQA: synthetic queries from the embedded SmolLM2, no qrels used.

    python benchmarks/index_tune.py --queries 2000          # tune a copy of the built index
    python benchmarks/index_tune.py --queries 2000 --eval-only
    python benchmarks/index_tune.py --dataset hotpotqa --queries 500

Takes a built index (SciFact: the one `benchmarks/retrieval.py` builds, .plait/bench/scifact;
HotPotQA: `plait index build ../shared/data/hotpotqa/corpus.jsonl --out .plait/bench/hotpotqa`),
tunes a copy of it made of hard links (<index>-tuned; the built index is never touched), and
reports late-interaction and hybrid quality of version 1 (as built) beside the tuned version,
with the time of each stage (from the tuned version's manifest). SciFact: nDCG@10 and
Recall@100 on the public *test* qrels (200 queries). HotPotQA: nDCG@10 and answer-passage
Recall@10 (the supporting paragraphs among the first 10 hits) of the 1,000 dev questions. A
rerun resumes: generated queries and finished stages are kept in the copy's tune/ folder.
Benchmarks are not tests: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.retrieval import evaluate as evaluate_stage  # noqa: E402
from plait.retrievers.colbert_serve import ColBERTServe  # noqa: E402
from plait.retrievers.evaluation import load_qrels, load_queries, subset  # noqa: E402
from plait.retrievers.manifest import read_manifest  # noqa: E402
from plait.retrievers.query_map import TrainSettings  # noqa: E402
from plait.retrievers.synthetic import read_pairs  # noqa: E402
from plait.retrievers.tuning import WORK_DIR, TuneSettings, tune_index  # noqa: E402
from plait.retrievers.versions import versions  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
GOALS = {"late": 0.71, "hybrid": 0.73}  # SciFact nDCG@10


def linked_copy(source: Path, target: Path) -> None:
    """`target` as a copy of the index at `source` made of hard links (no bytes copied)."""
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.relative_to(source).parts[0] not in ("tune", "versions"):
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, out)


def evaluate(index: Path, version: int, queries, qrels, depth: int) -> dict[str, tuple[float, float]]:
    """(nDCG@10, Recall@min(depth, 100)) of late interaction and hybrid, as
    benchmarks/retrieval.py scores them."""
    rm = ColBERTServe.open(index, version=version, batching=False)
    return {stage: evaluate_stage(rm, queries, qrels, stage, k=depth) for stage in ("late", "hybrid")}


def synthetic_difficulty(index: Path, stage: str = "late") -> tuple[float, float, int]:
    """(MRR@10 of each kept synthetic query's own passage, the share ranked first, queries)
    under version 1's `stage`: what a trainer can learn from the pairs that the index does not
    already do."""
    searcher = ColBERTServe.open(index, version=1, batching=False).searcher
    pairs = read_pairs(index / WORK_DIR / "from-1" / "pairs.jsonl")  # what tuning version 1 kept
    reciprocal = []
    for start in range(0, len(pairs), 16):
        batch = pairs[start : start + 16]
        for pair, hits in zip(batch, searcher.search_batch([p.query for p in batch], 10, stage)):
            ranked = [h.doc for h in hits]
            reciprocal.append(1 / (ranked.index(pair.doc) + 1) if pair.doc in ranked else 0.0)
    first = sum(r == 1.0 for r in reciprocal) / max(len(reciprocal), 1)
    return sum(reciprocal) / max(len(reciprocal), 1), first, len(reciprocal)


def scifact() -> tuple[list[tuple[str, str]], dict[str, dict[str, int]], int]:
    qrels = load_qrels(DATA / "scifact" / "qrels" / "test.tsv")
    return subset(load_queries(DATA / "scifact" / "queries.jsonl"), qrels), qrels, 100


def hotpotqa() -> tuple[list[tuple[str, str]], dict[str, dict[str, int]], int]:
    """Dev questions and their supporting paragraphs (a paragraph is its title and text in
    the question's context; the corpus holds each distinct paragraph once)."""
    ids = {}
    with open(DATA / "hotpotqa" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids[row["title"], row["text"]] = str(row["id"])
    queries, qrels = [], {}
    with open(DATA / "hotpotqa" / "dev.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            titles = {title for title, _ in row["supporting_facts"]}
            paragraphs = {ids[t, "".join(sents)] for t, sents in row["context"] if t in titles}
            queries.append((row["id"], row["question"]))
            qrels[row["id"]] = dict.fromkeys(paragraphs, 1)
    return queries, qrels, 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["scifact", "hotpotqa"], default="scifact")
    ap.add_argument("--index", help="the built index (default .plait/bench/<dataset>)")
    ap.add_argument("--work", help="its tuned copy (default <index>-tuned)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the versions already in --work")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    index = Path(args.index or ROOT / ".plait" / "bench" / args.dataset)
    work = Path(args.work or f"{index}-tuned")
    if not (index / "manifest.json").is_file():
        sys.exit(f"no index at {index}: run benchmarks/retrieval.py first (it builds it)")
    if not work.exists():
        linked_copy(index, work)

    if not args.eval_only:
        import plait
        from plait.pipelines.synthetic_queries import QueryWriter

        writer = QueryWriter(plait.LM("smollm2-135m"), threads=args.concurrency)
        settings = TuneSettings(queries=args.queries, train=TrainSettings(epochs=args.epochs))
        started = time.perf_counter()
        tune_index(work, writer, generator=writer.name, settings=settings, base_version=1)
        print(f"tuned in {time.perf_counter() - started:.0f}s (this run; resumed stages cost ~0)")

    queries, qrels, depth = scifact() if args.dataset == "scifact" else hotpotqa()
    newest = max(versions(work))
    tuning = read_manifest(versions(work)[newest])["tuning"]
    print(f"{args.dataset} ({len(qrels)} queries); version {newest} tuned from version 1 with")
    print(
        f"  {tuning['queries_kept']}/{tuning['queries_generated']} synthetic queries kept "
        f"({tuning['filter']}), generator {tuning['generator']}"
    )
    train = tuning["training"]
    print(
        f"  held-out synthetic loss {train['heldout_loss_before']:.4f} -> "
        f"{' '.join(f'{x:.4f}' for x in train['heldout_loss'])} (epoch {train['best_epoch']} kept), "
        f"{train['steps']} steps"
    )
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in tuning["seconds"].items()))
    print(f"  total {sum(tuning['seconds'].values()) / 60:.1f} min (goal <= 30 min on 2 cores)")
    mrr, first, n = synthetic_difficulty(work)
    print(
        f"  the {n} kept queries under version 1's late stage: MRR@10 of their passage {mrr:.4f}, "
        f"first {first:.1%}"
    )
    before, after = (evaluate(work, v, queries, qrels, depth) for v in (1, newest))
    recall = f"R@{depth} v1"
    print(f"{'stage':<8}{'nDCG@10 v1':>12}{'tuned':>8}{recall:>10}{'tuned':>8}")
    for stage in ("late", "hybrid"):
        (n0, r0), (n1, r1) = before[stage], after[stage]
        goal = ""
        if args.dataset == "scifact":
            goal = f"  goal nDCG@10 >= {GOALS[stage]}: {'met' if n1 >= GOALS[stage] else 'missed'}"
        print(f"{stage:<8}{n0:>12.4f}{n1:>8.4f}{r0:>10.4f}{r1:>8.4f}{goal}")
    print(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":
    main()
