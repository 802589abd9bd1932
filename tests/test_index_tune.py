"""`plait index tune` (#18 item 2): synthetic queries -> filter -> a learnt query map -> a new
index version beside the old one. A stand-in writer makes queries for most tests (the real
engine writes a handful once, through the CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.cli import main
from plait.retrievers import ColBERTServe, build_index
from plait.retrievers.encoder import ColBERTEncoder
from plait.retrievers.errors import IndexNotFoundError, SettingsError
from plait.retrievers.query_map import TrainSettings, batch_loss, doc_block, padded, train_query_map
from plait.retrievers.store import IndexStore
from plait.retrievers.synthetic import TrainingPair, read_queries, sample_documents
from plait.retrievers.tuning import STAGES, TuneSettings, tune_index
from plait.retrievers.versions import versions
from tests.retrieval_fixtures import EXPECTED_TOP1, TINY_CORPUS, write_jsonl
from tests.test_retrieval_progress import Recorder

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL = TuneSettings(queries=8, train=TrainSettings(epochs=2, batch_size=4, negatives=3, heldout=0.0))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    corpus = write_jsonl(tmp_path_factory.mktemp("corpus") / "tiny.jsonl", TINY_CORPUS)
    return build_index(corpus, tmp_path_factory.mktemp("built") / "idx", encoder=ColBERTEncoder.load())


@pytest.fixture
def index(built, tmp_path) -> Path:
    """A fresh copy of the tiny index for one test."""
    return Path(shutil.copytree(built, tmp_path / "idx"))


class Writer:
    """A stand-in query writer: the passage's first `words` words (its passage ranks first for
    them); records every passage it was asked about."""

    def __init__(self, words: int = 6, fail_after: int | None = None):
        self.words, self.fail_after = words, fail_after
        self.asked: list[str] = []

    def __call__(self, passages):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise KeyboardInterrupt  # a crash in the middle of generation
        self.asked += passages
        return [" ".join(p.split()[: self.words]) for p in passages]


def tune(index: Path, writer=None, settings: TuneSettings = SMALL, **kwargs) -> Path:
    return tune_index(index, writer or Writer(), generator="first words", settings=settings, **kwargs)


def search_all(index: Path, **kwargs) -> dict[str, list[str]]:
    rm = ColBERTServe.open(index, batching=False, **kwargs)
    return {q: [p.id for p in rm(q, k=3)] for q in EXPECTED_TOP1}


def test_tune_writes_a_new_version_and_keeps_the_old_one(index):
    before = search_all(index)
    manifest_before = (index / "manifest.json").read_bytes()
    progress = Recorder()
    out = tune(index, progress=progress)

    assert out == index / "versions" / "2" and list(versions(index)) == [1, 2]
    assert (index / "manifest.json").read_bytes() == manifest_before  # version 1 is untouched
    assert [c[1] for c in progress.calls if c[0] == "finish"] == list(STAGES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["base_version"] == 1
    assert manifest["encoder"]["query_map"] == "query_map.npy"
    tuning = manifest["tuning"]
    assert tuning["generator"] == "first words" and tuning["queries_generated"] == 8
    assert 1 <= tuning["queries_kept"] <= 8 and "top 1 hybrid" in tuning["filter"]
    assert tuning["settings"]["train"]["epochs"] == 2 and tuning["training"]["steps"] == 4
    assert set(tuning["seconds"]) >= set(STAGES[:-1])
    # Shared files are the base's own bytes (hard links), and the new version verifies.
    assert (out / "embeddings.f16").stat().st_ino == (index / "embeddings.f16").stat().st_ino
    IndexStore(out, verify=True)

    new, old = ColBERTServe.open(index, batching=False), ColBERTServe.open(index, version=1, batching=False)
    assert new.store.path == out and new.searcher.encoder.query_map is not None
    assert old.searcher.encoder.query_map is None
    assert search_all(index, version=1) == before
    assert all(hits[0] == EXPECTED_TOP1[q] for q, hits in search_all(index).items())


def test_generation_resumes_after_a_crash(index):
    crashing = Writer(fail_after=4)
    settings = TuneSettings(queries=8, generation_chunk=2, train=SMALL.train)
    with pytest.raises(KeyboardInterrupt):
        tune(index, crashing, settings)
    queries = index / "tune" / "queries.jsonl"
    assert len(read_queries(queries)) == 4 and not (index / "versions").exists()
    with open(queries, "a") as f:
        f.write('{"doc": 3, "que')  # a line cut short by the crash
    rest = Writer()
    tune(index, rest, settings)
    assert len(rest.asked) == 4  # only the passages without a query
    order = sample_documents(8, 8, settings.seed)
    assert [d for d, _ in read_queries(queries)] == [int(d) for d in order]


def test_a_rerun_reuses_finished_stages_and_more_queries_extend_the_sample(index):
    tune(index)
    stage = index / "tune" / "from-1"
    stamps = {p.name: p.stat().st_mtime_ns for p in stage.iterdir()}
    idle = Writer(fail_after=0)  # any call fails: every query is already there
    out = tune(index, idle, base_version=1)
    assert out.name == "3" and {p.name: p.stat().st_mtime_ns for p in stage.iterdir()} == stamps
    two, three = (np.load(index / "versions" / v / "query_map.npy") for v in ("2", "3"))
    np.testing.assert_array_equal(two, three)


def test_queries_of_another_sample_are_refused_unless_restarted(index):
    tune(index, settings=TuneSettings(queries=4, train=SMALL.train))
    other = TuneSettings(queries=4, seed=1, train=SMALL.train)
    with pytest.raises(SettingsError, match="--restart"):
        tune(index, settings=other)
    tune(index, settings=other, restart=True)
    assert [d for d, _ in read_queries(index / "tune" / "queries.jsonl")] == list(sample_documents(8, 4, 1))


def test_filter_drops_queries_whose_passage_does_not_rank_first(index):
    def off_topic(passages):
        return ["volcano magma ash eruption" for _ in passages]  # right for one passage only

    with pytest.raises(SettingsError, match="too few to train on"):
        tune(index, off_topic)
    out = tune(index, off_topic, TuneSettings(queries=8, keep_rank=8, train=SMALL.train), restart=True)
    assert json.loads((out / "manifest.json").read_text())["tuning"]["queries_kept"] == 8


def test_training_lowers_the_loss_deterministically(built):
    store = IndexStore(built)
    encoder = ColBERTEncoder.load()
    queries = list(EXPECTED_TOP1)
    # Each query paired with the next query's passage: wrong under the untuned encoder, so
    # the loss starts high and only a learnt map brings it down.
    docs = [store.docs.ids().index(EXPECTED_TOP1[q]) for q in queries[1:] + queries[:1]]
    pairs = [
        TrainingPair(q, d, tuple(o for o in range(store.num_docs) if o != d), 1, ())
        for q, d in zip(queries, docs, strict=True)
    ]
    vectors = encoder.encode_queries(queries)
    settings = TrainSettings(
        epochs=6, batch_size=4, negatives=3, heldout=0.0, learning_rate=1e-2, distill=0.0
    )
    start = np.eye(store.dim, dtype=np.float32)

    def loss(matrix: np.ndarray) -> float:
        q, q_mask = padded(vectors)
        d, d_mask = doc_block(store, [i for p in pairs for i in [p.doc, *p.negatives[:3]]])
        shape = (len(pairs), 4)
        with torch.no_grad():
            return float(
                batch_loss(
                    torch.from_numpy(matrix), q, q_mask, d.view(*shape, *d.shape[1:]), d_mask.view(*shape, -1)
                )
            )

    learnt, report = train_query_map(store, vectors, pairs, start, settings)
    assert report.steps == 12 and report.train_loss[-1] < report.train_loss[0]
    assert loss(learnt) < loss(start)
    again, _ = train_query_map(store, vectors, pairs, start, settings)
    np.testing.assert_array_equal(learnt, again)


def test_cli_tune_with_the_embedded_model(index, capsys):
    """The real engine writes three queries; progress lines go to stderr."""
    args = [
        "index",
        "tune",
        str(index),
        "--queries",
        "3",
        "--keep-rank",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "2",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "version 2 from version 1" in captured.out
    assert f"{STAGES[0]}: done, 3/3 queries" in captured.err
    queries = read_queries(index / "tune" / "queries.jsonl")
    assert len(queries) == 3 and all(q.strip() for _, q in queries)
    tuning = json.loads((index / "versions" / "2" / "manifest.json").read_text())["tuning"]
    assert tuning["generator"].startswith("WriteQuery on plait/smollm2-135m")
    assert main(["index", "search", str(index), "iron tower in Paris", "--version", "1"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["index", "tune", "{missing}", "--queries", "5"], "does not exist"),
        (["index", "tune", "{index}", "--from-version", "7"], "has no version 7"),
        (["index", "tune", "{index}", "--queries", "0"], "must be at least 1"),
        (["index", "search", "{index}", "iron tower", "--version", "2"], "has no version 2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(index, tmp_path, capsys, args, message):
    args = [a.format(index=index, missing=tmp_path / "nothing") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_missing_version_is_named(index):
    with pytest.raises(IndexNotFoundError, match="it has 1"):
        ColBERTServe.open(index, version=2)
