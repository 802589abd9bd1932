"""A predictor's own plait LM (`predictor.set_lm(plait.LM(...))`) survives saving and loading,
without DSPy's `allow_unsafe_lm_state` (issue 20 item 6); any other LM state is refused.

DSPy refuses to rebuild the engine a plait LM runs on unless told to trust the whole file,
which also lets a file point an LM at any endpoint or import any class. plait rebuilds a
plait LM from plain values only (a model, known engine options and sampling settings) and
refuses everything else, importing nothing the file names. No engine is loaded: LMs are lazy.
"""

import json
import sys

import dspy
import pytest

import plait
from plait.compilers import ArtifactCorruptError, LMStateError, load_artifact, load_program, save_artifact
from plait.errors import PlaitError
from plait.pipelines.sentiment import Sentiment

PATH = "plait.pipelines.sentiment:Sentiment"

#: An engine class that leaves a marker beside itself when its module is imported.
HOSTILE_ENGINE = """
import pathlib

pathlib.Path(__file__).with_name("MARKER").write_text("executed")


class Engine:
    @classmethod
    def load_state(cls, state):
        return cls()

    def complete(self, request):
        raise RuntimeError("never")
"""


def _with_lm(**settings) -> Sentiment:
    program = Sentiment()
    program.classify.set_lm(plait.LM("smollm2-135m", **settings))
    return program


SETTINGS = [
    {"temperature": 0.3, "max_tokens": 64, "max_batch_size": 4},
    {"quantize": "int4", "reasoning": "low", "stop": ["\n\n"], "seed": 7, "cache": False},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_a_dspy_save_with_a_plait_lm_loads_back_with_that_lm(tmp_path, settings):
    saved = _with_lm(**settings)
    saved.save(str(tmp_path / "p.json"))
    with pytest.raises(ValueError, match="allow_unsafe_lm_state"):  # DSPy's own load refuses it
        Sentiment().load(str(tmp_path / "p.json"))
    loaded = load_program(Sentiment(), tmp_path / "p.json")
    lm = loaded.classify.lm
    assert isinstance(lm, dspy.LM) and lm.model == saved.classify.lm.model
    assert lm.dump_state() == saved.classify.lm.dump_state()  # same engine options and settings
    assert loaded.dump_state() == saved.dump_state()


def test_an_artifact_with_a_plait_lm_per_predictor_loads(tmp_path):
    path = tmp_path / "a.json"
    saved = _with_lm(**SETTINGS[0])
    save_artifact(saved, path, program_path=PATH, model="smollm2-135m")
    loaded = load_artifact(path)
    assert loaded.program.classify.lm.dump_state() == saved.classify.lm.dump_state()


def _lm_state(tmp_path) -> tuple:
    path = tmp_path / "p.json"
    _with_lm(**SETTINGS[0]).save(str(path))
    document = json.loads(path.read_text())
    return path, document, document["classify"]["lm"]


def _set(state: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for part in parents:
        state = state[part]
    state[key] = value


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("api_base", "http://attacker.example/v1", "api_base"),  # DSPy's own unsafe keys
        ("base_url", "http://attacker.example/v1", "base_url"),
        ("api_key", "sk-x", "api_key"),
        ("_dspy_lm_class", "evil_engine.Engine", "evil_engine.Engine"),
        ("engine.class", "evil_engine:Engine", "evil_engine:Engine"),
        ("async_engine.class", "evil_engine:Engine", "evil_engine:Engine"),
        ("engine.state.model", "http://attacker.example/v1", "attacker.example"),  # a remote engine
        ("engine.state.engine_options.trust_remote_code", True, "trust_remote_code"),
        ("engine.state.engine_options.max_batch_size", {"nested": 1}, "max_batch_size"),
        ("engine.state.extra", 1, "extra"),
        ("temperature", [0.3], "temperature"),
        ("response_format", {"type": "json_object"}, "response_format"),
        ("model", "plait/another-model", "plait/another-model"),  # does not match its engine
        ("model_type", "responses", "model_type"),
        ("launch_kwargs", {"cmd": "rm -rf /"}, "launch_kwargs"),
    ],
)
def test_other_lm_state_is_refused_and_names_what_it_refused(tmp_path, monkeypatch, key, value, needle):
    (tmp_path / "evil_engine.py").write_text(HOSTILE_ENGINE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path, document, state = _lm_state(tmp_path)
    _set(state, key, value)
    path.write_text(json.dumps(document))
    with pytest.raises(LMStateError) as info:
        load_program(Sentiment(), path)
    message = str(info.value)
    assert isinstance(info.value, PlaitError) and needle in message and "classify" in message
    assert not (tmp_path / "MARKER").exists() and "evil_engine" not in sys.modules
    artifact = tmp_path / "a.json"
    save_artifact(Sentiment(), artifact, program_path=PATH, model="smollm2-135m")
    wrapped = json.loads(artifact.read_text())
    wrapped["state"]["classify"]["lm"] = state
    artifact.write_text(json.dumps(wrapped))
    with pytest.raises(LMStateError, match=needle):
        load_artifact(artifact)
    assert not (tmp_path / "MARKER").exists() and "evil_engine" not in sys.modules


def test_an_lm_that_is_not_a_plait_lm_is_refused(tmp_path):
    program = Sentiment()
    program.classify.set_lm(dspy.LM("openai/gpt-4o-mini"))
    program.save(str(tmp_path / "p.json"))
    with pytest.raises(LMStateError, match="openai/gpt-4o-mini"):
        load_program(Sentiment(), tmp_path / "p.json")


def test_load_program_reads_json_only_and_reports_bad_files(tmp_path):
    with pytest.raises(LMStateError, match="JSON"):
        load_program(Sentiment(), tmp_path / "p.pkl")
    (tmp_path / "bad.json").write_text('{"classify": ')
    with pytest.raises(ArtifactCorruptError, match="not valid JSON"):
        load_program(Sentiment(), tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text('{"classify": {"demos": 3}}')
    with pytest.raises(ArtifactCorruptError, match="does not load"):
        load_program(Sentiment(), tmp_path / "wrong.json")
    plain = Sentiment()
    plain.save(str(tmp_path / "plain.json"))  # no LM: the same as dspy's load
    assert load_program(Sentiment(), tmp_path / "plain.json").classify.lm is None
