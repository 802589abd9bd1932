"""Compiled artifacts: round trip, signature mismatch, corrupt files, file-path programs.
No LM calls: artifacts are state, not behaviour."""

import json
import textwrap

import dspy
import pytest

from plait.compilers import (
    ArtifactCorruptError,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    ProgramLoadError,
    load_artifact,
    load_program_class,
    save_artifact,
)
from plait.errors import PlaitError
from plait.pipelines.sentiment import Sentiment

PATH = "plait.pipelines.sentiment:Sentiment"


def _compiled() -> Sentiment:
    program = Sentiment()
    program.classify.demos = [
        Sentiment.from_row({"text": "a triumph", "label": 1}),
        Sentiment.from_row({"text": "a mess", "label": 0}),
    ]
    program.classify.signature = program.classify.signature.with_instructions("Decide the sentiment.")
    return program


def test_round_trip(tmp_path):
    path = tmp_path / "sentiment.json"
    sha = save_artifact(_compiled(), path, program_path=PATH, model="smollm2-135m", extra={"score": 81.5})
    loaded = load_artifact(path)
    assert isinstance(loaded.program, Sentiment)
    assert loaded.program_path == PATH and loaded.model == "smollm2-135m" and loaded.meta == {"score": 81.5}
    assert loaded.sha256 == sha and loaded.plait_version
    assert loaded.program.classify.signature.instructions == "Decide the sentiment."
    assert [d["label"] for d in loaded.program.classify.demos] == ["positive", "negative"]
    assert loaded.program.dump_state() == _compiled().dump_state()
    assert json.loads(path.read_text())["format"] == "plait-artifact"  # plain JSON, no pickle


def test_program_from_a_file_and_init_arguments(tmp_path):
    source = tmp_path / "myprog.py"
    source.write_text(
        textwrap.dedent("""
        import dspy

        class Echo(dspy.Module):
            def __init__(self, style: str = "plain"):
                super().__init__()
                self.style = style
                self.answer = dspy.Predict("question -> answer")

            def forward(self, question):
                return self.answer(question=question)
    """)
    )
    cls = load_program_class(f"{source}:Echo")
    assert cls is load_program_class(f"{source}:Echo")  # imported once
    program = cls(style="terse")
    program.answer.demos = [dspy.Example(question="1+1?", answer="2")]
    artifact = tmp_path / "echo.json"
    save_artifact(program, artifact, program_path="myprog.py:Echo", model="m", init={"style": "terse"})
    loaded = load_artifact(artifact, program=f"{source}:Echo")  # a file: only when the user names it
    assert loaded.program.style == "terse" and loaded.init == {"style": "terse"}
    assert loaded.program_path == "myprog.py:Echo"
    assert load_artifact(artifact, init={"style": "loud"}, program=f"{source}:Echo").program.style == "loud"


def test_signature_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "a.json"
    save_artifact(_compiled(), path, program_path=PATH, model="smollm2-135m")
    document = json.loads(path.read_text())
    document["program"] = "dspy:ChainOfThought"
    path.write_text(json.dumps(document))
    with pytest.raises(ProgramLoadError):  # ChainOfThought needs a signature argument
        load_artifact(path)
    document["program"] = PATH
    document["signature_hash"] = "0" * 16  # compiled when the program had other fields
    path.write_text(json.dumps(document))
    with pytest.raises(ArtifactMismatchError, match="recompile"):
        load_artifact(path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: "not json at all",
        lambda text: json.dumps({"hello": "world"}),  # JSON, but not an artifact
        lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "state"}),
        lambda text: json.dumps({**json.loads(text), "state": {"nope": {}}}),  # state of another program
        lambda text: json.dumps({**json.loads(text), "format_version": 99}),
    ],
)
def test_corrupt_artifacts(tmp_path, damage):
    path = tmp_path / "a.json"
    save_artifact(_compiled(), path, program_path=PATH, model="smollm2-135m")
    path.write_text(damage(path.read_text()))
    with pytest.raises(ArtifactCorruptError) as info:
        load_artifact(path)
    assert isinstance(info.value, PlaitError) and str(path) in str(info.value)


def test_missing_artifact_and_bad_program_paths(tmp_path):
    with pytest.raises(ArtifactNotFoundError):
        load_artifact(tmp_path / "nope.json")
    for target in [
        "no_colon",
        "plait.pipelines.sentiment:Nope",
        "no.such.module:X",
        "missing.py:X",
        "plait.pipelines.sentiment:LABELS",
    ]:
        with pytest.raises(ProgramLoadError):
            load_program_class(target)
