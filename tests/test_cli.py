"""The `plait` command: real subprocesses, one-line errors with exit code 2."""

import json
import os
import re
import subprocess
import sys

import pytest


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "plait.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_models_lists_the_embedded_model():
    out = run("models")
    assert out.returncode == 0
    assert "smollm2-135m" in out.stdout and "yes" in out.stdout


def test_generate_answers_with_the_chat_template():
    out = run(
        "generate",
        "-m",
        "smollm2-135m",
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "16",
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_generate_with_int4_weights():
    out = run(
        "generate",
        "-m",
        "smollm2-135m",
        "--quantize",
        "int4",
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "16",
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_generate_raw_and_stream():
    raw = run("generate", "--raw", "The capital of France is", "--max-tokens", "4")
    streamed = run("generate", "--raw", "The capital of France is", "--max-tokens", "4", "--stream")
    assert raw.returncode == streamed.returncode == 0
    assert raw.stdout.strip() and raw.stdout.strip() == streamed.stdout.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "-m", "no-such-model", "hi"), "unknown model"),
        (("generate", "-m", "/nonexistent/dir", "hi"), "unknown model"),
        (("generate", "--max-tokens", "0", "hi"), "max-tokens"),
        (("generate",), "required"),
        (("generate", "--temperature", "-1", "hi"), "temperature"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = run(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_corrupt_checkpoint_and_long_prompt(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    out = run("generate", "-m", str(bad), "hi")
    assert out.returncode == 2 and "GGUF" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run("generate", "--raw", "word " * 9000)
    assert out.returncode == 2 and "context window" in out.stderr


def test_constrained_generation_flags(tmp_path):
    schema = tmp_path / "user.schema.json"
    schema.write_text(
        '{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, '
        '"age": {"type": "integer", "minimum": 0, "maximum": 120}}, '
        '"required": ["name", "age"], "additionalProperties": false}'
    )
    grammar = tmp_path / "expr.lark"
    grammar.write_text('start: expr\nexpr: NUMBER ("+" NUMBER)*\nNUMBER: /[0-9]{1,3}/\n')
    out = run("generate", "Is water wet?", "--choice", "yes", "--choice", "no")
    assert out.returncode == 0 and out.stdout.strip() in {"yes", "no"}
    out = run("generate", "A user record", "--json-schema", str(schema), "--max-tokens", "60")
    record = json.loads(out.stdout)
    assert set(record) == {"name", "age"} and 0 <= record["age"] <= 120
    out = run("generate", "2+2=", "--regex", "[0-9]+", "--max-tokens", "5")
    assert re.fullmatch(r"[0-9]+", out.stdout.strip())
    out = run("generate", "Write a sum", "--grammar", str(grammar), "--max-tokens", "30")
    assert re.fullmatch(r"[0-9]{1,3}(\+[0-9]{1,3})*", out.stdout.strip())


@pytest.mark.parametrize(
    "args", [("--regex", "["), ("--choice", "a", "--regex", "b"), ("--json-schema", "/nonexistent.json")]
)
def test_bad_constraints_are_one_line_errors(args):
    out = run("generate", "x", *args)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


# ---- plait serve: settings checked before anything loads (issue #12, item 10) --------------------
@pytest.fixture
def artifact(tmp_path):
    from plait.compilers import save_artifact
    from plait.pipelines.sentiment import Sentiment

    path = tmp_path / "a.json"
    save_artifact(Sentiment(), path, program_path="plait.pipelines.sentiment:Sentiment", model="smollm2-135m")
    return path


def _one_line(out, *needles):
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]


def test_serve_two_artifacts_with_one_name_says_how_to_name_them(artifact, tmp_path):
    (tmp_path / "v2").mkdir()
    other = tmp_path / "v2" / "a.json"
    other.write_bytes(artifact.read_bytes())
    _one_line(run("serve", str(artifact), str(artifact), "--no-traces"), "'a'", "NAME=")
    _one_line(run("serve", str(artifact), str(other), "--no-traces"), "'a'", f"a2={other}")


@pytest.mark.parametrize(
    "url, needle", [("garbage://x", "database URL"), ("sqlite:///{tmp}/no/such/dir/t.db", "does not exist")]
)
def test_serve_bad_database_is_one_line(artifact, tmp_path, url, needle):
    _one_line(run("serve", str(artifact), "--db", url.format(tmp=tmp_path)), needle)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("flag", ["--max-tokens", "--max-batch-size", "--workers"])
@pytest.mark.parametrize("value", ["0", "-4"])
def test_serve_zero_or_negative_counts_are_usage_errors(artifact, flag, value):
    _one_line(run("serve", str(artifact), "--no-traces", flag, value), flag)
