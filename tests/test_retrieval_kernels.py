"""Retrieval's C kernels (`plait.backends.kernels.cpu_retrieval`) against their PyTorch twins.

The query encoder (`cpu_bert.c`, bf16 products) against `BertModel` in fp32 to a stated
tolerance; MaxSim (`cpu_maxsim.c`, fp32) against `maxsim_torch`; both bitwise independent of
what else is in a batch or a candidate list; and search without the kernels (no compiler,
`PLAIT_CPU_RETRIEVAL=0`) keeps its PyTorch path with the same rankings.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from plait.backends.kernels import cpu_retrieval
from plait.retrievers import ColBERTServe, build_index
from plait.retrievers.bert import BertConfig, BertModel
from plait.retrievers.bert_cpu import fits, kernel_for
from plait.retrievers.centroids import CentroidStage, build_inverted_file
from plait.retrievers.embeddings import as_tensor, to_storage
from plait.retrievers.encoder import ColBERTEncoder, EncoderSettings
from plait.retrievers.fusion import fuse
from plait.retrievers.maxsim import maxsim, maxsim_torch
from plait.retrievers.searcher import Hit, SearchParams, _top_k, best_n
from tests.retrieval_fixtures import TINY_CORPUS, write_jsonl

CAN_BUILD = cpu_retrieval.machine_fits() and shutil.which("gcc") is not None
needs_kernels = pytest.mark.skipif(not CAN_BUILD, reason="no AVX512-BF16 CPU or no C compiler")

QUERIES = [
    "white matter development in infants",
    "vitamin D",
    "the risk of cancer in patients treated with a common drug for diabetes, measured over ten years "
    "of follow-up in a population of several thousand adults",
    "0-dimensional biomaterials show inductive properties.",
    "a",
    "How do antibiotics change the gut microbiome of children?",
]


@pytest.fixture(scope="module")
def encoder() -> ColBERTEncoder:
    return ColBERTEncoder.load()


@pytest.fixture(autouse=True)
def _fresh_library(monkeypatch):
    """Every test decides for itself whether the library loads."""
    monkeypatch.delenv(cpu_retrieval.ENV, raising=False)
    cpu_retrieval.reset()
    yield
    cpu_retrieval.reset()


def _many_queries(n: int) -> list[str]:
    return [f"{QUERIES[i % len(QUERIES)]} {' extra' * (i % 5)}".strip() for i in range(n)]


# ------------------------------------------------------------------------------- encoder
@needs_kernels
def test_c_encoder_matches_pytorch_on_minilm(encoder):
    """bf16 products, fp32 elsewhere: every token embedding within 3e-3 of fp32 PyTorch's
    (measured: 1.5e-3 at most on SciFact's queries), cosine > 0.9999."""
    fast = encoder.with_query_kernel()
    assert fast.kernel_active
    with torch.inference_mode():
        want = encoder.encode_queries(QUERIES)
    got = fast.encode_queries(QUERIES)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=3e-3)
        assert (a * b).sum(axis=1).min() > 0.9999


@needs_kernels
def test_c_encoder_with_masked_query_expansion(encoder):
    """ColBERT's [MASK] expansion: the [MASK]s are encoded but never attended to."""
    settings = EncoderSettings(augment_queries=True, query_marker="[unused0]")
    ref = encoder.with_settings(settings)
    fast = ref.with_query_kernel()
    for a, b in zip(fast.encode_queries(QUERIES), ref.encode_queries(QUERIES), strict=True):
        assert a.shape == (32, 384)
        np.testing.assert_allclose(a, b, atol=3e-3)


