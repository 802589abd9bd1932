"""ColBERT-serve index: build, round-trip, exact rankings, MaxSim, corruption, concurrency, CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.errors import PlaitError
from plait.retrievers import (
    BadQueryError,
    ColBERTServe,
    CorpusError,
    IndexCorruptError,
    IndexExistsError,
    IndexFormatError,
    IndexNotFoundError,
    build_index,
)
from plait.retrievers.commands import add_commands
from plait.retrievers.encoder import ColBERTEncoder
from plait.retrievers.fusion import fuse, zscore
from plait.retrievers.searcher import SearchParams
from tests.retrieval_fixtures import EXPECTED_TOP1, TINY_CORPUS, brute_force_maxsim, write_jsonl

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def encoder() -> ColBERTEncoder:
    return ColBERTEncoder.load()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "tiny.jsonl", TINY_CORPUS)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, corpus_file, encoder) -> Path:
    # chunk_size=3 forces several streamed chunks even on the tiny corpus.
    return build_index(corpus_file, tmp_path_factory.mktemp("idx") / "tiny", encoder=encoder, chunk_size=3)


@pytest.fixture(scope="module")
def rm(index_dir, encoder) -> ColBERTServe:
    r = ColBERTServe.open(index_dir, encoder=encoder)
    yield r
    r.close()


def _copy_index(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ rankings
@pytest.mark.parametrize("stage", ["bm25", "late", "hybrid"])
def test_exact_top1_on_tiny_corpus(rm, stage):
    for query, want in EXPECTED_TOP1.items():
        hits = rm(query, k=3, stage=stage)
        assert hits[0].id == want, (stage, query, [h.id for h in hits])
        assert [h.rank for h in hits] == [1, 2, 3]
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_passages_have_dspy_fields(rm):
    p = rm("who wrote the tragedy Hamlet", k=1)[0]
    assert (
        p.long_text == p.text == "Hamlet Hamlet is a tragedy written by William Shakespeare around 1600. "
        "The prince of Denmark seeks revenge on his uncle."
    )
    assert p["pid"] == 0 and p.id == "hamlet" and p.title == "Hamlet" and isinstance(p.score, float)


def test_batched_queries_equal_single_queries(rm):
    queries = list(EXPECTED_TOP1)
    batched = rm(queries, k=4)
    for q, got in zip(queries, batched):
        single = rm(q, k=4)
        assert [p.id for p in got] == [p.id for p in single]
        np.testing.assert_allclose([p.score for p in got], [p.score for p in single], atol=1e-5)


def test_hybrid_is_the_fusion_of_bm25_and_maxsim(rm):
    """Hybrid scores are exactly a*z(BM25) + (1-a)*z(MaxSim) over the candidate set."""
    s = rm.searcher
    q = "white matter development in newborns"
    qv = s.encoder.encode_queries([q])[0]
    for alpha in (0.0, 0.3, 1.0):
        params = SearchParams(alpha=alpha)
        cands, sparse, late = s.hybrid_candidates(q, qv, 8, params)
        want = fuse(sparse, late, alpha)
        hits = rm.search_hits([q], k=8, stage="hybrid", params=params)[0]
        got = {h.doc: h.score for h in hits}
        for d, w in zip(cands, want):
            if d in got:
                assert got[d] == pytest.approx(w, abs=1e-6)
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0])), [-1.2247449, 0.0, 1.2247449], atol=1e-6)
    assert zscore(np.array([2.0, 2.0])).tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------- MaxSim
def test_maxsim_matches_brute_force(rm, encoder):
    """fp32 MaxSim from the mapped fp16 file == in-memory float64 MaxSim over the encoder's
    output; the searcher's (bf16 products where the C kernel runs) within 2e-2 of it."""
    from plait.retrievers.maxsim import maxsim, maxsim_torch

    texts = [(r.get("title", "") + " " + r["text"]).strip() for r in TINY_CORPUS]
    docs_fp32 = encoder.encode_documents(texts)
    stored = [rm.store.doc_tokens(i) for i in range(len(TINY_CORPUS))]
    all_docs = np.arange(len(TINY_CORPUS))
    s = rm.store
    for query in EXPECTED_TOP1:
        qv = encoder.encode_queries([query])[0]
        got = maxsim(qv, s.embeddings, s.doc_offsets, all_docs)
        # exact w.r.t. the stored (fp16-rounded) vectors ...
        np.testing.assert_allclose(got, brute_force_maxsim(qv, stored), atol=1e-4)
        # ... and within fp16 rounding of the full-precision encoder output.
        np.testing.assert_allclose(got, brute_force_maxsim(qv, docs_fp32), atol=1e-2)
        np.testing.assert_allclose(rm.searcher.late_scores(qv, all_docs), got, atol=2e-2)
        # Candidate order and block size do not matter.
        perm = all_docs[::-1].copy()
        np.testing.assert_allclose(
            maxsim_torch(qv, s.embeddings, s.doc_offsets, perm, block_rows=7), got[perm], atol=1e-5
        )


