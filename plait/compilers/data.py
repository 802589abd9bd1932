"""Datasets: JSONL rows read as they are, turned into `dspy.Example`s by the program.

Convention (so each pipeline reads its dataset unchanged): a program class may define
`from_row(row) -> dspy.Example` as a classmethod; it maps a raw row (SST-2's 0/1 label, GSM8K's
`final` string, ...) to an example whose inputs are marked. Without it, the row is used as is
and the inputs are the parameters of the program's `forward`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import dspy

from plait.compilers.errors import DatasetError


def read_jsonl(path: str | Path, *, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """Rows `offset .. offset+limit` of a JSONL file (blank lines skipped)."""
    source = Path(path)
    if not source.is_file():
        raise DatasetError(f"dataset not found: {source}")
    if offset < 0 or (limit is not None and limit < 1):
        raise DatasetError("--offset must be >= 0 and --limit >= 1")
    rows: list[dict[str, Any]] = []
    with source.open(encoding="utf-8") as handle:
        index = -1
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            index += 1
            if index < offset:
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{source}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DatasetError(f"{source}:{number}: each line must be a JSON object")
            rows.append(row)
    if not rows:
        raise DatasetError(f"{source} has no rows (after --offset {offset})")
    return rows


def forward_inputs(program_cls: type) -> list[str]:
    """The parameter names of `program_cls.forward`: the program's inputs."""
    parameters = inspect.signature(program_cls.forward).parameters.values()
    return [
        p.name for p in parameters if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def to_examples(
    program_cls: type, rows: list[dict[str, Any]], *, source: str = "dataset"
) -> list[dspy.Example]:
    """Map rows to examples with the program's `from_row`, or by its `forward` parameters."""
    from_row = getattr(program_cls, "from_row", None)
    inputs = forward_inputs(program_cls)
    examples = []
    for index, row in enumerate(rows):
        if from_row is not None:
            try:
                example = from_row(row)
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                raise DatasetError(
                    f"{source} row {index}: {program_cls.__name__}.from_row cannot read it "
                    f"({type(exc).__name__}: {exc}); keys: {sorted(row)}"
                ) from exc
        else:
            missing = [name for name in inputs if name not in row]
            if missing:
                raise DatasetError(
                    f"{source} row {index} lacks the program's inputs {missing} "
                    f"(it has {sorted(row)}); add a from_row classmethod to map it"
                )
            example = dspy.Example(**row).with_inputs(*inputs)
        examples.append(example)
    return examples
