"""Compiled artifacts: a DSPy program's learned state as one JSON file.

    save_artifact(program, "sentiment.json", program_path="plait.pipelines.sentiment:Sentiment",
                  model="smollm2-135m")
    loaded = load_artifact("sentiment.json")
    loaded.program(text="a triumph")
    loaded = load_artifact("echo.json", program="path/to/echo.py:Echo")   # a program you name
    program = load_program(MyProgram(), "p.json")   # DSPy's `program.save("p.json")`, plait LMs kept

The file holds `program.dump_state()` (instructions, demos) plus what is needed to rebuild
the program around it: its import path, constructor arguments (`init`), the model it was
compiled for, its signature hash and the plait/DSPy versions. Loading imports the class,
constructs it, checks that its signatures still have the compiled shape, and applies the
state with `load_state`.

Trust model. An artifact is data that may come from anyone (a colleague, a download, a CI
job), so loading one runs no code the user did not choose:

- Nothing in it is executed or unpickled. The file is parsed as JSON (nesting deeper than
  `MAX_DEPTH` levels is refused), and the state is applied as data by DSPy's `load_state`.
- A predictor's own LM (`predictor.set_lm(plait.LM(...))`) is rebuilt with `plait.LM` from
  plain values when it is a plait LM on the local engine, and refused otherwise
  (`plait.compilers.lm_state`): no class or endpoint the file names is used. DSPy's
  `allow_unsafe_lm_state` is never passed. `load_program` does the same for DSPy's own saves.
- The program it names is imported only if it is `package.module:Class` where the module is
  not a `__main__` script, not in Python's standard library, and either already imported in
  this process (importing it again runs nothing) or in a top-level package that an installed
  distribution provides (`importlib.metadata.packages_distributions()`). This is checked
  before anything is imported. The attribute must then be a `dspy.Module` subclass; it is
  constructed with the artifact's JSON `init` values and must have the signature hash the
  artifact was compiled with. So an artifact naming a file (`evil.py:Evil`, relative or
  absolute), a module that is importable only because its directory is on `sys.path` (the
  working directory under `python -m`), or a standard module (`os:system`, `this:Foo`) is
  refused with a `ProgramLoadError`, and the named code never runs.
- A program that is not installed runs only when the user names it: `plait eval
  path/to/file.py:Class --compiled a.json` (eval's program argument), `load_artifact(path,
  program="path/to/file.py:Class")` in Python. The artifact's own program path is then not
  imported at all; the named class must have the artifact's class name and signature hash.
- Trusted, and outside what a loader can check: installed distributions (installing a package
  is choosing to run it; importing one of its modules runs that module's top-level code and
  the class's constructor), and `sys.path` itself (a directory placed before site-packages can
  shadow an installed package for every import, not only for plait's).
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

from plait.compilers.errors import (
    ArtifactCorruptError,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    LMStateError,
    ProgramLoadError,
)
from plait.compilers.hashing import signature_hash, signature_shape
from plait.compilers.lm_state import load_program_state
from plait.compilers.loading import artifact_program_class, instantiate, load_program_class, split_target
from plait.version import __version__

log = logging.getLogger(__name__)

FORMAT = "plait-artifact"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "program", "model", "signature_hash", "plait_version", "state")
_STRINGS = ("program", "model", "signature_hash", "plait_version")
#: Deepest JSON nesting an artifact may have. DSPy state is a few levels deep (predictor ->
#: demos -> fields -> values); anything near Python's recursion limit would overflow the first
#: walk of the state (hashing, copying) after loading.
MAX_DEPTH = 100


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


def _depth_exceeds(document: Any, limit: int) -> bool:
    """Whether JSON `document` nests deeper than `limit` (walked without recursion)."""
    level = [document]
    for _ in range(limit):
        level = [
            child
            for value in level
            if isinstance(value, (dict, list))
            for child in (value.values() if isinstance(value, dict) else value)
        ]
        if not level:
            return False
    return any(isinstance(value, (dict, list)) for value in level)


def _read_json(source: Path, kind: str) -> tuple[Any, bytes]:
    """The parsed JSON of a saved program (`kind` names it in errors), and its bytes."""
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"{kind} not found: {source}") from None
    except IsADirectoryError:
        raise ArtifactNotFoundError(f"{kind} path is a directory: {source}") from None
    too_deep = f"{source} is JSON nested more than {MAX_DEPTH} levels deep: not a {kind}"
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactCorruptError(f"{source} is not valid JSON ({exc}); was it truncated?") from exc
    except RecursionError:  # the parser's own limit, far above MAX_DEPTH
        raise ArtifactCorruptError(too_deep) from None
    if _depth_exceeds(document, MAX_DEPTH):
        raise ArtifactCorruptError(too_deep)
    return document, raw


def _apply_state(program: Any, state: dict[str, Any], source: Path, name: str) -> None:
    """Load `state` into `program` (see `load_program_state`); state that does not fit the
    program is a corrupt file, an LM that is not plait's is refused as such."""
    try:
        load_program_state(program, state, str(source))
    except LMStateError:
        raise
    except Exception as exc:  # KeyError/TypeError/ValidationError from DSPy: the state does not fit
        raise ArtifactCorruptError(
            f"{source}: the saved state does not load into {name}: {type(exc).__name__}: {exc}"
        ) from exc


