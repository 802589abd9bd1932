"""How retrieval work is scheduled: worker threads that batch requests, MaxSim over gathered
rows, the vectorised centroid stage and packed encoder batches, each against a plain reference."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from plait.retrievers.batcher import MicroBatcher
from plait.retrievers.centroids import CentroidStage, build_inverted_file
from plait.retrievers.colbert_serve import _one_torch_thread
from plait.retrievers.embeddings import as_tensor, to_storage
from plait.retrievers.encoder import ColBERTEncoder, EncoderSettings
from plait.retrievers.maxsim import maxsim_torch, segment_max, token_rows
from tests.retrieval_fixtures import EXPECTED_TOP1, brute_force_maxsim

torch.set_num_threads(min(2, torch.get_num_threads()))


# -------------------------------------------------------------------------- MicroBatcher
def test_batcher_coalesces_what_is_queued_and_answers_in_order():
    release, batches = threading.Event(), []

    def fn(items: list[int]):
        batches.append(list(items))
        release.wait(5)
        return [i * 10 for i in items]

    batcher = MicroBatcher(fn, workers=1)
    try:
        first = threading.Thread(target=batcher.submit, args=(0,))
        first.start()
        while not batches:  # the worker holds the first item; the next ones queue up meanwhile
            threading.Event().wait(0.01)
        results: list[list[int]] = []
        rest = threading.Thread(target=lambda: results.append(batcher.submit_many([1, 2, 3, 4, 5])))
        rest.start()
        threading.Event().wait(0.1)
        release.set()
        first.join(5)
        rest.join(5)
        assert batches == [[0], [1, 2, 3, 4, 5]]
        assert results == [[10, 20, 30, 40, 50]]
    finally:
        batcher.close()


def test_batcher_failure_reaches_every_caller_and_the_worker_goes_on():
    def fn(items: list[str]):
        if "bad" in items:
            raise ValueError("bad item")
        yield from (s.upper() for s in items)

    batcher = MicroBatcher(fn, workers=2)
    try:
        with pytest.raises(ValueError, match="bad item"):
            batcher.submit_many(["a", "bad", "c"])
        assert batcher.submit_many(["x", "y"]) == ["X", "Y"]
    finally:
        batcher.close()


def test_batcher_close_joins_every_worker():
    before = set(threading.enumerate())
    batcher = MicroBatcher(lambda items: items, workers=3, name="plait-test-batcher")
    assert len(set(threading.enumerate()) - before) == 3
    assert batcher.submit(7) == 7
    batcher.close()
    assert set(threading.enumerate()) - before == set()


def test_batcher_setup_failure_is_raised_and_leaves_no_thread():
    before = set(threading.enumerate())

    def setup() -> None:
        raise RuntimeError("no torch today")

    with pytest.raises(RuntimeError, match="no torch today"):
        MicroBatcher(lambda items: items, workers=2, setup=setup)
    assert set(threading.enumerate()) - before == set()


def test_workers_run_torch_on_one_thread_without_moving_the_process_default():
    """A worker's setup gives it one torch thread; threads started later keep the default."""
    default = torch.get_num_threads()
    batcher = MicroBatcher(lambda items: [torch.get_num_threads() for _ in items], setup=_one_torch_thread)
    try:
        assert batcher.submit_many([0, 1]) == [1, 1]
        fresh: list[int] = []
        thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert fresh == [default] and torch.get_num_threads() == default
    finally:
        batcher.close()