@needs_kernels
def test_c_encoder_on_a_random_bert():
    """Other sizes than MiniLM's (4 heads of 16, 2 layers), a projection and a query map."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    assert fits(model) and kernel_for(model) is kernel_for(model)
    ids = [[1, 5, 9, 2], [1, *range(10, 47), 2]]
    present = torch.zeros(2, 39, dtype=torch.bool)
    padded = torch.zeros(2, 39, dtype=torch.long)
    for i, seq in enumerate(ids):
        padded[i, : len(seq)], present[i, : len(seq)] = torch.tensor(seq), True
    with torch.inference_mode():
        want = model(padded, present)
    got = kernel_for(model).forward(ids, [4, 39], normalize=False)
    np.testing.assert_allclose(got[:4], want[0, :4], atol=3e-2)
    np.testing.assert_allclose(got[4:], want[1], atol=3e-2)
    assert not fits(BertModel(BertConfig(50, 48, 1, 3, 128)))  # 48 outputs: not a multiple of 64


@needs_kernels
def test_c_encoder_answer_does_not_depend_on_the_batch(encoder):
    """A query's embedding is bitwise the same alone and in a batch of 16 (any position)."""
    fast = encoder.with_query_kernel()
    queries = _many_queries(16)
    batch = fast.encode_queries(queries)
    for q, b in zip(queries, batch, strict=True):
        assert np.array_equal(fast.encode_queries([q])[0], b)
    shuffled = fast.encode_queries(queries[::-1])
    for a, b in zip(shuffled[::-1], batch, strict=True):
        assert np.array_equal(a, b)


# -------------------------------------------------------------------------------- MaxSim
def _fp16_index(lengths: list[int], dim: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((sum(lengths), dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return as_tensor(to_storage(rows, "float16"), "float16"), np.concatenate([[0], np.cumsum(lengths)])


def _bf16_reference(
    query: np.ndarray, matrix: torch.Tensor, offsets: np.ndarray, docs: np.ndarray
) -> np.ndarray:
    """MaxSim of the bf16-rounded query and rows, in float64: what the bf16 kernel computes,
    less its fp32 sums' rounding."""
    q = torch.from_numpy(query).to(torch.bfloat16).double()
    scores = []
    for d in docs:
        rows = matrix[int(offsets[d]) : int(offsets[d + 1])].to(torch.bfloat16).double()
        scores.append(float((q @ rows.T).max(dim=1).values.sum()) if len(rows) else 0.0)
    return np.array(scores)


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 8, 9, 17, 24, 32])
def test_c_maxsim_matches_pytorch(tokens, bf16):
    """Every query-group count (8-token lanes), rows falling across tiles of 6 and chunks of
    96, an empty document (scores 0): fp32 within 1e-5 of the PyTorch path (fp32 sums in another order);
    bf16 products within 1e-5 of the same operands' MaxSim in float64, and within 2e-2 of fp32."""
    lengths = [5, 1, 0, 9, 3, 12, 2, 7, 40, 150]
    matrix, offsets = _fp16_index(lengths, 64)
    query = np.random.default_rng(tokens).standard_normal((tokens, 64)).astype(np.float32)
    lib = cpu_retrieval.library()
    assert lib is not None
    docs = np.array([3, 2, 8, 6, 9, 0, 5, 1, 4, 7])
    got = cpu_retrieval.maxsim(lib, query, matrix, offsets, docs, bf16=bf16)
    exact = maxsim_torch(query, matrix, offsets, docs)
    if bf16:
        np.testing.assert_allclose(got, _bf16_reference(query, matrix, offsets, docs), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, exact, rtol=0, atol=2e-2 * tokens)
        assert not np.array_equal(got, exact)
    else:
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5)
    assert got[1] == 0.0
    np.testing.assert_array_equal(maxsim(query, matrix, offsets, docs, bf16), got)  # the dispatcher's choice
    assert cpu_retrieval.maxsim(lib, query, matrix, offsets, np.array([], dtype=np.int64)).shape == (0,)


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
def test_c_maxsim_score_does_not_depend_on_the_other_candidates(bf16):
    """Rows of several documents share a tile; a document's score is bitwise the same alone."""
    matrix, offsets = _fp16_index([4, 9, 2, 130, 6, 1], 32, seed=3)
    query = np.random.default_rng(5).standard_normal((11, 32)).astype(np.float32)
    lib = cpu_retrieval.library()
    docs = np.arange(6)
    together = cpu_retrieval.maxsim(lib, query, matrix, offsets, docs, bf16=bf16)
    alone = [cpu_retrieval.maxsim(lib, query, matrix, offsets, np.array([d]), bf16=bf16)[0] for d in docs]
    np.testing.assert_array_equal(together, alone)
    reversed_order = cpu_retrieval.maxsim(lib, query, matrix, offsets, docs[::-1], bf16=bf16)
    np.testing.assert_array_equal(reversed_order, together[::-1])


