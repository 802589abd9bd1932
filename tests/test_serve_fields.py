"""Field streaming from ChatAdapter-format text: any chunking joins to the parsed values."""

from __future__ import annotations

import random

import pytest

from plait.modules.fields import FieldSplitter

TEXT = (
    "[[ ## reasoning ## ]]\nSpeed is distance over time:\n6 / 2 = 3 [ok].\n\n[[ ## answer ## ]]\n3\n\n"
    "[[ ## completed ## ]]"
)
VALUES = {"reasoning": "Speed is distance over time:\n6 / 2 = 3 [ok].", "answer": "3"}


def split(text: str, sizes: list[int], fields=("reasoning", "answer")) -> dict[str, list]:
    splitter, out, at = FieldSplitter(fields), {}, 0
    for size in sizes:
        for chunk in splitter.feed(text[at : at + size]):
            out.setdefault(chunk.field, []).append(chunk)
        at += size
    for chunk in splitter.finish():
        out.setdefault(chunk.field, []).append(chunk)
    return out


@pytest.mark.parametrize("seed", range(60))
def test_any_chunking_joins_to_the_values(seed):
    rng = random.Random(seed)
    sizes = [len(TEXT)] if seed == 0 else [rng.randint(1, 12) for _ in range(len(TEXT))]
    out = split(TEXT, sizes)
    assert {f: "".join(c.chunk for c in chunks) for f, chunks in out.items()} == VALUES
    assert all(chunks[-1].last and not any(c.last for c in chunks[:-1]) for chunks in out.values())


def test_text_is_released_before_the_field_ends():
    splitter = FieldSplitter(["answer"])
    first = splitter.feed("[[ ## answer ## ]]\nPar") + splitter.feed("is is big [")
    assert "".join(c.chunk for c in first) == "Paris is big"  # the "[" may start a marker: held
    assert not any(c.last for c in first)
    rest = splitter.feed("[ ## completed ## ]]")
    assert rest[-1].last and "".join(c.chunk for c in first + rest) == "Paris is big"


def test_unlisted_fields_and_a_missing_completion_marker():
    out = split("[[ ## hidden ## ]]\nx\n\n[[ ## answer ## ]]\nyes", [5] * 20, fields=("answer",))
    assert list(out) == ["answer"] and "".join(c.chunk for c in out["answer"]) == "yes"
