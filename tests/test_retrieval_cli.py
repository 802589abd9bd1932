"""`plait index` refuses out-of-range numbers when it parses its arguments: one line, exit 2.

The paths given do not exist, so an error naming the option (not the missing file) shows the
check ran at parse time, before anything was opened, encoded or bound.
"""

from __future__ import annotations

import pytest

from plait.cli import main
from plait.retrievers import build_index
from plait.retrievers.encoder import ColBERTEncoder
from plait.retrievers.errors import SettingsError
from tests.retrieval_fixtures import TINY_CORPUS, write_jsonl

BUILD = ["index", "build", "missing.jsonl", "--out", "missing-idx"]
SEARCH = ["index", "search", "missing-idx", "a query"]
SERVE = ["index", "serve", "missing-idx"]


@pytest.mark.parametrize(
    "argv,option",
    [
        (BUILD + ["--centroids", "0"], "--centroids"),
        (BUILD + ["--centroids", "-1"], "--centroids"),
        (BUILD + ["--centroids", "ten"], "--centroids"),
        (BUILD + ["--chunk-size", "0"], "--chunk-size"),
        (BUILD + ["--batch-size", "0"], "--batch-size"),
        (BUILD + ["--projection-dim", "0"], "--projection-dim"),
        (BUILD + ["--threads", "0"], "--threads"),
        (SEARCH + ["-k", "0"], "-k"),
        (SEARCH + ["-k", "1001"], "-k"),
        (SEARCH + ["--alpha", "2"], "--alpha"),
        (SEARCH + ["--alpha", "nan"], "--alpha"),
        (SEARCH + ["--batch", "0"], "--batch"),
        (SEARCH + ["--threads", "-2"], "--threads"),
        (SERVE + ["--port", "0"], "--port"),
        (SERVE + ["--port", "70000"], "--port"),
        (SERVE + ["--threads", "0"], "--threads"),
    ],
)
def test_bad_numeric_option_is_refused_at_parse_time(capsys, argv, option):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument {option}" in err[0], err


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_centroids": 0}, "num_centroids"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"projection_dim": 385}, "projection_dim"),  # more dims than MiniLM's 384 hidden units
    ],
)
def test_build_index_refuses_settings_that_cannot_work(tmp_path, settings, match):
    corpus = write_jsonl(tmp_path / "c.jsonl", TINY_CORPUS[:2])
    with pytest.raises(SettingsError, match=match):
        build_index(corpus, tmp_path / "idx", encoder=ColBERTEncoder.load(), **settings)
    assert not (tmp_path / "idx").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