def test_maxsim_falls_back_where_the_c_kernel_does_not_apply():
    """Queries of more than 32 tokens and dims not in 32s keep the PyTorch path (in fp32,
    whatever products were asked for)."""
    matrix, offsets = _fp16_index([3, 4], 16)
    long_query = np.ones((40, 16), dtype=np.float32) / 4
    docs = np.array([0, 1])
    np.testing.assert_array_equal(
        maxsim(long_query, matrix, offsets, docs, bf16_products=True),
        maxsim_torch(long_query, matrix, offsets, docs),
    )
    short_query = long_query[:4]
    np.testing.assert_array_equal(
        maxsim(short_query, matrix, offsets, docs, bf16_products=True),
        maxsim_torch(short_query, matrix, offsets, docs),
    )


# ---------------------------------------------------------------------- centroid stage
def _centroid_stage(seed: int, centroids: int = 64, docs: int = 300) -> CentroidStage:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30, size=docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codes = rng.integers(0, centroids, size=int(offsets[-1])).astype(np.int32)
    ivf_docs, ivf_offsets = build_inverted_file(codes, offsets, centroids)
    table = rng.standard_normal((centroids, 32)).astype(np.float32)
    return CentroidStage(table, codes, ivf_docs, ivf_offsets, offsets)


@needs_kernels
@pytest.mark.parametrize(("tokens", "centroids"), [(9, 64), (20, 64), (32, 64), (5, 50), (17, 50)])
def test_c_centroid_candidates_match_numpy(tokens, centroids):
    """Random scores: the C stage finds the very documents numpy does, for shortlists shorter
    and longer than what the probe finds, with up to 16 and up to 32 tokens a centroid row,
    and centroids past the last block of 16."""
    stage = _centroid_stage(tokens, centroids)
    qc = torch.from_numpy(
        np.random.default_rng(100 + tokens).standard_normal((tokens, centroids)).astype(np.float32)
    )
    assert cpu_retrieval.library() is not None
    for n, nprobe, refine in [(5, 4, 4), (20, 2, 3), (50, 8, 1), (400, 4, 4), (1, centroids, 2)]:
        got = stage.candidates(qc, n, nprobe, refine)
        want = stage.candidates_numpy(qc, n, nprobe, refine)
        assert got.dtype == np.int64 and len(got) == len(want)
        # Probing every centroid with few tokens, documents can tie at the cut: then equals
        # may stand in for each other (see the next test); their scores are the same.
        np.testing.assert_array_equal(
            np.sort(stage.centroid_interaction(qc, got)), np.sort(stage.centroid_interaction(qc, want))
        )
        if nprobe < centroids:
            assert sorted(got.tolist()) == sorted(want.tolist()), (n, nprobe, refine)


@needs_kernels
def test_c_centroid_candidates_with_ties_differ_only_among_equals():
    """One query token: documents sharing a best centroid tie. Where the whole probe's finds
    are refined (no cut before the refine), the kept documents' refined scores agree with
    numpy's, best first, the lower index first among equals (numpy picks its own way)."""
    stage = _centroid_stage(7, centroids=16)
    rng = np.random.default_rng(8)
    for _ in range(20):
        qc = torch.from_numpy(rng.standard_normal((1, 16)).astype(np.float32))
        got, want = stage.candidates(qc, 10, 2, 1000), stage.candidates_numpy(qc, 10, 2, 1000)
        np.testing.assert_array_equal(
            np.sort(stage.centroid_interaction(qc, got)), np.sort(stage.centroid_interaction(qc, want))
        )
        refined = stage.centroid_interaction(qc, got)
        assert all((a, -x) >= (b, -y) for a, b, x, y in zip(refined, refined[1:], got, got[1:]))