# ------------------------------------------------------------------------------- MaxSim
def _random_index(lengths: list[int], dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((sum(lengths), dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def test_token_rows_and_segment_max():
    offsets = np.array([0, 3, 3, 7, 9], dtype=np.int64)  # document 1 has no tokens
    rows, lengths = token_rows(offsets, np.array([3, 1, 0, 2]))
    assert rows.tolist() == [7, 8, 0, 1, 2, 3, 4, 5, 6] and lengths.tolist() == [2, 0, 3, 4]
    sim = np.arange(2 * len(rows), dtype=np.float32).reshape(2, -1) % 5
    want = [
        [sim[t, a:b].max() if b > a else 0.0 for a, b in [(0, 2), (2, 2), (2, 5), (5, 9)]] for t in range(2)
    ]
    np.testing.assert_array_equal(segment_max(sim, lengths), want)
    assert token_rows(offsets, np.array([], dtype=np.int64))[0].tolist() == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_maxsim_over_gathered_blocks_equals_brute_force(dtype):
    """Any block size, any candidate order, an empty document: the per-document reference."""
    lengths = [5, 1, 0, 9, 3, 12, 2]
    rows, offsets = _random_index(lengths)
    stored = to_storage(rows, dtype)
    matrix = as_tensor(stored, dtype)
    decoded = matrix.float().numpy()
    docs = [decoded[offsets[d] : offsets[d + 1]] for d in range(len(lengths))]
    query = _random_index([4])[0]
    order = np.array([3, 2, 6, 0, 5, 1, 4])
    want = brute_force_maxsim(query, [docs[d] if len(docs[d]) else np.full((1, 8), 0.0) for d in order])
    want[order == 2] = 0.0  # an empty document scores 0
    atol = 1e-5 if dtype == "float16" else 0.05  # bf16 products round to bf16
    for block in (1, 4, 7, 2048):
        np.testing.assert_allclose(
            maxsim_torch(query, matrix, offsets, order, block_rows=block), want, atol=atol
        )
    assert maxsim_torch(query, matrix, offsets, np.array([], dtype=np.int64)).shape == (0,)


# ---------------------------------------------------------------------- centroid stage
def _loop_probe_scores(stage: CentroidStage, qc: np.ndarray, nprobe: int) -> np.ndarray:
    """The token-by-token loop `probe_scores` replaces, kept here as its reference."""
    probes = np.argsort(-qc, axis=1, kind="stable")[:, :nprobe]
    approx = np.zeros(stage.num_docs, dtype=np.float32)
    best = np.zeros(stage.num_docs, dtype=np.float32)
    for i in range(len(qc)):
        touched = []
        for c in probes[i][::-1]:  # ascending: the best centroid writes last
            docs = stage.ivf_docs[stage.ivf_offsets[c] : stage.ivf_offsets[c + 1]]
            best[docs] = qc[i, c]
            touched.append(docs)
        hit = np.concatenate(touched)
        approx[hit] += best[hit]
        best[hit] = 0.0
    return approx


def test_vectorised_probe_scores_equal_the_loop_bit_for_bit():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, size=200).tolist()
    rows, offsets = _random_index(lengths, dim=16, seed=2)
    centroids = _random_index([64], dim=16, seed=3)[0]
    codes = (rows @ centroids.T).argmax(axis=1).astype(np.int32)
    ivf_docs, ivf_offsets = build_inverted_file(codes, offsets, len(centroids))
    stage = CentroidStage(centroids, codes, ivf_docs, ivf_offsets, offsets)
    for seed in range(5):
        query = _random_index([7], dim=16, seed=10 + seed)[0]
        qc = stage.scores([query])[0]
        for nprobe in (1, 4, 9):
            top = torch.topk(qc, nprobe, dim=1)
            got = stage.probe_scores(top.values.numpy(), top.indices.numpy())
            np.testing.assert_array_equal(got, _loop_probe_scores(stage, qc.numpy(), nprobe))
    # Scores for several queries from one product equal each query's own product.
    queries = [_random_index([n], dim=16, seed=n)[0] for n in (3, 5, 8)]
    for joint, query in zip(stage.scores(queries), queries):
        np.testing.assert_allclose(joint.numpy(), stage.scores([query])[0].numpy(), atol=1e-6)
    assert stage.scores([]) == []


# ----------------------------------------------------------------------------- encoder
@pytest.fixture(scope="module")
def encoder() -> ColBERTEncoder:
    return ColBERTEncoder.load()


@pytest.mark.parametrize("augment", [False, True])
def test_packed_batch_encodes_each_query_as_alone(encoder, augment):
    """Queries of different lengths in one packed batch == each encoded alone (and, with
    ColBERT's [MASK] augmentation, the masks' embeddings too)."""
    if augment:
        encoder = encoder.with_settings(
            EncoderSettings(query_maxlen=24, query_marker="[unused0]", augment_queries=True)
        )
    queries = ["insulin", *EXPECTED_TOP1, "a much longer query about " + " and ".join(["bees"] * 8)]
    batched = encoder.encode_queries(queries)
    for query, got in zip(queries, batched):
        alone = encoder.encode_queries([query])[0]
        assert got.shape == alone.shape
        np.testing.assert_allclose(got, alone, atol=1e-5)


def test_bf16_queries_are_a_converted_copy(encoder):
    fast = encoder.with_dtype(torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and encoder.dtype == torch.float32
    assert encoder.with_dtype(torch.float32) is encoder
    queries = list(EXPECTED_TOP1)
    for want, got in zip(encoder.encode_queries(queries), fast.encode_queries(queries)):
        assert got.dtype == np.float32
        # Unit vectors that point the same way, within bf16's rounding.
        assert np.min(np.sum(want * got, axis=1)) > 0.99