def read_artifact(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The artifact's JSON document, checked for shape but not applied to any program."""
    source = Path(path)
    document, raw = _read_json(source, "plait artifact")
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
    wrong = [key for key in _STRINGS if not isinstance(document[key], str)]
    if wrong:
        raise ArtifactCorruptError(f"{source}: {', '.join(wrong)} must be strings")
    document["_sha256"] = hashlib.sha256(raw).hexdigest()
    return document


def _program_class(source: Path, saved: str, chosen: str | None) -> type:
    """The class of the artifact's program: the one the caller chose (same class name as the
    saved one), else the saved one if the trust rule allows importing it."""
    try:
        saved_name = split_target(saved)[1]
    except ProgramLoadError as exc:
        raise ArtifactCorruptError(f"{source}: {exc}") from None
    if chosen is None:
        try:
            return artifact_program_class(saved)
        except ProgramLoadError as exc:
            raise ProgramLoadError(f"{source}: {exc}") from None
    if split_target(chosen)[1] != saved_name:
        raise ArtifactMismatchError(
            f"{source} was compiled for {saved_name} ({saved}), not {split_target(chosen)[1]} ({chosen})"
        )
    return load_program_class(chosen)


def load_artifact(
    path: str | os.PathLike[str], *, init: dict[str, Any] | None = None, program: str | None = None
) -> LoadedArtifact:
    """Rebuild the compiled program saved at `path`.

    `init` overrides the saved constructor arguments (e.g. a different index directory on the
    serving machine); the signature check still applies. `program` is a program the caller
    chose (`module:Class` or `file.py:Class`) to use instead of the one the artifact names,
    which may only be an installed one (see the trust model above); it must have the
    artifact's class name.
    """
    source = Path(path)
    document = read_artifact(source)
    cls = _program_class(source, document["program"], program)
    init_args = {**document.get("init", {}), **(init or {})}
    rebuilt = instantiate(cls, init_args)
    current = signature_hash(rebuilt)
    if current != document["signature_hash"]:
        raise ArtifactMismatchError(
            f"{source} was compiled for a different version of {program or document['program']} "
            f"(signature hash {document['signature_hash']}, the program now has {current}): "
            "its fields changed; recompile it"
        )
    _apply_state(rebuilt, document["state"], source, document["program"])
    plait_version, _ = _versions()
    if document["plait_version"] != plait_version:
        log.warning(
            "%s was compiled with plait %s; this is plait %s",
            source,
            document["plait_version"],
            plait_version,
        )
    return LoadedArtifact(
        program=rebuilt,
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


def load_program(program: Any, path: str | os.PathLike[str]) -> Any:
    """`program` with the state DSPy's `program.save(path)` wrote to a JSON file; returns it.

    Like DSPy's `program.load(path)`, but a predictor's own plait LM
    (`predictor.set_lm(plait.LM(...))`) loads back with it, with no `allow_unsafe_lm_state`:
    it is rebuilt from plain values, and any other LM state is refused (`LMStateError`).
    Only JSON is read: a pickle (`.pkl`) is never opened.
    """
    source = Path(path)
    if source.suffix != ".json":
        raise LMStateError(f"{source}: plait loads a program's state from JSON only (never a pickle)")
    state, _ = _read_json(source, "saved DSPy program")
    if not isinstance(state, dict):
        raise ArtifactCorruptError(f"{source} is not a saved DSPy program (not a JSON object)")
    _apply_state(program, state, source, type(program).__name__)
    return program