@needs_kernels
def test_c_centroid_scores_match_pytorch_and_do_not_depend_on_the_batch():
    """The C product (centroids in 64s) within 1e-5 (relative) of PyTorch's fp32 product, a
    query's scores bitwise the same alone and in a batch; 50 centroids keep PyTorch's product."""
    rng = np.random.default_rng(11)
    queries = [rng.standard_normal((n, 32)).astype(np.float32) for n in (1, 7, 20, 32)]
    for centroids, c_path in ((128, True), (50, False)):
        table = rng.standard_normal((centroids, 32)).astype(np.float32)
        stage = CentroidStage(
            table,
            np.zeros(1, np.int32),
            np.zeros(0, np.int32),
            np.zeros(centroids + 1, np.int64),
            np.array([0, 1]),
        )
        together = stage.scores(queries)
        for q, got in zip(queries, together, strict=True):
            want = torch.from_numpy(q) @ torch.from_numpy(table).T
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
            if c_path:
                assert torch.equal(stage.scores([q])[0], got)
            else:  # PyTorch's product: its answer may depend on the batch, not on this code
                assert torch.equal(stage.scores([q])[0], want)
    assert stage.scores([]) == []


def test_centroid_candidates_fall_back_without_the_kernels(monkeypatch):
    """`PLAIT_CPU_RETRIEVAL=0`: the numpy stage answers."""
    monkeypatch.setenv(cpu_retrieval.ENV, "0")
    stage = _centroid_stage(3)
    qc = torch.from_numpy(np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32))
    np.testing.assert_array_equal(stage.candidates(qc, 7), stage.candidates_numpy(qc, 7))


# ------------------------------------------------------------------------ hybrid stage
def _hybrid_numpy(sparse, n, centroid_docs, query, matrix, offsets, bf16, alpha, k) -> list[Hit]:
    """The numpy path of `Searcher.search_one`'s hybrid stage on the same inputs (its MaxSim is
    the C kernel the C stage calls: the comparison is of what surrounds it)."""
    cands = np.unique(np.concatenate([best_n(sparse, n), centroid_docs])).astype(np.int64)
    return _top_k(cands, fuse(sparse[cands], maxsim(query, matrix, offsets, cands, bf16), alpha), k)