def test_late_stage_equals_exhaustive_maxsim_ranking(rm):
    """On a corpus this small the centroid stage finds every document that matters."""
    all_docs = np.arange(rm.num_docs)
    for query in EXPECTED_TOP1:
        qv = rm.searcher.encoder.encode_queries([query])[0]
        scores = rm.searcher.late_scores(qv, all_docs)
        want = [TINY_CORPUS[i].get("_id", str(TINY_CORPUS[i].get("id"))) for i in np.argsort(-scores)[:3]]
        assert [p.id for p in rm(query, k=3, stage="late")] == want


# ---------------------------------------------------------------------------- round trip
def test_index_round_trip(index_dir, rm, encoder):
    m = json.loads((index_dir / "manifest.json").read_text())
    assert m["format"] == "plait-colbert-serve" and m["format_version"] == 1
    assert m["num_docs"] == len(TINY_CORPUS) and m["dim"] == 384 and m["dtype"] == "float16"
    assert m["encoder"]["name"] == encoder.name
    assert set(m["files"]) >= {
        "embeddings.f16",
        "doc_offsets.npy",
        "docs.jsonl",
        "centroids.npy",
        "codes.npy",
        "bm25/vocab.index.json",
    }
    assert all(len(e["sha256"]) == 64 for e in m["files"].values())
    assert not any(p.name.startswith(".") for p in index_dir.parent.iterdir())  # no leftover build dir
    # Ids and texts come back as written (int ids become strings).
    assert rm.store.docs.ids() == ["hamlet", "photo", "python", "eiffel", "5", "volcano", "bees", "insulin"]
    assert rm.store.docs.get(3).title == "" and rm.store.docs.get(3).text == TINY_CORPUS[3]["text"]
    # Stored token embeddings are the encoder's, rounded to fp16.
    texts = [(r.get("title", "") + " " + r["text"]).strip() for r in TINY_CORPUS]
    for i, want in enumerate(encoder.encode_documents(texts)):
        np.testing.assert_allclose(rm.store.doc_tokens(i), want, atol=2e-3)
    assert isinstance(rm.store.matrix, np.memmap)


def test_in_memory_variant_gives_identical_results(index_dir, rm, encoder):
    """Same search path (worker threads), other storage: bit-identical. (Without batching the
    caller's thread computes, with its own torch thread count: equal up to rounding.)"""
    peer = ColBERTServe.open(index_dir, encoder=encoder, in_memory=True)
    assert not isinstance(peer.store.matrix, np.memmap)
    try:
        for q in EXPECTED_TOP1:
            for stage in ("bm25", "late", "hybrid"):
                a, b = rm(q, k=5, stage=stage), peer(q, k=5, stage=stage)
                assert [(p.id, p.score) for p in a] == [(p.id, p.score) for p in b]
    finally:
        peer.close()


def test_bf16_queries_and_callers_threads_rank_the_same(index_dir, rm, encoder):
    """bf16 query encoding (an option) and searching on the callers' threads (batching off)
    give the same rankings as the default; the option is checked when the index is opened."""
    fast = ColBERTServe.open(index_dir, encoder=encoder, query_dtype="bfloat16")
    direct = ColBERTServe.open(index_dir, encoder=encoder, batching=False)
    try:
        for q, want in EXPECTED_TOP1.items():
            for stage in ("late", "hybrid"):
                ref = rm(q, k=3, stage=stage)
                assert fast(q, k=3, stage=stage)[0].id == ref[0].id == want
                got = direct(q, k=3, stage=stage)
                assert [p.id for p in got] == [p.id for p in ref]
                np.testing.assert_allclose([p.score for p in got], [p.score for p in ref], atol=1e-5)
    finally:
        fast.close()
    with pytest.raises(ValueError, match="query dtype"):
        ColBERTServe.open(index_dir, encoder=encoder, query_dtype="float16")


