"""`plait index tune` on SciFact: synthetic queries from the embedded SmolLM2, no qrels used.

    python benchmarks/index_tune.py --queries 2000          # tune a copy of the built index
    python benchmarks/index_tune.py --queries 2000 --eval-only

Takes the index `benchmarks/retrieval.py` builds (.plait/bench/scifact), tunes a copy of it
made of hard links (.plait/bench/scifact-tuned; the built index is never touched), and
reports, on the public *test* qrels (200 queries), late-interaction and hybrid nDCG@10 and
Recall@100 of version 1 (as built) beside the tuned version, with the time of each stage (from
the tuned version's manifest). A rerun resumes: generated queries and finished stages are
kept in the copy's tune/ folder. Benchmarks are not tests: nothing is asserted.
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
from plait.retrievers.tuning import TuneSettings, tune_index  # noqa: E402
from plait.retrievers.versions import versions  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "scifact"
GOALS = {"late": 0.71, "hybrid": 0.73}


def linked_copy(source: Path, target: Path) -> None:
    """`target` as a copy of the index at `source` made of hard links (no bytes copied)."""
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.relative_to(source).parts[0] not in ("tune", "versions"):
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, out)


def evaluate(index: Path, version: int, queries, qrels) -> dict[str, tuple[float, float]]:
    """(nDCG@10, Recall@100) of late interaction and hybrid, as benchmarks/retrieval.py scores them."""
    rm = ColBERTServe.open(index, version=version, batching=False)
    return {stage: evaluate_stage(rm, queries, qrels, stage) for stage in ("late", "hybrid")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default=str(ROOT / ".plait" / "bench" / "scifact"))
    ap.add_argument("--work", default=str(ROOT / ".plait" / "bench" / "scifact-tuned"))
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the versions already in --work")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    index, work = Path(args.index), Path(args.work)
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

    qrels = load_qrels(DATA / "qrels" / "test.tsv")
    queries = subset(load_queries(DATA / "queries.jsonl"), qrels)
    newest = max(versions(work))
    tuning = read_manifest(versions(work)[newest])["tuning"]
    print(f"SciFact test ({len(qrels)} queries); version {newest} tuned from version 1 with")
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
    before, after = evaluate(work, 1, queries, qrels), evaluate(work, newest, queries, qrels)
    print(f"{'stage':<8}{'nDCG@10 v1':>12}{'tuned':>8}{'R@100 v1':>10}{'tuned':>8}{'goal':>7}")
    for stage in ("late", "hybrid"):
        (n0, r0), (n1, r1) = before[stage], after[stage]
        met = "met" if n1 >= GOALS[stage] else "missed"
        print(f"{stage:<8}{n0:>12.4f}{n1:>8.4f}{r0:>10.4f}{r1:>8.4f}  >= {GOALS[stage]} {met}")
    print(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":
    main()