def _hybrid_c(*args) -> list[Hit]:
    docs, scores = cpu_retrieval.hybrid(cpu_retrieval.library(), *args)
    assert docs.dtype == np.int64 and scores.dtype == np.float64
    return [Hit(d, s) for d, s in zip(docs.tolist(), scores.tolist())]


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
def test_c_hybrid_stage_is_the_numpy_path_bitwise(bf16):
    """Random BM25 scores (most 0, some repeated: ties at the n-th score), centroid candidates
    overlapping BM25's, documents without rows, candidate sets past numpy's 128-number sum
    blocks, k past the candidates: the same documents in the same order with the same float64
    scores, bit for bit."""
    rng = np.random.default_rng(21)
    lengths = rng.integers(0, 12, size=400).tolist()
    matrix, offsets = _fp16_index(lengths, 32, seed=4)
    for trial in range(40):
        sparse = np.zeros(len(lengths), dtype=np.float32)
        hit = rng.choice(len(lengths), size=int(rng.integers(0, 300)), replace=False)
        sparse[hit] = rng.choice([0.5, 1.25, 2.0, 3.75], size=len(hit)) * rng.integers(1, 3, size=len(hit))
        sparse[hit[: len(hit) // 2]] += rng.random(len(hit) // 2, dtype=np.float32)
        centroid_docs = rng.choice(len(lengths), size=int(rng.integers(0, 120)), replace=False)
        query = rng.standard_normal((int(rng.integers(1, 33)), 32)).astype(np.float32)
        n, k = int(rng.choice([1, 10, 50, 200, 400])), int(rng.choice([1, 10, 100, 1000]))
        alpha = float(rng.choice([0.0, 0.3, 1.0]))
        args = (sparse, n, centroid_docs, query, matrix, offsets, bf16, alpha, k)
        assert _hybrid_c(*args) == _hybrid_numpy(*args), trial


@needs_kernels
def test_c_hybrid_stage_edge_cases():
    """No centroid candidates; constant scores on both sides (z-scores of 0: every fused score
    0, the order by document); one candidate; k past the candidates."""
    matrix, offsets = _fp16_index([0, 0, 0, 5, 2, 3], 32, seed=9)
    query = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    empty = np.zeros(0, dtype=np.int64)
    sparse = np.array([0.0, 2.0, 0.0, 1.0, 2.0, 0.5], dtype=np.float32)
    cases = [
        (sparse, 3, empty, 10),
        (np.zeros(6, dtype=np.float32), 6, empty, 10),
        (np.full(6, 1.5, dtype=np.float32), 2, np.array([5, 2], dtype=np.int64), 10),
        (sparse, 1, empty, 5),
        (sparse, 2, np.array([4, 0, 4], dtype=np.int64), 2),
    ]
    for sparse_all, n, centroid_docs, k in cases:
        args = (sparse_all, n, centroid_docs, query, matrix, offsets, True, 0.3, k)
        got = _hybrid_c(*args)
        assert got == _hybrid_numpy(*args)
        assert len(got) == min(k, len(np.union1d(best_n(sparse_all, n), centroid_docs)))
    # Documents 0-2 have no rows (MaxSim 0) and score 0 in BM25: z-scores of 0, ties by document.
    constant = _hybrid_c(
        np.zeros(6, np.float32), 3, np.array([1], np.int64), query, matrix, offsets, True, 0.3, 9
    )
    assert constant == [Hit(0, 0.0), Hit(1, 0.0), Hit(2, 0.0)]


def test_best_n_keeps_the_lower_positions_among_equals():
    """The n best scores, equals at the cut taken from the lowest positions, as a stable sort
    by score would take them."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        scores = rng.choice([0.0, 0.0, 0.0, 1.0, 2.5, 3.0], size=int(rng.integers(1, 300))).astype(np.float32)
        n = int(rng.integers(1, len(scores) + 1))
        want = np.argsort(-scores, kind="stable")[:n]
        assert sorted(best_n(scores, n).tolist()) == sorted(want.tolist())
    assert len(best_n(np.ones(3, np.float32), 0)) == 0


# ----------------------------------------------------------------------- whole searches
@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, encoder):
    corpus = write_jsonl(tmp_path_factory.mktemp("corpus") / "tiny.jsonl", TINY_CORPUS)
    return build_index(corpus, tmp_path_factory.mktemp("idx") / "tiny", encoder=encoder)


@needs_kernels
def test_c_bm25_sum_is_the_numpy_sum_bitwise(index_dir):
    """The C column sum adds what the numpy loop adds, in its order: the same float32 scores,
    a repeated query term included; no term in the vocabulary still gives zeros."""
    from plait.retrievers.lexical import BM25Stage

    stage = BM25Stage(index_dir, stem=True, use_numba=False)
    assert stage._csc is not None
    for query in [*QUERIES, "hamlet hamlet tragedy", "nothing-matches zzz"]:
        ids = stage.term_ids(query)
        want = stage.score_numpy(ids)
        got = stage.scores(query)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def _searches(index_dir, encoder, **kwargs) -> tuple[bool, list[list]]:
    rm = ColBERTServe.open(index_dir, encoder=encoder, **kwargs)
    try:
        hits = rm.search_hits(QUERIES, k=5, stage="hybrid")
        return rm.searcher.encoder.kernel_active, hits
    finally:
        rm.close()


def _same_rankings(a: list[list], b: list[list], atol: float) -> None:
    for x, y in zip(a, b, strict=True):
        assert [h.doc for h in x] == [h.doc for h in y]
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], atol=atol)


def test_search_without_a_compiler_keeps_the_pytorch_path(index_dir, encoder, monkeypatch, tmp_path):
    """No compiler and no cached library: the kernels are off, searches still answer, and
    with `PLAIT_CPU_RETRIEVAL=0` too; rankings match the kernels' where those run."""
    monkeypatch.setenv("PLAIT_HOME", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu_retrieval.shutil, "which", lambda name: None)
    assert cpu_retrieval.library() is None
    active, without = _searches(index_dir, encoder)
    assert not active
    monkeypatch.undo()
    cpu_retrieval.reset()
    monkeypatch.setenv(cpu_retrieval.ENV, "0")
    assert cpu_retrieval.library() is None
    _same_rankings(_searches(index_dir, encoder)[1], without, atol=0)
    if CAN_BUILD:
        monkeypatch.delenv(cpu_retrieval.ENV)
        cpu_retrieval.reset()
        active, with_kernels = _searches(index_dir, encoder)
        assert active
        _same_rankings(with_kernels, without, atol=2e-2)


@needs_kernels
def test_hybrid_search_takes_the_c_stage_with_the_numpy_answers(index_dir, encoder, monkeypatch):
    """`search_one` through the C hybrid stage gives the hits of its numpy path, bitwise, for
    several candidate mixes and k; the C stage is the one that ran."""
    rm = ColBERTServe.open(index_dir, encoder=encoder, batching=False)
    calls = []
    c_stage = cpu_retrieval.hybrid
    monkeypatch.setattr(cpu_retrieval, "hybrid", lambda *a: calls.append(1) or c_stage(*a))
    s = rm.searcher
    vectors = s.encoder.encode_queries(QUERIES)
    mixes = [SearchParams(), SearchParams(alpha=1.0, bm25_candidates=2), SearchParams(centroid_candidates=0)]
    for p in mixes:
        for query, qv, qc in zip(QUERIES, vectors, rm.store.centroids.scores(vectors)):
            for k in (1, 3, 50):
                cands, sparse, late = s.hybrid_candidates(query, qv, k, p, qc)
                assert s.search_one(query, qv, qc, k, "hybrid", p) == _top_k(
                    cands, fuse(sparse, late, p.alpha), k
                )
    assert len(calls) == len(mixes) * len(QUERIES) * 3
    with pytest.raises(ValueError, match="alpha"):
        s.search_one(QUERIES[0], vectors[0], None, 3, "hybrid", SearchParams(alpha=1.5))
    rm.close()


@needs_kernels
def test_served_answers_do_not_depend_on_concurrent_traffic(index_dir, encoder):
    """Through the batching workers: 16 queries at once give bitwise the answers each gets alone."""
    rm = ColBERTServe.open(index_dir, encoder=encoder)
    try:
        queries = _many_queries(16)
        together = rm.search_hits(queries, k=5, stage="hybrid")
        for q, hits in zip(queries, together, strict=True):
            assert rm.search_hits([q], k=5, stage="hybrid")[0] == hits
    finally:
        rm.close()


@needs_kernels
def test_maxsim_dtype_picks_the_products(index_dir, encoder):
    """ "auto" (the default) scores MaxSim on bf16 products, "float32" in fp32: the late scores
    differ by less than 2e-2 and the rankings are the same; anything else is refused."""
    auto = ColBERTServe.open(index_dir, encoder=encoder, batching=False)
    exact = ColBERTServe.open(index_dir, encoder=encoder, batching=False, maxsim_dtype="float32")
    assert auto.searcher.bf16_products and not exact.searcher.bf16_products
    a, b = auto.search_hits(QUERIES, k=5, stage="late"), exact.search_hits(QUERIES, k=5, stage="late")
    _same_rankings(a, b, atol=2e-2)
    assert any(x.score != y.score for hits_a, hits_b in zip(a, b) for x, y in zip(hits_a, hits_b))
    with pytest.raises(ValueError, match="maxsim_dtype"):
        ColBERTServe.open(index_dir, encoder=encoder, batching=False, maxsim_dtype="bfloat16")