def test_bfloat16_index_and_saved_projection(tmp_path, corpus_file, encoder):
    """bf16 storage ranks like fp16; a projection is drawn once, saved, and reused at open."""
    idx = build_index(corpus_file, tmp_path / "bf16", encoder=encoder, dtype="bfloat16", projection_dim=64)
    assert (idx / "embeddings.bf16").exists() and (idx / "projection.npy").exists()
    first = ColBERTServe.open(idx, encoder=encoder, batching=False)
    again = ColBERTServe.open(idx, encoder=encoder, batching=False)
    assert first.store.dim == 64 and first.searcher.encoder.dim == 64
    for q, want in EXPECTED_TOP1.items():
        a, b = first(q, k=3), again(q, k=3)
        assert [(p.id, p.score) for p in a] == [(p.id, p.score) for p in b]
        assert a[0].id == want


# ---------------------------------------------------------------------------- corruption
def test_bit_flip_is_caught_by_verify(tmp_path, index_dir, encoder):
    idx = _copy_index(index_dir, tmp_path / "idx")
    ColBERTServe.open(idx, encoder=encoder, verify=True, batching=False)  # intact: fine
    data = bytearray((idx / "embeddings.f16").read_bytes())
    data[100] ^= 0xFF
    (idx / "embeddings.f16").write_bytes(bytes(data))
    ColBERTServe.open(idx, encoder=encoder, batching=False)  # same size: the fast check passes
    with pytest.raises(IndexCorruptError, match=r"embeddings\.f16 fails its sha256"):
        ColBERTServe.open(idx, encoder=encoder, verify=True)


@pytest.mark.parametrize(
    "damage", ["truncate", "delete", "manifest_json", "manifest_version", "no_manifest", "docs_offsets"]
)
def test_damaged_index_raises_a_clear_error(tmp_path, index_dir, encoder, damage):
    idx = _copy_index(index_dir, tmp_path / "idx")
    expected: type[PlaitError] = IndexCorruptError
    if damage == "truncate":
        path = idx / "codes.npy"
        path.write_bytes(path.read_bytes()[:-8])
    elif damage == "delete":
        (idx / "bm25" / "vocab.index.json").unlink()
        expected = IndexNotFoundError
    elif damage == "manifest_json":
        (idx / "manifest.json").write_text("{not json")
    elif damage == "manifest_version":
        m = json.loads((idx / "manifest.json").read_text())
        m["format_version"] = 99
        (idx / "manifest.json").write_text(json.dumps(m))
        expected = IndexFormatError
    elif damage == "no_manifest":
        (idx / "manifest.json").unlink()
        expected = IndexNotFoundError
    elif damage == "docs_offsets":  # consistent size and checksum, inconsistent content
        m = json.loads((idx / "manifest.json").read_text())
        np.save(idx / "doc_offsets.npy", np.arange(len(TINY_CORPUS) + 1, dtype=np.int64))
        from plait.retrievers.manifest import file_entries

        m["files"].update(file_entries(idx, ["doc_offsets.npy"]))
        (idx / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(expected):
        ColBERTServe.open(idx, encoder=encoder, batching=False)


def test_missing_index_and_wrong_encoder(tmp_path, index_dir, encoder):
    with pytest.raises(IndexNotFoundError):
        ColBERTServe.open(tmp_path / "nope")
    other = ColBERTEncoder(encoder.model, encoder.tokenizer, encoder.settings, "other@0")
    with pytest.raises(IndexFormatError, match="built with encoder"):
        ColBERTServe.open(index_dir, encoder=other)


# ------------------------------------------------------------------------------- corpus
@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}], "duplicate document id 'a'"),
        ([{"_id": "a"}], "no string 'text'"),
        ([{"text": "no id"}], "no '_id' or 'id'"),
        ([], "no documents"),
    ],
)
def test_bad_corpus_rows(tmp_path, encoder, rows, match):
    with pytest.raises(CorpusError, match=match):
        build_index(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "idx", encoder=encoder)
    assert not (tmp_path / "idx").exists()


def test_bad_json_line_and_existing_output(tmp_path, corpus_file, index_dir, encoder):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "fine"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid JSON"):
        build_index(bad, tmp_path / "idx", encoder=encoder)
    with pytest.raises(IndexExistsError):
        build_index(corpus_file, index_dir, encoder=encoder)


