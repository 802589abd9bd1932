"""Loading an artifact runs no code the user did not choose (issue #12, item 3), and a hostile
artifact file is one clear error, not a traceback (item 7).

The hostile program is a real file that writes a marker when it is imported: every refusal is
checked by that marker never appearing. The CLI cases run `plait` as a real subprocess in the
artifact's directory, where `python -m` puts that directory on `sys.path`.
"""

import json
import sys

import pytest

from plait.compilers import (
    ArtifactCorruptError,
    ArtifactMismatchError,
    ProgramLoadError,
    load_artifact,
    save_artifact,
)
from plait.compilers.runner import EvalConfig, evaluate_program
from plait.errors import PlaitError
from plait.pipelines.sentiment import Sentiment
from plait.store import Store
from tests.lifecycle_fixtures import keyword_lm, run, write_jsonl

PATH = "plait.pipelines.sentiment:Sentiment"

#: A program file that leaves a marker beside itself when it is executed.
HOSTILE = """
import pathlib

import dspy

pathlib.Path(__file__).with_name("MARKER").write_text("executed")


class {name}(dspy.Module):
    def __init__(self):
        super().__init__()
        self.classify = dspy.Predict("text -> label")

    def forward(self, text):
        return self.classify(text=text)
"""


def _artifact(tmp_path, program: str, name: str = "a.json"):
    path = tmp_path / name
    save_artifact(Sentiment(), path, program_path=PATH, model="smollm2-135m")
    document = json.loads(path.read_text())
    document["program"] = program
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def hostile(tmp_path):
    (tmp_path / "evil.py").write_text(HOSTILE.format(name="Evil"))
    return tmp_path / "MARKER"


