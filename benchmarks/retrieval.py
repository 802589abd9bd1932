"""ColBERT-serve benchmark on SciFact (BEIR format, public split in ../shared/data/scifact).

    python benchmarks/retrieval.py                       # build if needed, then everything below
    python benchmarks/retrieval.py --tune                # choose fusion/candidate defaults on TRAIN qrels

Reports, on the public *test* qrels (200 queries):
- quality: nDCG@10 and Recall@100 for BM25 alone, late interaction alone, hybrid; whether the
  C hybrid stage gives its numpy path's hits for every SciFact query (train and test);
- build time (from the manifest when the index already exists);
- query latency p50/p95 with 1 and 16 concurrent clients (threads sharing one opened index),
  for BM25 alone and for the late/hybrid pipelines, and the hybrid/BM25 ratio;
- memory of a serving process (a fresh subprocess that opens the index and answers queries):
  RssAnon (private) and the Rss of each mapped index file from /proc/self/smaps, against the
  index bytes on disk - for the memory-mapped index and for the in-memory peer (same files
  read into RAM). RssAnon is reported relative to a baseline taken after the encoder is
  loaded and before the index is opened (torch + the model are not the index).
- the same quality/latency with bf16 storage (`--bf16`, converted from the fp16 index);
- peers in the same run: the PyTorch path (the C kernels off, as `PLAIT_CPU_RETRIEVAL=0`
  gives), MaxSim in fp32 (`maxsim_dtype="float32"`), searches on the callers' own threads,
  bf16 queries on PyTorch.

Benchmarks print ratios against a peer measured in the same run; they are not tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from plait.backends.kernels import cpu_retrieval  # noqa: E402
from plait.retrievers.colbert_serve import ColBERTServe  # noqa: E402
from plait.retrievers.evaluation import load_qrels, load_queries, ndcg_at_k, recall_at_k, subset  # noqa: E402
from plait.retrievers.searcher import SearchParams  # noqa: E402


@contextlib.contextmanager
def pytorch_only():
    """Retrieval's C kernels off while inside (the PyTorch peer), back on after."""
    os.environ[cpu_retrieval.ENV] = "0"
    cpu_retrieval.reset()
    try:
        yield
    finally:
        del os.environ[cpu_retrieval.ENV]
        cpu_retrieval.reset()


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) if xs else float("nan")


# ------------------------------------------------------------------------------- quality
def evaluate(rm: ColBERTServe, queries, qrels, stage: str, params: SearchParams | None = None, k: int = 100):
    run = {}
    for start in range(0, len(queries), 16):
        batch = queries[start : start + 16]
        for (qid, _), passages in zip(batch, rm.search_batch([t for _, t in batch], k, stage, params)):
            run[qid] = [(p.id, p.score) for p in passages]
    return ndcg_at_k(run, qrels, 10), recall_at_k(run, qrels, 100)


def hybrid_paths_agree(rm: ColBERTServe, texts: list[str], k: int = 10) -> int:
    """How many of `texts` get the same hybrid hits from the C hybrid stage as from its numpy
    path (`hybrid_candidates`, `fuse`, `_top_k`): documents, order and float64 scores, bitwise."""
    from plait.retrievers.fusion import fuse
    from plait.retrievers.searcher import _top_k

    s, p, same = rm.searcher, rm.searcher.params, 0
    for start in range(0, len(texts), 16):
        batch = texts[start : start + 16]
        vectors = s.encoder.encode_queries(batch)
        for text, qv, qc in zip(batch, vectors, s.store.centroids.scores(vectors)):
            cands, sparse, late = s.hybrid_candidates(text, qv, k, p, qc)
            same += s.search_one(text, qv, qc, k, "hybrid", p) == _top_k(
                cands, fuse(sparse, late, p.alpha), k
            )
    return same


