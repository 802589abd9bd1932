"""Compiled artifacts: a DSPy program's learned state as one JSON file.

    save_artifact(program, "sentiment.json", program_path="plait.pipelines.sentiment:Sentiment",
                  model="smollm2-135m")
    loaded = load_artifact("sentiment.json")
    loaded.program(text="a triumph")

The file holds `program.dump_state()` (instructions, demos) plus what is needed to rebuild
the program around it: its import path, constructor arguments (`init`), the model it was
compiled for, its signature hash and the plait/DSPy versions. Loading imports the class,
constructs it, checks that its signatures still have the compiled shape, and applies the
state with `load_state` — nothing is ever unpickled, so loading an artifact runs only code
you already have installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from plait.compilers.errors import ArtifactCorruptError, ArtifactMismatchError, ArtifactNotFoundError
from plait.compilers.hashing import signature_hash, signature_shape
from plait.compilers.loading import instantiate, load_program_class
from plait.version import __version__

log = logging.getLogger(__name__)

FORMAT = "plait-artifact"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "program", "model", "signature_hash", "plait_version", "state")


@dataclass
class LoadedArtifact:
    """A program rebuilt from an artifact, and what the artifact says about it."""

    program: Any
    program_path: str
    model: str
    signature_hash: str
    plait_version: str
    meta: dict[str, Any] = field(default_factory=dict)  # the `extra` given to save_artifact
    init: dict[str, Any] = field(default_factory=dict)
    dspy_version: str | None = None
    created_at: str | None = None
    path: Path | None = None
    sha256: str | None = None


def _versions() -> tuple[str, str]:
    import dspy

    return __version__, dspy.__version__


def artifact_document(
    program: Any,
    *,
    program_path: str,
    model: str,
    extra: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document `save_artifact` writes (exposed for servers that keep it in memory)."""
    plait_version, dspy_version = _versions()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "program": program_path,
        "init": dict(init or {}),
        "model": model,
        "signature_hash": signature_hash(program),
        "signatures": signature_shape(program),
        "plait_version": plait_version,
        "dspy_version": dspy_version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
        "state": program.dump_state(json_mode=True),
    }
    try:
        json.dumps(document)
    except TypeError as exc:
        raise ArtifactCorruptError(
            f"the program state (or extra/init) is not JSON-serialisable: {exc}"
        ) from exc
    return document


def save_artifact(
    program: Any,
    path: str | os.PathLike[str],
    *,
    program_path: str,
    model: str,
    extra: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
) -> str:
    """Write `program`'s compiled state to `path` (atomically: a crash never leaves half a
    file). `init` are the JSON constructor arguments the program needs to be rebuilt.
    Returns the file's sha256."""
    document = artifact_document(program, program_path=program_path, model=model, extra=extra, init=init)
    data = json.dumps(document, indent=2, ensure_ascii=False).encode()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def read_artifact(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The artifact's JSON document, checked for shape but not applied to any program."""
    source = Path(path)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"artifact not found: {source}") from None
    except IsADirectoryError:
        raise ArtifactNotFoundError(f"artifact path is a directory: {source}") from None
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactCorruptError(f"{source} is not valid JSON ({exc}); was it truncated?") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ArtifactCorruptError(f'{source} is not a plait artifact (no "format": "{FORMAT}")')
    missing = [key for key in _REQUIRED if key not in document]
    if missing:
        raise ArtifactCorruptError(f"{source} is missing {', '.join(missing)}")
    if document["format_version"] != FORMAT_VERSION:
        raise ArtifactCorruptError(
            f"{source} has artifact format {document['format_version']}; this plait "
            f"reads format {FORMAT_VERSION}"
        )
    if not isinstance(document["state"], dict) or not isinstance(document.get("init", {}), dict):
        raise ArtifactCorruptError(f'{source}: "state" and "init" must be JSON objects')
    document["_sha256"] = hashlib.sha256(raw).hexdigest()
    return document


def load_artifact(path: str | os.PathLike[str], *, init: dict[str, Any] | None = None) -> LoadedArtifact:
    """Rebuild the compiled program saved at `path`.

    `init` overrides the saved constructor arguments (e.g. a different index directory on the
    serving machine); the signature check still applies.
    """
    source = Path(path)
    document = read_artifact(source)
    cls = load_program_class(document["program"], base_dir=source.resolve().parent)
    init_args = {**document.get("init", {}), **(init or {})}
    program = instantiate(cls, init_args)
    current = signature_hash(program)
    if current != document["signature_hash"]:
        raise ArtifactMismatchError(
            f"{source} was compiled for a different version of {document['program']} (signature hash "
            f"{document['signature_hash']}, the program now has {current}): its fields changed; "
            "recompile it"
        )
    try:
        program.load_state(document["state"])
    except Exception as exc:  # KeyError/TypeError/ValidationError from DSPy: the state does not fit
        raise ArtifactCorruptError(
            f"{source}: the saved state does not load into {document['program']}: {type(exc).__name__}: {exc}"
        ) from exc
    plait_version, _ = _versions()
    if document["plait_version"] != plait_version:
        log.warning(
            "%s was compiled with plait %s; this is plait %s",
            source,
            document["plait_version"],
            plait_version,
        )
    return LoadedArtifact(
        program=program,
        program_path=document["program"],
        model=document["model"],
        signature_hash=document["signature_hash"],
        plait_version=document["plait_version"],
        meta=dict(document.get("extra") or {}),
        init=init_args,
        dspy_version=document.get("dspy_version"),
        created_at=document.get("created_at"),
        path=source,
        sha256=document["_sha256"],
    )
