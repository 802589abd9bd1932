"""Helpers for the compile / eval / store / pipeline tests.

`KeywordEngine` is a DSPy custom engine that answers ChatAdapter-formatted sentiment requests
from keywords, instantly and deterministically: the whole compile machinery (optimizers,
recording, resume) is tested with it in milliseconds; the real model is used only in the
slow tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage

REPO = Path(__file__).resolve().parents[1]
POSITIVE = ("charming", "good", "great", "triumph", "best", "beautiful", "hope", "astounding", "fun")


class Crash(BaseException):
    """Stands in for SIGKILL inside one process: nothing catches it."""


class KeywordEngine:
    """Answers `label` by keywords; can crash after `crash_after` calls."""

    def __init__(self, crash_after: int | None = None):
        self.calls = 0
        self.crash_after = crash_after
        self.lock = threading.Lock()

    def complete(self, request: Any) -> Response:
        with self.lock:
            self.calls += 1
            if self.crash_after is not None and self.calls > self.crash_after:
                raise Crash(f"crash after {self.crash_after} calls")
        text = "".join(p.text for p in request.messages[-1].parts if isinstance(p, TextPart))
        fields = re.findall(r"`\[\[ ## (\w+) ## \]\]`", text.rsplit("Respond with the corresponding", 1)[-1])
        question = text.lower().rsplit("[[ ## text ## ]]", 1)[-1]
        label = "positive" if any(word in question for word in POSITIVE) else "negative"
        values = {"label": label, "reasoning": "Judging by its words."}
        answer = "".join(
            f"[[ ## {name} ## ]]\n{values.get(name, 'Classify the sentiment of the sentence.')}\n\n"
            for name in [f for f in fields if f != "completed"] or ["label"]
        )
        answer += "[[ ## completed ## ]]"
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart(answer)]),
            finish_reason="stop",
            usage=Usage(input_tokens=len(text) // 4, output_tokens=9),
        )


def keyword_lm(engine: KeywordEngine | None = None) -> dspy.LM:
    return dspy.LM("plait/keywords", engine=engine or KeywordEngine(), cache=False, num_retries=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sst2_rows(data_dir: Path, split: str, count: int, offset: int = 0) -> list[dict]:
    with open(data_dir / "sst2" / f"{split}.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[offset : offset + count]


def plait_command() -> list[str]:
    """The `plait` command, as a subprocess of this interpreter."""
    return [sys.executable, "-m", "plait.cli"]


def cli_main(argv: list[str]) -> int:
    """The in-process CLI entry point."""
    from plait.cli import main

    return main(argv)


def subprocess_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PLAIT_HOME=str(home), PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("PLAIT_DATABASE_URL", None)
    return env


def shared_weights(home: Path) -> None:
    """Point a fresh PLAIT_HOME at the repo's dequantised-weights cache (no re-dequantising)."""
    source = REPO / ".plait" / "cache" / "gguf"
    target = home / "cache" / "gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.exists() and not target.exists():
        target.symlink_to(source, target_is_directory=True)


def run(argv: list[str], home: Path, *, cwd: Path = REPO, **kwargs: Any) -> subprocess.CompletedProcess:
    """`plait argv` in a subprocess with its own PLAIT_HOME, run in `cwd`."""
    return subprocess.run(
        [*plait_command(), *argv],
        env=subprocess_env(home),
        cwd=cwd,
        text=True,
        capture_output=True,
        check=False,
        **kwargs,
    )


#: Whether `buggy_metric` has its bug (tests flip it to "fix" the metric between runs).
METRIC_BUG = {"on": True}


def buggy_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """exact_match, except that while `METRIC_BUG["on"]` it raises on every example, as a metric
    reading a field the rows do not have would."""
    from plait.compilers.metrics import exact_match

    if METRIC_BUG["on"]:
        raise KeyError("gold_label")
    return exact_match(example, prediction, trace)


def picky_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """exact_match, but raises on examples whose text starts with "x" (a metric with a gap)."""
    from plait.compilers.metrics import exact_match

    if example.text.startswith("x"):
        raise ValueError("cannot score this one")
    return exact_match(example, prediction, trace)
