"""JSON mode always parses: under a `JsonBudget` a runaway value is ended and the document is
finished within the request's `max_tokens`, even against a sampler that picks the tokens that
would keep it open forever (digits for numbers, words for strings)."""

import functools
import json
import random

import jsonschema
import pytest
import torch

from plait.backends.grammar.constraint import compile_constraint
from tests.constrained_fixtures import smollm2_tokenizer

TOKENIZER = smollm2_tokenizer()

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "mayor": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "number"}},
            "required": ["name", "age"],
        },
    },
    "required": ["city", "population", "tags", "mayor"],
}
SCORES = {"type": "array", "items": {"type": "number"}}


@functools.cache
def _preferred(prefer: str) -> torch.Tensor:
    """bool [vocab]: the tokens whose text (stripped) is all digits or all letters."""
    texts = (TOKENIZER.decode([t]).strip() for t in range(TOKENIZER.vocab_size))
    return torch.tensor([getattr(text, prefer)() for text in texts])


def _adversarial_run(schema: dict, max_tokens: int | None, prefer: str, seed: int) -> tuple[list[int], bool]:
    """Drive a constraint with a sampler that prefers digit or letter tokens (what keeps a
    number or a string going); returns (tokens, whether the grammar finished)."""
    constraint = compile_constraint(schema, TOKENIZER, max_tokens=max_tokens)
    rng = random.Random(seed)
    out: list[int] = []
    forced = constraint.forced()
    constraint.advance(forced)
    out += forced
    preferred = _preferred(prefer)
    while not constraint.is_finished() and len(out) < (max_tokens or 200):
        mask = constraint.mask()
        allowed = mask.nonzero().flatten().tolist()
        keep_going = (mask[: len(preferred)] & preferred[: len(mask)]).nonzero().flatten().tolist()
        token = rng.choice(keep_going or allowed)
        constraint.advance([token])
        out.append(token)
        forced = constraint.forced()
        constraint.advance(forced)
        out += forced
    return out, constraint.is_accepting()


@pytest.mark.parametrize("schema", [CITY, SCORES], ids=["object", "array"])
@pytest.mark.parametrize("max_tokens", [48, 90, 160])
@pytest.mark.parametrize("prefer", ["isdigit", "isalpha"])
def test_json_mode_closes_within_max_tokens(schema, max_tokens, prefer):
    tokens, complete = _adversarial_run(schema, max_tokens, prefer, seed=max_tokens)
    assert complete and len(tokens) <= max_tokens
    jsonschema.validate(json.loads(TOKENIZER.decode(tokens)), schema)


def test_a_runaway_number_is_ended_at_its_budget():
    tokens, complete = _adversarial_run(CITY, 4096, "isdigit", seed=3)
    document = json.loads(TOKENIZER.decode(tokens))
    assert complete and len(str(abs(document["population"]))) < 80  # 24 tokens of digits at most


def test_without_a_budget_the_same_sampler_never_closes():
    """The check above can fail: with no max_tokens given there is no budget, and the document
    is still open after 200 tokens."""
    _, complete = _adversarial_run(CITY, None, "isdigit", seed=3)
    assert not complete
