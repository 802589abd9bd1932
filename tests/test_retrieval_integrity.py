"""A tampered index is refused when it is opened, with `IndexCorruptError` naming the file.

Each case rewrites one file with a structurally wrong array (values out of range, offsets that
go backwards, a wrong dtype or shape) and re-seals the manifest's size and sha256, as someone
editing an index would: the cheap size check and even `--verify` pass, so only the structural
checks at open stand between the edit and an out-of-range index at search time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from plait.retrievers import ColBERTServe, IndexCorruptError, build_index
from plait.retrievers.encoder import ColBERTEncoder
from plait.retrievers.manifest import file_entries
from plait.retrievers.searcher import SearchParams
from plait.retrievers.server import create_app
from tests.retrieval_fixtures import TINY_CORPUS, ServerThread, free_port, write_jsonl

torch.set_num_threads(min(2, torch.get_num_threads()))

DOCS = len(TINY_CORPUS)


@pytest.fixture(scope="module")
def encoder() -> ColBERTEncoder:
    return ColBERTEncoder.load()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, encoder) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    return build_index(write_jsonl(root / "tiny.jsonl", TINY_CORPUS), root / "idx", encoder=encoder)


def tamper(src: Path, dst: Path, name: str, change: Callable) -> Path:
    """A copy of the index at `dst` with `name` rewritten by `change`, manifest re-sealed."""
    shutil.copytree(src, dst)
    path = dst / name
    if name.endswith(".npy"):
        np.save(path, change(np.load(path)))
    elif name.endswith(".json") and name != "manifest.json":
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        path.write_bytes(change(path.read_bytes()))
    manifest = json.loads((dst / "manifest.json").read_text())
    if name in manifest["files"]:
        manifest["files"].update(file_entries(dst, [name]))
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def setting(index: int, value: int) -> Callable[[np.ndarray], np.ndarray]:
    def change(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[index] = value
        return a

    return change


def backwards(a: np.ndarray) -> np.ndarray:
    """Offsets that go backwards (the second past the third), same first and last."""
    a = a.copy()
    a[1] = a[2] + 1
    return a


def ends_at(delta: int) -> Callable[[np.ndarray], np.ndarray]:
    def change(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[-1] += delta
        return a

    return change


CASES = {
    "codes_past_centroids": ("codes.npy", setting(0, 10**6)),
    "codes_negative": ("codes.npy", setting(5, -1)),
    "codes_float": ("codes.npy", lambda a: a.astype(np.float32)),
    "codes_2d": ("codes.npy", lambda a: a.reshape(-1, 2)),
    "ivf_docs_past_docs": ("ivf_docs.npy", setting(0, DOCS)),
    "ivf_docs_negative": ("ivf_docs.npy", setting(-1, -1)),
    "ivf_offsets_backwards": ("ivf_offsets.npy", backwards),
    "ivf_offsets_end": ("ivf_offsets.npy", ends_at(-1)),
    "ivf_offsets_start": ("ivf_offsets.npy", setting(0, -3)),
    "doc_offsets_backwards": ("doc_offsets.npy", backwards),
    "doc_offsets_start": ("doc_offsets.npy", setting(0, 50)),
    "doc_offsets_float": ("doc_offsets.npy", lambda a: a.astype(np.float64)),
    "docstore_offsets_backwards": ("docs.offsets.npy", backwards),
    "docstore_offsets_past_file": ("docs.offsets.npy", ends_at(10**6)),
    "centroids_int": ("centroids.npy", lambda a: a.astype(np.int32)),
    "bm25_indices_past_docs": ("bm25/indices.csc.index.npy", setting(0, DOCS)),
    "bm25_indices_negative": ("bm25/indices.csc.index.npy", setting(0, -1)),
    "bm25_indptr_backwards": ("bm25/indptr.csc.index.npy", backwards),
    "bm25_indptr_end": ("bm25/indptr.csc.index.npy", ends_at(-1)),
    "bm25_data_int": ("bm25/data.csc.index.npy", lambda a: a.astype(np.int32)),
    "bm25_vocab_id": ("bm25/vocab.index.json", lambda v: {**v, next(iter(v)): 10**6}),
    "bm25_vocab_list": ("bm25/vocab.index.json", lambda v: list(v)),
    "embeddings_longer": ("embeddings.f16", lambda b: b + bytes(384 * 2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_array_is_refused_at_open(tmp_path, index_dir, encoder, case):
    name, change = CASES[case]
    idx = tamper(index_dir, tmp_path / "idx", name, change)
    with pytest.raises(IndexCorruptError, match=Path(name).name.replace(".", r"\.")):
        ColBERTServe.open(idx, encoder=encoder, verify=True, batching=False)


@pytest.mark.parametrize("entry", [{"sha256": "0" * 64}, {"bytes": "many", "sha256": "0" * 64}, "codes"])
def test_malformed_manifest_file_entry_is_refused(tmp_path, index_dir, entry):
    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    manifest = json.loads((idx / "manifest.json").read_text())
    manifest["files"]["codes.npy"] = entry
    (idx / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match=r"codes\.npy"):
        ColBERTServe.open(idx, batching=False)


def test_valid_edge_values_still_open_and_search(tmp_path, index_dir, encoder):
    """The checks accept what a build can write: every code may be the last centroid."""
    k = len(np.load(index_dir / "centroids.npy"))
    idx = tamper(index_dir, tmp_path / "idx", "codes.npy", lambda a: np.full_like(a, k - 1))
    rm = ColBERTServe.open(idx, encoder=encoder, batching=False)
    hits = rm("iron tower in Paris", k=3, stage="late", params=SearchParams(centroid_candidates=1))
    assert len(hits) >= 1


def test_garbled_document_text_is_a_typed_error_at_read(tmp_path, index_dir, encoder):
    """docs.jsonl is large and not read at open; a damaged row fails as IndexCorruptError."""
    idx = tamper(index_dir, tmp_path / "idx", "docs.jsonl", lambda b: b"x" * len(b))
    rm = ColBERTServe.open(idx, encoder=encoder, batching=False)
    with pytest.raises(IndexCorruptError, match=r"docs\.jsonl"):
        rm("iron tower in Paris", k=1, stage="bm25")


def test_server_answers_a_damaged_row_with_a_json_500_without_paths(tmp_path, index_dir, encoder):
    idx = tamper(index_dir, tmp_path / "idx", "docs.jsonl", lambda b: b"x" * len(b))
    rm = ColBERTServe.open(idx, encoder=encoder)
    try:
        with ServerThread(create_app(rm)) as srv:
            r = httpx.get(srv.url + "/", params={"query": "iron tower in Paris", "stage": "bm25"})
    finally:
        rm.close()
    assert r.status_code == 500 and r.json()["error"] is True
    assert str(tmp_path) not in r.text and "Traceback" not in r.text


def test_projection_of_the_wrong_shape_is_refused(tmp_path, encoder):
    idx = build_index(
        write_jsonl(tmp_path / "tiny.jsonl", TINY_CORPUS[:3]),
        tmp_path / "proj",
        encoder=encoder,
        projection_dim=8,
    )
    bad = tamper(idx, tmp_path / "bad", "projection.npy", lambda a: a[:, :-1])
    with pytest.raises(IndexCorruptError, match=r"projection\.npy"):
        ColBERTServe.open(bad, encoder=encoder, batching=False)


@pytest.mark.parametrize("command", ["search", "serve"])
def test_cli_on_a_tampered_index_is_one_line_and_exit_2(tmp_path, index_dir, command):
    idx = tamper(index_dir, tmp_path / "idx", "ivf_docs.npy", setting(0, DOCS))
    argv = ["index", command, str(idx)] + (
        ["iron tower"] if command == "search" else ["--port", str(free_port())]
    )
    out = subprocess.run(
        [sys.executable, "-m", "plait.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "ivf_docs.npy" in out.stderr