def tune(rm: ColBERTServe, queries, qrels) -> None:
    """Grid over alpha and candidate counts on TRAIN; scores are computed once per query."""
    s = rm.searcher
    ids = rm.store.docs.ids()
    widest = SearchParams(bm25_candidates=200, centroid_candidates=100)
    rows = []
    t0 = time.perf_counter()
    for start in range(0, len(queries), 16):
        batch = queries[start : start + 16]
        vecs = s.encoder.encode_queries([t for _, t in batch])
        for (qid, text), qv, qc in zip(batch, vecs, s.store.centroids.scores(vecs)):
            sparse_all = rm.store.bm25.scores(text)
            bm25_rank = np.argsort(-sparse_all, kind="stable")
            cent = s.store.centroids.candidates(qc, 100, widest.nprobe, widest.refine_factor)
            pool = np.unique(np.concatenate([bm25_rank[:200], cent]))
            rows.append((qid, bm25_rank, cent, pool, sparse_all[pool], s.late_scores(qv, pool)))
    print(f"scored {len(rows)} train queries in {time.perf_counter() - t0:.1f}s")
    print(
        f"{'bm25_cands':>10} {'centroid_cands':>14} "
        + " ".join(f"a={a:.1f}" for a in np.arange(0, 1.01, 0.1))
    )
    for n_bm25 in (50, 100, 200):
        for n_cent in (0, 50, 100):
            line = []
            for alpha in np.arange(0, 1.01, 0.1):
                run = {}
                for qid, bm25_rank, cent, pool, sparse, late in rows:
                    keep = np.isin(pool, np.concatenate([bm25_rank[:n_bm25], cent[:n_cent]]))
                    fused = alpha * _z(sparse[keep]) + (1 - alpha) * _z(late[keep])
                    order = np.argsort(-fused, kind="stable")[:100]
                    run[qid] = [(ids[pool[keep][i]], float(fused[i])) for i in order]
                line.append(ndcg_at_k(run, qrels, 10))
            print(f"{n_bm25:>10} {n_cent:>14} " + " ".join(f"{v:.4f}" for v in line))


def _z(x):
    from plait.retrievers.fusion import zscore

    return zscore(x)


# ------------------------------------------------------------------------------- latency
def latency(
    rm: ColBERTServe,
    texts: list[str],
    stage: str,
    clients: int,
    per_client: int,
    k: int = 10,
    answers: dict | None = None,
):
    """Per-query wall times (ms) with `clients` threads each issuing `per_client` queries.

    Every result is recorded in `answers` (query -> [(id, score)]); a query already there
    must get the same ranking (scores within 1e-4), else it counts as a wrong result.
    Returns (times, throughput, wrong results, this process's CPU ms per query). The CPU time
    is the figure that other jobs on the machine skew least: it is the work, not the wait."""
    answers = {} if answers is None else answers
    wrong = 0
    times: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        mine = [texts[(c * per_client + i) % len(texts)] for i in range(per_client)]
        local = []
        barrier.wait()
        got = []
        for q in mine:
            t = time.perf_counter()
            hits = rm(q, k=k, stage=stage)
            local.append((time.perf_counter() - t) * 1000)
            got.append((q, [(p.id, p.score) for p in hits]))
        nonlocal wrong
        with lock:
            times.extend(local)
            for q, ranking in got:
                want = answers.setdefault(q, ranking)
                if [d for d, _ in want] != [d for d, _ in ranking] or not np.allclose(
                    [s for _, s in want], [s for _, s in ranking], atol=1e-4
                ):
                    wrong += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return times, len(times) / wall, wrong, cpu * 1000 / len(times)


