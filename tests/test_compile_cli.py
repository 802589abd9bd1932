"""`plait compile` / `plait eval` as a user runs them: bad input is one line and exit 2; with the
embedded model, eval writes its JSON report and a compile killed with SIGKILL resumes without
re-evaluating what it had finished (checked in the store)."""

import json
import os
import signal
import subprocess
import time

import pytest

from plait.compilers import save_artifact
from plait.pipelines.sentiment import Sentiment
from plait.store import Store
from tests.lifecycle_fixtures import (
    REPO,
    cli_main,
    plait_command,
    shared_weights,
    sst2_rows,
    subprocess_env,
    write_jsonl,
)

PROGRAM = "plait.pipelines.sentiment:Sentiment"


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    shared_weights(home)
    monkeypatch.setenv("PLAIT_HOME", str(home))
    monkeypatch.delenv("PLAIT_DATABASE_URL", raising=False)
    return home


@pytest.fixture
def sst2(tmp_path, data_dir):
    return (
        write_jsonl(tmp_path / "train.jsonl", sst2_rows(data_dir, "train", 8)),
        write_jsonl(tmp_path / "dev.jsonl", sst2_rows(data_dir, "dev", 8)),
    )


def _one_line_error(capsys, argv, match):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_input_is_one_line_and_exit_2(home, sst2, tmp_path, capsys):
    train, dev = sst2
    base = [
        "compile",
        PROGRAM,
        "--trainset",
        str(train),
        "--devset",
        str(dev),
        "--out",
        str(tmp_path / "o.json"),
    ]
    _one_line_error(capsys, [*base, "--metric", "nope"], "unknown metric")
    _one_line_error(capsys, [*base[:3], str(tmp_path / "missing.jsonl"), *base[4:]], "dataset not found")
    _one_line_error(capsys, ["compile", "no.such:Prog", *base[2:]], "cannot import module")
    _one_line_error(capsys, [*base, "--optimizer", "nope"], "invalid choice")
    _one_line_error(capsys, [*base, "--program-arg", "novalue"], "key=value")
    _one_line_error(
        capsys, [*base, "--optimizer-arg", "max_bootstrapped_demos=2", "--optimizer-arg", "x"], "key=value"
    )
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "plait-artifact", "trunc')
    _one_line_error(
        capsys, ["eval", PROGRAM, "--compiled", str(corrupt), "--devset", str(dev)], "not valid JSON"
    )
    _one_line_error(capsys, ["eval", PROGRAM, "--devset", str(dev), "--offset", "100"], "no rows")


@pytest.mark.slow
def test_eval_json_report_on_the_embedded_model(home, sst2, tmp_path, capsys):
    _, dev = sst2
    compiled = Sentiment()
    compiled.classify.demos = [
        Sentiment.from_row(row)
        for row in [
            {"text": "a gorgeous , witty film", "label": 1},
            {"text": "dull and lifeless", "label": 0},
        ]
    ]
    artifact = tmp_path / "sentiment.json"
    save_artifact(compiled, artifact, program_path=PROGRAM, model="smollm2-135m")
    out = tmp_path / "report.json"
    assert (
        cli_main(
            [
                "eval",
                PROGRAM,
                "--compiled",
                str(artifact),
                "--devset",
                str(dev),
                "--limit",
                "4",
                "--threads",
                "4",
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert {"score", "n", "parse_failures", "results"} <= set(report)
    assert report["n"] == 4 and len(report["results"]) == 4 and 0 <= report["score"] <= 100
    assert report["parse_failures"] == 0  # grammar-constrained: the 135M model always parses
    assert all(r["prediction"]["label"] in ("negative", "positive") for r in report["results"])
    assert report["score"] == pytest.approx(100 * sum(r["score"] for r in report["results"]) / 4)
    assert report["tokens"] > 0 and report["seconds"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 4


@pytest.mark.slow
def test_killed_compile_resumes_without_redoing_finished_examples(home, sst2, tmp_path):
    train, dev = sst2
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    argv = [
        *plait_command(),
        "compile",
        PROGRAM,
        "--trainset",
        str(train),
        "--devset",
        str(dev),
        "--optimizer",
        "labeled",
        "--threads",
        "2",
        "--out",
        str(tmp_path / "out.json"),
        "--db",
        db,
    ]
    process = subprocess.Popen(
        argv,
        env=subprocess_env(home),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    store = Store.open(db)
    try:
        deadline = time.monotonic() + 600
        finished: list = []
        while time.monotonic() < deadline and process.poll() is None:
            runs = store.runs(kind="compile")
            finished = store.evaluations(runs[0].id, phase="baseline") if runs else []
            if len(finished) >= 3:
                break
            time.sleep(0.2)
        assert process.poll() is None, f"compile ended before it could be killed: {process.stderr.read()}"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        (run,) = store.runs(kind="compile")
        assert run.status == "running"  # killed: it never got to say otherwise
        killed = {e.example_hash: e.id for e in store.evaluations(run.id, phase="baseline")}
        assert 3 <= len(killed) < 8

        done = subprocess.run(
            argv, env=subprocess_env(home), cwd=REPO, capture_output=True, text=True, timeout=900, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "resumed" in done.stderr
        resumed = store.get_run(run.id)
        assert (
            resumed.status == "finished" and resumed.attempts == 2 and store.runs(kind="compile") == [resumed]
        )
        baseline = store.evaluations(run.id, phase="baseline")
        assert sorted(e.example_index for e in baseline) == list(range(8))  # each example scored once
        for example, row_id in killed.items():
            assert [e.id for e in baseline if e.example_hash == example] == [row_id]
        assert resumed.summary["reused_examples"] >= len(killed)
        assert len(store.evaluations(run.id, phase="final")) == 8
        assert json.loads((tmp_path / "out.json").read_text())["extra"]["run_id"] == run.id
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        store.close()


def test_dspy_quiet_silences_dspy_bars_and_info_logs_only_while_it_runs(capsys):
    import io
    import logging

    import tqdm

    from plait.compilers.commands import dspy_quiet

    dspy_log = logging.getLogger("dspy.evaluate")
    bar_output = io.StringIO()
    with dspy_quiet():
        for _ in tqdm.tqdm(range(3), disable=False, file=bar_output):
            pass
        print("Bootstrapped 1 full traces")
        assert not logging.getLogger("dspy").isEnabledFor(logging.INFO)
        assert dspy_log.isEnabledFor(logging.WARNING)
    assert bar_output.getvalue() == ""
    for _ in tqdm.tqdm(range(3), disable=False, file=bar_output):  # outside: DSPy's bars again
        pass
    assert "3/3" in bar_output.getvalue()
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_compile_prints_plaits_progress_not_dspys(home, sst2, tmp_path, capsys):
    """BootstrapFewShot draws a tqdm bar and logs INFO lines of its own; the CLI shows neither."""
    train, dev = sst2
    argv = [
        "compile",
        PROGRAM,
        "--trainset",
        str(train),
        "--devset",
        str(dev),
        "--limit",
        "4",
        "--optimizer",
        "bootstrap",
        "--optimizer-arg",
        "max_bootstrapped_demos=1",
        "--out",
        str(tmp_path / "o.json"),
        "--db",
        f"sqlite:///{tmp_path / 'runs.db'}",
    ]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "wrote" in captured.err and "score" in captured.err  # plait's own summary
    for dspy_output in ("it/s]", "Bootstrapped", "Average Metric"):
        assert dspy_output not in printed, printed