@pytest.mark.parametrize(
    "program",
    [
        "evil.py:Evil",  # a file beside the artifact
        "{dir}/evil.py:Evil",  # an absolute path
        "../{base}/evil.py:Evil",
        "evil:Evil",  # a module importable only from the artifact's (= working) directory
        "this:Foo",  # any module of the standard library: `this` prints the Zen of Python
        "os:system",
        "plait.__main__:Main",  # a script, not a module of programs
    ],
)
def test_an_artifact_cannot_run_code_the_user_did_not_choose(tmp_path, hostile, monkeypatch, capsys, program):
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m plait.cli` run in that directory
    monkeypatch.delitem(sys.modules, "this", raising=False)
    path = _artifact(tmp_path, program.format(dir=tmp_path, base=tmp_path.name))
    with pytest.raises(ProgramLoadError) as info:
        load_artifact(path)
    message = str(info.value)
    assert isinstance(info.value, PlaitError) and program.split(":")[0].split("/")[-1] in message
    assert not hostile.exists(), "the artifact's program was executed"
    assert "this" not in sys.modules and "Zen of Python" not in capsys.readouterr().out
    assert "evil" not in sys.modules


def test_file_programs_are_refused_with_a_way_out(tmp_path, hostile):
    with pytest.raises(ProgramLoadError, match="--program evil.py:Evil"):
        load_artifact(_artifact(tmp_path, "evil.py:Evil"))
    assert not hostile.exists()


def test_installed_and_already_imported_programs_load(tmp_path, monkeypatch):
    assert isinstance(load_artifact(_artifact(tmp_path, PATH)).program, Sentiment)
    # a module the user imported himself runs no code when an artifact names it again
    (tmp_path / "mine.py").write_text(HOSTILE.format(name="Mine"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ProgramLoadError, match="not part of an installed package"):
        load_artifact(_artifact(tmp_path, "mine:Mine"))
    assert not (tmp_path / "MARKER").exists()
    monkeypatch.delitem(sys.modules, "mine", raising=False)  # forgotten after the test
    import mine  # the user's choice: this runs it

    path = tmp_path / "mine.json"
    save_artifact(mine.Mine(), path, program_path="mine:Mine", model="m")
    assert isinstance(load_artifact(path).program, mine.Mine)


def test_a_named_program_must_have_the_artifacts_class_and_signature(tmp_path):
    source = tmp_path / "echo.py"
    source.write_text(
        "import dspy\n\n\nclass Echo(dspy.Module):\n    def __init__(self):\n        super().__init__()\n"
        '        self.answer = dspy.Predict("question -> answer")\n'
    )
    from plait.compilers import load_program_class

    artifact = tmp_path / "echo.json"
    save_artifact(load_program_class(f"{source}:Echo")(), artifact, program_path="echo.py:Echo", model="m")
    with pytest.raises(ProgramLoadError, match="--program echo.py:Echo"):
        load_artifact(artifact)
    (tmp_path / "other.py").write_text(source.read_text().replace("Echo", "Other"))
    with pytest.raises(ArtifactMismatchError, match="compiled for Echo"):
        load_artifact(artifact, program=f"{tmp_path / 'other.py'}:Other")
    (tmp_path / "changed.py").write_text(source.read_text().replace("question -> answer", "q -> a"))
    with pytest.raises(ArtifactMismatchError, match="recompile"):
        load_artifact(artifact, program=f"{tmp_path / 'changed.py'}:Echo")


def test_eval_of_a_compiled_file_program_uses_the_file_the_user_names(tmp_path, data_dir):
    source = tmp_path / "senti.py"
    source.write_text(
        "from plait.pipelines.sentiment import Sentiment as Base\n\n\nclass Mine(Base):\n    pass\n"
    )
    from plait.compilers import load_program_class

    compiled = load_program_class(f"{source}:Mine")()
    compiled.classify.demos = [Sentiment.from_row({"text": "a triumph", "label": 1})]
    artifact = tmp_path / "mine.json"
    save_artifact(compiled, artifact, program_path="senti.py:Mine", model="m")
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "a great film", "label": 1}])
    store = Store.open(f"sqlite:///{tmp_path / 'plait.db'}")
    try:
        config = EvalConfig(
            program=f"{source}:Mine", devset=str(dev), compiled=str(artifact), adapter="chat", threads=1
        )
        outcome = evaluate_program(config, store, lm=keyword_lm())
    finally:
        store.close()
    assert outcome.report.n == 1 and outcome.report.score == 100.0


# ---- the CLI, as a user runs it in the artifact's directory ------------------------------------
def _one_line(result, *needles):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]


@pytest.mark.parametrize(
    "program, needle",
    [("evil.py:Evil", "--program"), ("evil:Evil", "installed package"), ("this:Foo", "standard library")],
)
def test_plait_serve_refuses_a_hostile_artifact_without_running_it(tmp_path, hostile, program, needle):
    path = _artifact(tmp_path, program, "evil.json")
    result = run(["serve", str(path), "--no-traces"], tmp_path / "home", cwd=tmp_path, timeout=120)
    _one_line(result, needle, "evil.json")
    assert not hostile.exists() and "Zen of Python" not in result.stdout + result.stderr


def test_plait_eval_loads_the_program_it_is_told_not_the_artifacts(tmp_path, hostile):
    path = _artifact(tmp_path, "evil.py:Evil", "evil.json")
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "fine", "label": 1}])
    argv = ["eval", PATH, "--compiled", str(path), "--devset", str(dev), "--db", f"sqlite:///{tmp_path}/p.db"]
    result = run(argv, tmp_path / "home", cwd=tmp_path, timeout=120)
    _one_line(result, "Evil", "Sentiment")
    assert not hostile.exists()


# ---- hostile JSON ------------------------------------------------------------------------------
def test_json_nested_thousands_deep_is_a_corrupt_artifact(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"format": "plait-artifact", "state": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ArtifactCorruptError, match="nested"):
        load_artifact(path)
    result = run(["serve", str(path), "--no-traces"], tmp_path / "home", timeout=120)
    _one_line(result, "nested")


def test_state_nested_under_the_parsers_limit_is_refused_too(tmp_path):
    """900 levels parse, but every later walk of the state (hashing, copying) would overflow."""
    path = _artifact(tmp_path, PATH)
    deep = "[" * 900 + "]" * 900
    path.write_text(path.read_text().replace('"demos": []', f'"demos": [{{"text": {deep}}}]', 1))
    with pytest.raises(ArtifactCorruptError, match="nested"):
        load_artifact(path)


@pytest.mark.parametrize("key, value", [("program", 7), ("program", ["a:B"]), ("model", None)])
def test_fields_of_the_wrong_type_are_corrupt(tmp_path, key, value):
    path = _artifact(tmp_path, PATH)
    document = json.loads(path.read_text())
    document[key] = value
    path.write_text(json.dumps(document))
    with pytest.raises(ArtifactCorruptError, match=key):
        load_artifact(path)