def latency_row(
    label: str, rm: ColBERTServe, texts: list[str], stage: str, clients: int, n: int, answers=None
):
    """Measure and print one latency row; returns (p50 ms, queries/s)."""
    load = os.getloadavg()[0]
    times, qps, wrong, cpu = latency(rm, texts, stage, clients, max(1, n // clients), answers=answers)
    spread = f"p50 {percentile(times, 50):8.2f}  p95 {percentile(times, 95):8.2f}"
    work = f"throughput {qps:7.1f} q/s  CPU {cpu:6.2f} ms/query  wrong results {wrong}/{len(times)}"
    print(f"{label:>7} clients={clients:>2}: {spread}  {work}  (load {load:.1f})")
    return statistics.median(times), qps


# ------------------------------------------------------------------------ per-stage costs
def cpu_ms(fn, items) -> float:
    """Median thread CPU time (ms) of `fn(item)` over `items`, after one untimed call."""
    fn(items[0])
    times = []
    for item in items:
        start = time.thread_time()
        fn(item)
        times.append((time.thread_time() - start) * 1000)
    return statistics.median(times)


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype = torch.float32) -> float:
    """One thread's rate on a (m x k) @ (k x n) product whose operands stay in cache."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    with torch.inference_mode():
        seconds = cpu_ms(lambda _: a @ b, list(range(50))) / 1000
    return 2 * m * k * n / seconds / 1e9


def copy_gbps() -> float:
    """One thread's memory bandwidth on a 256 MB copy (read + write), GB/s."""
    src, dst = torch.empty(1 << 26), torch.empty(1 << 26)
    dst.copy_(src)
    return 2 * src.numel() * 4 / (cpu_ms(lambda _: dst.copy_(src), list(range(5))) / 1000) / 1e9


def stage_probe(index: str, queries_file: str, qrels_file: str, n: int) -> None:
    """Run in a fresh subprocess with one torch thread: the CPU time of each stage of one hybrid
    query (medians over `n` SciFact test queries) beside its floor, computed from the work the
    stage must do (FLOPs at this thread's cache-resident GEMM rate; bytes at its copy rate)."""
    torch.set_num_threads(1)
    from plait.retrievers.fusion import fuse
    from plait.retrievers.maxsim import maxsim, maxsim_torch, token_rows
    from plait.retrievers.searcher import _top_k, best_n

    rm = ColBERTServe.open(index, batching=False)
    rm.warmup()
    s, st, enc, p = rm.searcher, rm.store, rm.searcher.encoder, rm.searcher.params
    qrels = load_qrels(qrels_file)
    texts = [t for _, t in subset(load_queries(queries_file), qrels)][:n]
    vectors = [enc.encode_queries([t])[0] for t in texts]
    hybrid = [s.hybrid_candidates(t, v, 10, p) for t, v in zip(texts, vectors)]
    firsts = [s.first_stages(t, v, 10, p, None) for t, v in zip(texts, vectors)]
    lib = cpu_retrieval.library()

    def numpy_rest(sparse: np.ndarray, n: int, centroid_docs: np.ndarray, late: np.ndarray) -> None:
        cands = np.unique(np.concatenate([best_n(sparse, n), centroid_docs])).astype(np.int64)
        _top_k(cands, fuse(sparse[cands], late, p.alpha), 10)

    def c_rest(sparse: np.ndarray, n: int, centroid_docs: np.ndarray, qv: np.ndarray) -> None:
        args = (qv, st.embeddings, st.doc_offsets, s.bf16_products, p.alpha, 10)
        cpu_retrieval.hybrid(lib, sparse, n, centroid_docs, *args)

    rows = [token_rows(st.doc_offsets, cands)[0] for cands, _, _ in hybrid]
    q_tokens = statistics.median(len(v) for v in vectors)
    cand_tokens = statistics.median(len(r) for r in rows)
    cfg = enc.model.config
    # Multiply-adds per token: the layers' six linear maps and attention over the query's tokens.
    per_token = cfg.num_hidden_layers * (
        4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.intermediate_size + 2 * q_tokens * cfg.hidden_size
    )
    encode_flops = 2 * per_token * q_tokens
    batches = [texts[i : i + 16] for i in range(0, len(texts) - 15, 16)]
    seqs = [[enc.query_ids(t)[0] for t in batch] for batch in batches]
    padded = []
    for batch in seqs:
        ids = torch.zeros((len(batch), max(map(len, batch))), dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, row in enumerate(batch):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
        padded.append((ids, mask))
    rate = gemm_gflops(16 * int(q_tokens), cfg.hidden_size, cfg.intermediate_size)
    bf16_rate = gemm_gflops(16 * int(q_tokens), cfg.hidden_size, cfg.intermediate_size, torch.bfloat16)
    torch_enc = enc.with_query_kernel(False)
    bandwidth = copy_gbps()
    flops_ms, bytes_ms, bf16_ms = 1 / (rate * 1e6), 1 / (bandwidth * 1e6), 1 / (bf16_rate * 1e6)
    gather = torch.empty(int(max(len(r) for r in rows)), st.dim, dtype=st.embeddings.dtype)

    def fetch(r: np.ndarray) -> None:
        torch.index_select(st.embeddings, 0, torch.from_numpy(r), out=gather[: len(r)])

    def forward(batch) -> None:
        with torch.inference_mode():
            enc.model(*batch)

    idx = list(range(len(texts)))
    late_flops = 2 * q_tokens * cand_tokens * st.dim
    centroid_flops = 2 * q_tokens * len(st.centroids.centroids) * st.dim
    qcs, centroid_candidates = st.centroids.scores(vectors), st.centroids.candidates
    table_t = torch.from_numpy(np.ascontiguousarray(st.centroids.centroids, dtype=np.float32))

    def torch_product(batch) -> None:
        with torch.inference_mode():
            torch.from_numpy(np.concatenate(batch)) @ table_t.T

    c = "C" if enc.kernel_active else "PyTorch (no C kernel here)"
    table = [
        ("tokenize", cpu_ms(enc.query_ids, texts), None, ""),
        (
            f"encode, alone, {c}",
            cpu_ms(lambda t: enc.encode_queries([t]), texts),
            encode_flops * bf16_ms,
            "bf16",
        ),
        (
            f"encode, in a batch of 16, {c}",
            cpu_ms(enc.encode_queries, batches) / 16,
            encode_flops * bf16_ms,
            "bf16",
        ),
        (
            "encode, alone, PyTorch fp32",
            cpu_ms(lambda t: torch_enc.encode_queries([t]), texts),
            encode_flops * flops_ms,
            "FLOPs",
        ),
        (
            "encode, batch of 16, PyTorch fp32",
            cpu_ms(torch_enc.encode_queries, batches) / 16,
            encode_flops * flops_ms,
            "FLOPs",
        ),
        ("  bare forward, batch of 16", cpu_ms(forward, padded) / 16, encode_flops * flops_ms, "FLOPs"),
        ("BM25 first stage", cpu_ms(st.bm25.scores, texts), None, ""),
        (
            f"centroid product, alone, {c}",
            cpu_ms(lambda v: st.centroids.scores([v]), vectors),
            centroid_flops * flops_ms,
            "FLOPs",
        ),
        (
            f"centroid product, batch of 16, {c}",
            cpu_ms(st.centroids.scores, [vectors[i : i + 16] for i in range(0, len(vectors) - 15, 16)]) / 16,
            centroid_flops * flops_ms,
            "FLOPs",
        ),
        (
            "centroid product, batch of 16, PyTorch",
            cpu_ms(torch_product, [vectors[i : i + 16] for i in range(0, len(vectors) - 15, 16)]) / 16,
            centroid_flops * flops_ms,
            "FLOPs",
        ),
        (
            f"centroid candidates (probe, refine), {'C' if c == 'C' else 'numpy'}",
            cpu_ms(lambda qc: centroid_candidates(qc, p.centroid_candidates, p.nprobe, p.refine_factor), qcs),
            None,
            "",
        ),
        (
            "centroid candidates, numpy",
            cpu_ms(
                lambda qc: st.centroids.candidates_numpy(
                    qc, p.centroid_candidates, p.nprobe, p.refine_factor
                ),
                qcs,
            ),
            None,
            "",
        ),
        (
            "fetch candidates' rows (map)",
            cpu_ms(lambda i: fetch(rows[i]), idx),
            2 * cand_tokens * st.dim * 2 * bytes_ms,
            "bytes read + written",
        ),
        (
            f"MaxSim, {'C, bf16 products' if c == 'C' else c}",
            cpu_ms(lambda i: s.late_scores(vectors[i], hybrid[i][0]), idx),
            late_flops * (bf16_ms if c == "C" else flops_ms),
            "bf16" if c == "C" else "FLOPs",
        ),
        (
            f"MaxSim, {'C, fp32' if c == 'C' else c}",
            cpu_ms(lambda i: maxsim(vectors[i], st.embeddings, st.doc_offsets, hybrid[i][0]), idx),
            late_flops * flops_ms,
            "FLOPs",
        ),
        (
            "MaxSim, PyTorch (fetch, product)",
            cpu_ms(lambda i: maxsim_torch(vectors[i], st.embeddings, st.doc_offsets, hybrid[i][0]), idx),
            late_flops * flops_ms,
            "FLOPs",
        ),
        (
            "BM25 top-n, union, fusion, top-k, numpy",
            cpu_ms(lambda i: numpy_rest(*firsts[i], hybrid[i][2]), idx),
            None,
            "",
        ),
        (
            "MaxSim and those in one C call",
            cpu_ms(lambda i: c_rest(*firsts[i], vectors[i]), idx) if lib is not None else float("nan"),
            None,
            "",
        ),
        ("whole hybrid query, alone", cpu_ms(lambda t: s.search_batch([t], 10, "hybrid"), texts), None, ""),
    ]
    print(
        json.dumps(
            {
                "table": table,
                "q_tokens": q_tokens,
                "cand_tokens": cand_tokens,
                "gflops": rate,
                "bf16_gflops": bf16_rate,
                "gbps": bandwidth,
                "queries": len(texts),
            }
        )
    )
    rm.close()


# -------------------------------------------------------------------------------- memory
def smaps_rss_by_file() -> dict[str, int]:
    """Rss bytes per mapped file path, summed over its mappings."""
    out: dict[str, int] = {}
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                current = parts[5] if len(parts) >= 6 else None
            elif parts[0] == "Rss:" and current:
                out[current] = out.get(current, 0) + int(parts[1]) * 1024
    return out


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_probe(index: str, in_memory: bool, queries_file: str, n: int, threads: int) -> None:
    """Run in a fresh subprocess: baseline after loading the encoder, then open + serve queries.

    Set up like `plait index serve` (same malloc setting), since this stands in for it."""
    torch.set_num_threads(threads)
    from plait.retrievers.memory import return_large_buffers_to_os

    return_large_buffers_to_os()
    from plait.retrievers.encoder import ColBERTEncoder

    enc = ColBERTEncoder.load()
    enc.encode_queries(["warm up the encoder"])
    base = rss_anon()
    rm = ColBERTServe.open(index, encoder=enc, in_memory=in_memory)
    rm.warmup()
    opened = rss_anon()
    texts = [t for _, t in load_queries(queries_file)][:n]
    for q in texts:
        rm(q, k=10, stage="hybrid")
    after = rss_anon()
    files = {str(p.resolve()) for p in rm.store.mapped_files()}
    per_file = {
        Path(k).relative_to(Path(index).resolve()).as_posix(): v
        for k, v in smaps_rss_by_file().items()
        if k in files
    }
    print(
        json.dumps(
            {
                "baseline_rss_anon": base,
                "opened_rss_anon": opened,
                "served_rss_anon": after,
                "mapped_rss": per_file,
                "index_bytes": rm.store.disk_bytes(),
                "queries": len(texts),
            }
        )
    )


def run_probe(index: Path, queries_file: Path, n: int, *flags: str) -> dict:
    """Run this file's `--probe` mode in a fresh process (`flags` pick which); its last line."""
    cmd = [sys.executable, __file__, "--probe", str(index), "--queries-file", str(queries_file)]
    out = subprocess.run(
        [*cmd, "--probe-n", str(n), *flags], capture_output=True, text=True, check=True, env={**os.environ}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- bf16 variant
def to_bf16_copy(src: Path, dst: Path) -> Path:
    """The same index with bf16 embeddings (hard links for the other files, manifest redone)."""
    from plait.retrievers.embeddings import open_matrix, to_storage
    from plait.retrievers.manifest import file_entries, read_manifest, write_manifest

    if (dst / "manifest.json").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    m = read_manifest(src)
    shutil.copytree(
        src, dst, copy_function=os.link, ignore=shutil.ignore_patterns("embeddings.f16", "manifest.json")
    )
    mat = open_matrix(src / "embeddings.f16", m["num_tokens"], m["dim"], "float16")
    with open(dst / "embeddings.bf16", "wb") as f:
        for start in range(0, len(mat), 65536):
            f.write(to_storage(np.asarray(mat[start : start + 65536], np.float32), "bfloat16").tobytes())
    files = [n for n in m["files"] if n != "embeddings.f16"] + ["embeddings.bf16"]
    m["dtype"] = "bfloat16"
    m["files"] = file_entries(dst, files)
    write_manifest(dst, m)
    return dst


# ---------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--index", default=str(ROOT / ".plait" / "bench" / "scifact"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tune", action="store_true", help="grid search on TRAIN qrels and exit")
    ap.add_argument(
        "--query-settings",
        default=None,
        help='with --tune: JSON overrides of the query encoder settings, e.g. {"augment_queries": true}',
    )
    ap.add_argument("--bf16", action="store_true", help="also measure a bf16 copy of the index")
    ap.add_argument(
        "--sections",
        default="quality,stages,latency,bf16,memory",
        help="comma-separated subset of quality,stages,latency,bf16,memory",
    )
    ap.add_argument("--latency-queries", type=int, default=160, help="queries per latency measurement")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--queries-file", help=argparse.SUPPRESS)
    ap.add_argument("--probe-n", type=int, default=200, help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--qrels-file", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.probe and args.qrels_file:
        stage_probe(args.probe, args.queries_file, args.qrels_file, args.probe_n)
        return
    if args.probe:
        memory_probe(args.probe, args.in_memory, args.queries_file, args.probe_n, args.threads)
        return

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    index = Path(args.index)
    if args.rebuild or not (index / "manifest.json").exists():
        from plait.retrievers.build import build_index

        index.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {index} from {data / 'corpus.jsonl'} ...", flush=True)
        build_index(data / "corpus.jsonl", index, overwrite=True)
    manifest = json.loads((index / "manifest.json").read_text())
    rm = ColBERTServe.open(index)
    rm.warmup()
    all_queries = load_queries(data / "queries.jsonl")

    if args.tune:
        if args.query_settings:
            from dataclasses import replace

            enc = rm.searcher.encoder
            rm.searcher.encoder = enc.with_settings(replace(enc.settings, **json.loads(args.query_settings)))
            print("query settings:", rm.searcher.encoder.settings)
        qrels = load_qrels(data / "qrels" / "train.tsv")
        tune(rm, subset(all_queries, qrels), qrels)
        return

    qrels = load_qrels(data / "qrels" / "test.tsv")
    test_queries = subset(all_queries, qrels)
    disk = sum(e["bytes"] for e in manifest["files"].values())
    emb_bytes = manifest["files"][f"embeddings.{'f16' if manifest['dtype'] == 'float16' else 'bf16'}"][
        "bytes"
    ]
    print(
        f"\n== index: {manifest['num_docs']} docs, {manifest['num_tokens']} tokens, dim {manifest['dim']} "
        f"{manifest['dtype']}, {manifest['num_centroids']} centroids; {disk / 1e6:.1f} MB on disk "
        f"(embeddings {emb_bytes / 1e6:.1f} MB); build {manifest['build_seconds']:.1f}s "
        f"on {args.threads} threads"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        "(shared machine: other jobs skew latency)"
    )

    sections = set(args.sections.split(","))
    if "quality" in sections:
        print(f"\n== quality on SciFact test ({len(test_queries)} queries with qrels)")
        quality = {}
        for stage in ("bm25", "late", "hybrid"):
            t = time.perf_counter()
            quality[stage] = evaluate(rm, test_queries, qrels, stage)
            print(
                f"{stage:>7}: nDCG@10 {quality[stage][0]:.4f}  Recall@100 {quality[stage][1]:.4f}  "
                f"({time.perf_counter() - t:.1f}s)"
            )
        print(f"hybrid/bm25 nDCG@10 ratio {quality['hybrid'][0] / quality['bm25'][0]:.3f}")
        print(f"C kernels: {'on' if rm.searcher.encoder.kernel_active else 'off'}")
        if cpu_retrieval.library() is not None:
            every = [t for _, t in all_queries]
            print(
                f"C hybrid stage against its numpy path: the same top-10 hits, scores bitwise, for "
                f"{hybrid_paths_agree(rm, every)} of {len(every)} queries"
            )
        with pytorch_only():
            peers = [("PyTorch fp32", ColBERTServe.open(index, query_dtype="float32"))]
        peers.append(("fp32 MaxSim", ColBERTServe.open(index, maxsim_dtype="float32")))
        peers.append(("bf16 queries", ColBERTServe.open(index, query_dtype="bfloat16")))
        for label, peer in peers:
            for stage in ("late", "hybrid"):
                with pytorch_only() if label == "PyTorch fp32" else contextlib.nullcontext():
                    n10, r100 = evaluate(peer, test_queries, qrels, stage)
                same = (f"{n10:.4f}", f"{r100:.4f}") == tuple(f"{v:.4f}" for v in quality[stage])
                print(
                    f"{stage:>7}, {label}: nDCG@10 {n10:.4f}  Recall@100 {r100:.4f}  "
                    f"({'the same' if same else 'NOT the same'} to 4 decimals)"
                )
            peer.close()

    texts = [t for _, t in test_queries]
    if "stages" in sections:
        load = os.getloadavg()[0]
        r = run_probe(index, data / "queries.jsonl", 64, "--qrels-file", str(data / "qrels" / "test.tsv"))
        print(
            f"\n== one hybrid query, stage by stage: CPU ms on one thread (medians of {r['queries']} test "
            f"queries; median {r['q_tokens']:.0f} query tokens, {r['cand_tokens']:.0f} candidate tokens) "
            f"beside the floor: the stage's FLOPs at {r['gflops']:.0f} GFLOP/s (this thread's fp32 GEMM "
            f"with operands in cache; 'bf16': at {r['bf16_gflops']:.0f} GFLOP/s, its bf16 GEMM) or its "
            f"bytes at {r['gbps']:.1f} GB/s (this thread's copy); "
            f"load {load:.1f} -> {os.getloadavg()[0]:.1f}"
        )
        for name, ms, floor, basis in r["table"]:
            shown = f"floor {floor:6.2f} ms ({basis})" if floor is not None else ""
            print(f"  {name:<38} {ms:7.2f} ms   {shown}")

    lat: dict = {}
    if "latency" in sections or "bf16" in sections:
        print(
            f"\n== latency (ms, k=10, {args.latency_queries} queries per row, threads share one index; "
            f"CPU = this process's CPU time per query)"
        )
        for stage in ("bm25", "late", "hybrid"):
            answers: dict = {}  # the 1-client run's answers are the reference for the 16-client run
            for clients in (1, 16):
                lat[(stage, clients)] = latency_row(
                    stage, rm, texts, stage, clients, args.latency_queries, answers
                )
        for clients in (1, 16):
            print(
                f"hybrid/bm25 p50 ratio at {clients} client(s): "
                f"{lat[('hybrid', clients)][0] / lat[('bm25', clients)][0]:.1f}x"
            )
        p50, qps = lat[("hybrid", 16)]
        print(
            f"goal at 16 clients, hybrid p50 <= 50 ms and >= 150 q/s: p50 {p50:.1f} ms, {qps:.1f} q/s "
            f"({'met' if p50 <= 50 and qps >= 150 else 'not met'}); 16 clients that each wait for "
            f"their answer keep 16 queries in flight, so latency ~ 16 / throughput: a 50 ms p50 "
            f"needs ~320 q/s, {1000 * (os.cpu_count() or 1) / 320:.1f} ms of CPU per query on "
            f"{os.cpu_count()} cores"
        )
        print(
            "peers: PyTorch alone (C kernels off), MaxSim in fp32 (C), the searches on the callers' own "
            "threads (no worker threads), bf16 queries on PyTorch"
        )
        for label, peer in (
            ("PyTorch", ColBERTServe.open(index, query_dtype="float32")),
            ("fp32 MS", ColBERTServe.open(index, maxsim_dtype="float32")),
            ("callers", ColBERTServe.open(index, batching=False)),
            ("bf16 q", ColBERTServe.open(index, query_dtype="bfloat16")),
        ):
            answers = {}
            for clients in (1, 16):
                with pytorch_only() if label == "PyTorch" else contextlib.nullcontext():
                    latency_row(label, peer, texts, "hybrid", clients, args.latency_queries, answers)
            peer.close()

    if args.bf16 and "bf16" in sections:
        bf = to_bf16_copy(index, index.parent / (index.name + "-bf16"))
        rmb = ColBERTServe.open(bf)
        rmb.warmup()
        print("\n== bf16 storage (same index, embeddings converted)")
        for stage in ("late", "hybrid"):
            n10, r100 = evaluate(rmb, test_queries, qrels, stage)
            print(f"{stage:>7}: nDCG@10 {n10:.4f}  Recall@100 {r100:.4f}")
        for clients in (1, 16):
            p50, _ = latency_row("hybrid", rmb, texts, "hybrid", clients, args.latency_queries)
            print(f"{'':>7} p50 vs bm25 {p50 / lat[('bm25', clients)][0]:.1f}x")
        rmb.close()
    rm.close()
    if "memory" not in sections:
        return

    print("\n== serving-process memory (fresh subprocess; 200 hybrid queries after open)")
    qfile = data / "queries.jsonl"
    results = {}
    for name, in_memory in (("mmap", False), ("in-memory peer", True)):
        r = run_probe(
            index, qfile, 200, "--threads", str(args.threads), *(["--in-memory"] if in_memory else [])
        )
        results[name] = r
        anon = r["served_rss_anon"] - r["baseline_rss_anon"]
        mapped = sum(r["mapped_rss"].values())
        top = sorted(r["mapped_rss"].items(), key=lambda kv: -kv[1])[:4]
        print(
            f"{name:>15}: RssAnon over baseline {anon / 1e6:8.1f} MB ({anon / r['index_bytes']:.1%} of index)"
            f"  | mapped index Rss {mapped / 1e6:7.1f} MB ({mapped / r['index_bytes']:.1%})"
            f"  | baseline RssAnon (torch+encoder) {r['baseline_rss_anon'] / 1e6:.0f} MB"
        )
        if top:
            print(" " * 17 + "largest mapped: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in top))
    a = results["mmap"]["served_rss_anon"] - results["mmap"]["baseline_rss_anon"]
    b = results["in-memory peer"]["served_rss_anon"] - results["in-memory peer"]["baseline_rss_anon"]
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(
        f"private memory, mmap vs in-memory peer: {a / 1e6:.1f} MB vs {b / 1e6:.1f} MB "
        f"({1 - a / max(b, 1):.1%} less)"
    )


if __name__ == "__main__":
    main()
