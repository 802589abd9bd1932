"""Stable hashes that key the store and guard artifacts.

- `signature_hash(program)`: the program's *shape* — its predictors' names and their input and
  output fields with types. Compiling changes instructions and demos, never the shape, so an
  artifact fits exactly the programs with the same signature hash.
- `state_hash(program)`: the program's full compiled state (instructions, demos, ...). Two
  evaluations of the same state on the same example give the same result (greedy decoding),
  which is what makes per-example results reusable after a crash.
- `example_hash(example)`: the example's fields, so results stay attached to their example
  even if the data file is reordered.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(value: Any) -> str:
    """sha256 of canonical JSON (sorted keys; anything not JSON becomes its repr)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def signature_shape(program: Any) -> list[dict[str, Any]]:
    shape = []
    for name, predictor in program.named_predictors():
        signature = predictor.signature
        shape.append(
            {
                "predictor": name,
                "inputs": [[f, _type_name(info.annotation)] for f, info in signature.input_fields.items()],
                "outputs": [[f, _type_name(info.annotation)] for f, info in signature.output_fields.items()],
            }
        )
    return shape


def signature_hash(program: Any) -> str:
    return digest(signature_shape(program))[:16]


def state_hash(program: Any) -> str:
    return digest(program.dump_state())[:16]


def example_hash(example: Any) -> str:
    data = example.toDict() if hasattr(example, "toDict") else dict(example)
    return digest(data)[:16]
