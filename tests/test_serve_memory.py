"""`plait serve` under load it must not grow from: calls are admitted per engine sequence, the
engine's memory is in `/metrics`, JSON mode closes within a tiny max_tokens, and an artifact
compiled from a file is served only with the `--program` the user names (real server on
loopback, embedded model)."""

from __future__ import annotations

import json
import re
import textwrap

import httpx
import jsonschema
import pytest

from plait.serve.app import create_app
from tests.serve_fixtures import API_KEY, MODEL, ServerThread, model_runtime, save_program

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer"},
        "districts": {"type": "array", "items": {"type": "string"}},
        "mayor": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
            "required": ["name", "born"],
        },
    },
    "required": ["city", "population", "districts", "mayor"],
}


@pytest.fixture(scope="module")
def client():
    runtime = model_runtime(max_inflight=8, max_tokens_limit=512)
    with ServerThread(create_app(runtime)) as server:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=300) as c:
            yield c
    runtime.close()


def test_admission_counts_sequences_not_calls(client):
    body = {"model": MODEL, "prompt": ["Once upon a time"] * 4, "n": 3, "max_tokens": 2}
    refused = client.post("/v1/completions", json=body)  # 12 generations > 8 admitted at once
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_generations"
    body["n"] = 2
    answered = client.post("/v1/completions", json=body)
    assert answered.status_code == 200 and len(answered.json()["choices"]) == 8


def test_metrics_report_the_engines_memory(client):
    client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    text = client.get("/metrics").text
    budget = re.search(r'plait_engine_state_budget_bytes\{model="smollm2-135m"\} (\d+)', text)
    held = re.search(r'plait_engine_state_bytes\{model="smollm2-135m"\} (\d+)', text)
    assert budget and held and 0 < int(held.group(1)) <= int(budget.group(1))
    assert re.search(r'plait_engine_prefix_cache_budget_bytes\{model="smollm2-135m"\} [1-9]', text)
    assert re.search(r'plait_engine_preemptions\{model="smollm2-135m"\} \d', text)


@pytest.mark.parametrize("max_tokens", [40, 64])
def test_json_mode_closes_within_a_small_max_tokens(client, max_tokens):
    """The schema's answer does not fit in `max_tokens` as the model would write it: the budget
    closes it anyway, so it parses and follows the schema (before: finish `length`, cut JSON)."""
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Describe Paris in detail, as JSON."}],
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": 7,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
        },
    ).json()
    choice = response["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), CITY)
    assert response["usage"]["completion_tokens"] <= max_tokens


def test_serve_takes_the_program_of_a_file_artifact_from_the_user(tmp_path):
    """An artifact compiled from `topics.py:Headline` names a file; the server refuses it
    alone and serves it when the user names that file with `--program`."""
    from plait.compilers.errors import ProgramLoadError
    from plait.compilers.loading import load_program_class
    from plait.serve.commands import _named_programs

    source = tmp_path / "topics.py"
    source.write_text(
        textwrap.dedent(
            """
            import dspy

            class Headline(dspy.Module):
                def __init__(self):
                    super().__init__()
                    self.tag = dspy.Predict("headline -> topic")

                def forward(self, headline):
                    return self.tag(headline=headline)
            """
        )
    )
    target = f"{source}:Headline"
    artifact = save_program(tmp_path / "headline.json", load_program_class(target)(), target)
    refused = model_runtime()
    try:
        with pytest.raises(ProgramLoadError):
            refused.load_artifact(artifact, "headline")
    finally:
        refused.close()
    runtime = model_runtime()
    try:
        runtime.load_artifact(artifact, "headline", program=_named_programs([target])["Headline"])
        with ServerThread(create_app(runtime)) as server:
            answer = httpx.post(
                f"{server.url}/v1/programs/headline",
                json={"headline": "Team wins the cup final"},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=120,
            )
        assert answer.status_code == 200 and answer.json()["outputs"]["topic"]
    finally:
        runtime.close()
