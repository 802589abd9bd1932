"""`plait index build` reports every long stage as it goes (issue 20 item 4: a 4,951-document
build printed nothing for 9.4 minutes): bars on a terminal, plain lines on a pipe or log file,
nothing with --quiet. All on stderr; stdout keeps the one summary line."""

from __future__ import annotations

import io

import pytest
import torch

from plait.cli import main
from plait.retrievers import build_index
from plait.retrievers.build import STAGES
from plait.retrievers.encoder import ColBERTEncoder
from tests.retrieval_fixtures import TINY_CORPUS, write_jsonl

torch.set_num_threads(min(2, torch.get_num_threads()))


class Recorder:
    """A `BuildProgress` that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, stage: str, total: int | None, unit: str) -> None:
        self.calls.append(("start", stage, total, unit))

    def update(self, stage: str, completed: int) -> None:
        self.calls.append(("update", stage, completed))

    def finish(self, stage: str) -> None:
        self.calls.append(("finish", stage))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "tiny.jsonl", TINY_CORPUS)


def test_build_index_reports_each_stage_in_order_with_counts(tmp_path, corpus):
    progress = Recorder()
    build_index(
        corpus,
        tmp_path / "idx",
        encoder=ColBERTEncoder.load(),
        chunk_size=3,
        kmeans_iterations=4,
        progress=progress,
    )
    started = [c[1:] for c in progress.calls if c[0] == "start"]
    assert [s[0] for s in started] == list(STAGES)
    assert [c[1] for c in progress.calls if c[0] == "finish"] == list(STAGES)
    encode, kmeans, *_ = STAGES
    assert started[0] == (encode, len(TINY_CORPUS), "docs")  # the file's documents are counted first
    assert [c[2] for c in progress.calls if c[:2] == ("update", encode)] == [3, 6, 8]
    assert [c[2] for c in progress.calls if c[:2] == ("update", kmeans)] == [1, 2, 3, 4]
    for stage, total, _ in started:  # every stage ends at its total
        assert [c[2] for c in progress.calls if c[:2] == ("update", stage)][-1] == total


def test_cli_build_prints_stage_lines_to_stderr_when_not_a_terminal(tmp_path, corpus, capsys):
    assert main(["index", "build", str(corpus), "--out", str(tmp_path / "idx"), "--chunk-size", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and f"{len(TINY_CORPUS)} docs" in captured.out
    lines = captured.err.splitlines()
    assert "\x1b" not in captured.err and "\r" not in captured.err  # plain lines, no cursor moves
    for stage in STAGES:
        begun = [i for i, line in enumerate(lines) if line.startswith(f"{stage}:") and "done" not in line]
        ended = [i for i, line in enumerate(lines) if line.startswith(f"{stage}: done")]
        assert len(begun) >= 1 and len(ended) == 1 and begun[0] < ended[0], (stage, lines)
    assert f"{STAGES[0]}: done, {len(TINY_CORPUS)}/{len(TINY_CORPUS)} docs in " in captured.err


def test_cli_build_quiet_prints_only_the_summary(tmp_path, corpus, capsys):
    assert main(["index", "build", str(corpus), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and f"{len(TINY_CORPUS)} docs" in captured.out


def test_terminal_progress_draws_bars_for_each_stage():
    from rich.console import Console

    from plait.retrievers.commands import BuildReporter

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with BuildReporter(console) as reporter:
        reporter.start(STAGES[0], 8, "docs")
        reporter.update(STAGES[0], 8)
        reporter.finish(STAGES[0])
        reporter.start(STAGES[1], None, "iterations")
        reporter.finish(STAGES[1])
    text = out.getvalue()
    assert STAGES[0] in text and "8/8" in text and STAGES[1] in text
