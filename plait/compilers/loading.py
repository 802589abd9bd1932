"""Import a program class from `module:Class` or `path/to/file.py:Class`.

The same spelling is used on the command line, in artifacts and in the server, so a program
is named one way everywhere. Files are imported under a module name derived from their
resolved path, so importing the same file twice gives the same class (and the same
signature hash).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from plait.compilers.errors import ProgramLoadError


def split_target(target: str) -> tuple[str, str]:
    """`"pkg.mod:Name"` -> `("pkg.mod", "Name")`; the last colon separates (Windows drive
    letters contain one too)."""
    location, sep, name = target.rpartition(":")
    if not sep or not location or not name.isidentifier():
        raise ProgramLoadError(f"expected module:Name or file.py:Name, got {target!r}")
    return location, name


def _import_file(path: Path) -> Any:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"plait_user_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ProgramLoadError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses/pydantic look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ProgramLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_object(target: str, *, base_dir: Path | None = None) -> Any:
    """The object named by `module:Name` or `file.py:Name`. A relative file path is looked up
    in the working directory, then in `base_dir` (an artifact's directory)."""
    location, name = split_target(target)
    if location.endswith(".py"):
        candidates = [Path(location)]
        if base_dir is not None and not Path(location).is_absolute():
            candidates.append(base_dir / location)
        path = next((p.resolve() for p in candidates if p.is_file()), None)
        if path is None:
            raise ProgramLoadError(f"program file not found: {location}")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise ProgramLoadError(f"cannot import module {location!r}: {exc}") from exc
        except Exception as exc:
            raise ProgramLoadError(f"importing {location!r} failed: {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, name)
    except AttributeError:
        raise ProgramLoadError(f"{location!r} has no attribute {name!r}") from None


def load_program_class(target: str, *, base_dir: Path | None = None) -> type:
    """The `dspy.Module` subclass named by `module:Class` or `file.py:Class`."""
    import dspy

    obj = load_object(target, base_dir=base_dir)
    if not (isinstance(obj, type) and issubclass(obj, dspy.Module)):
        raise ProgramLoadError(f"{target} is not a dspy.Module subclass")
    return obj


def instantiate(cls: type, init: dict[str, Any] | None = None) -> Any:
    """`cls(**init)`, with a constructor failure reported as a `ProgramLoadError`."""
    try:
        return cls(**(init or {}))
    except TypeError as exc:
        raise ProgramLoadError(f"cannot construct {cls.__name__}({', '.join(init or {})}): {exc}") from exc