def test_bad_requests(rm):
    for kwargs in (
        {"query": "", "k": 5},
        {"query": "x", "k": 0},
        {"query": "x", "k": 5000},
        {"query": "x", "k": 5, "stage": "dense"},
    ):
        with pytest.raises(BadQueryError):
            rm(**kwargs)


# ---------------------------------------------------------------------------- concurrency
def test_concurrent_searches_equal_sequential(rm):
    """16 threads hammering one opened index (shared batched encoder) get the sequential answers."""
    queries = [(q, stage) for q in EXPECTED_TOP1 for stage in ("bm25", "late", "hybrid")] * 4
    sequential = {(q, st): rm(q, k=5, stage=st) for q, st in set(queries)}
    start = threading.Barrier(16)

    def run(item):
        q, st = item
        return item, rm(q, k=5, stage=st)

    def worker(chunk):
        start.wait()
        return [run(item) for item in chunk]

    chunks = [queries[i::16] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = [r for chunk in pool.map(worker, chunks) for r in chunk]
    assert len(results) == len(queries)
    for item, got in results:
        want = sequential[item]
        assert [p.id for p in got] == [p.id for p in want], item
        np.testing.assert_allclose([p.score for p in got], [p.score for p in want], atol=1e-5)


# ------------------------------------------------------------------------------------ CLI
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="plait")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_build_search_run_verify(tmp_path, corpus_file, capsys):
    idx = tmp_path / "cli-idx"
    assert _cli(["index", "build", str(corpus_file), "--out", str(idx), "--threads", "2"]) == 0
    assert f"{len(TINY_CORPUS)} docs" in capsys.readouterr().out
    assert _cli(["index", "search", str(idx), "iron tower in Paris", "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].split()[2] == "eiffel"
    queries = write_jsonl(
        tmp_path / "q.jsonl", [{"_id": f"q{i}", "text": q} for i, q in enumerate(EXPECTED_TOP1)]
    )
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text(
        "query-id\tcorpus-id\tscore\r\n"
        + "".join(f"q{i}\t{d}\t1\r\n" for i, d in enumerate(EXPECTED_TOP1.values()))
    )
    run = tmp_path / "run.tsv"
    for stage in ("bm25", "late", "hybrid"):
        assert (
            _cli(
                [
                    "index",
                    "search",
                    str(idx),
                    "--queries",
                    str(queries),
                    "-k",
                    "3",
                    "--stage",
                    stage,
                    "--run-out",
                    str(run),
                    "--qrels",
                    str(qrels),
                ]
            )
            == 0
        )
        assert "nDCG@10 1.0000" in capsys.readouterr().out
        lines = [ln.split() for ln in run.read_text().splitlines()]
        assert len(lines) == 3 * len(EXPECTED_TOP1)
        assert lines[0][:4] == ["q0", "Q0", "hamlet", "1"] and lines[0][5] == f"plait-{stage}"
    assert _cli(["index", "verify", str(idx)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["index", "search", "{idx}"],  # neither query nor --queries
        ["index", "search", "{idx}", "x", "--run-out", "r.tsv"],
        ["index", "search", "{missing}", "x"],
        ["index", "build", "{missing}", "--out", "{missing}"],
        ["index", "verify", "{missing}"],
    ],
)
def test_cli_bad_input_raises_plait_errors(tmp_path, index_dir, argv):
    argv = [a.format(idx=index_dir, missing=tmp_path / "missing") for a in argv]
    with pytest.raises(PlaitError):
        _cli(argv)


def test_bm25_scores_equal_bm25s_for_both_scorers(index_dir):
    """Our numpy column sum (and the numba path) reproduce bm25s's own scoring exactly."""
    import bm25s

    from plait.retrievers.lexical import BM25Stage

    ref = bm25s.BM25.load(str(index_dir / "bm25"), mmap=True, show_progress=False)
    numpy_stage = BM25Stage(index_dir, stem=True, use_numba=False)
    numba_stage = BM25Stage(index_dir, stem=True, use_numba=True)
    for query in [*EXPECTED_TOP1, "hamlet hamlet tragedy", "nothing-matches zzz"]:
        ids = numpy_stage.term_ids(query)
        want = ref.get_scores_from_ids(ids) if len(ids) else np.zeros(len(TINY_CORPUS), np.float32)
        np.testing.assert_allclose(numpy_stage.scores(query), want, rtol=1e-6)
        np.testing.assert_allclose(numba_stage.scores(query), want, rtol=1e-6)
    assert numpy_stage.scores("hamlet").argmax() == 0
