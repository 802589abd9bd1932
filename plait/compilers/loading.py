"""Import a program class from `module:Class` or `path/to/file.py:Class`.

The same spelling is used on the command line, in artifacts and in the server, so a program
is named one way everywhere. Files are imported under a module name derived from their
resolved path, so importing the same file twice gives the same class (and the same
signature hash).

What the user types is imported as given (`load_program_class`). What an artifact names is
not the user's choice, so it goes through `artifact_program_class`, which refuses, before
anything is imported, every program outside the rule in `plait.compilers.artifact`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
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


def load_object(target: str) -> Any:
    """The object named by `module:Name` or `file.py:Name` (a relative file path is relative to
    the working directory)."""
    location, name = split_target(target)
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise ProgramLoadError(f"program file not found: {location}")
        module = _import_file(path.resolve())
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


def load_program_class(target: str) -> type:
    """The `dspy.Module` subclass named by `module:Class` or `file.py:Class`."""
    import dspy

    obj = load_object(target)
    if not (isinstance(obj, type) and issubclass(obj, dspy.Module)):
        raise ProgramLoadError(f"{target} is not a dspy.Module subclass")
    return obj


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def artifact_program_class(target: str) -> type:
    """The program class an artifact names, imported only if that runs no code the user did not
    choose: `package.module:Class` where the module is no script (`__main__`), not in the
    standard library, and either imported already (importing it again runs nothing) or part of
    an installed distribution. Everything else is refused before it is imported."""
    location, name = split_target(target)
    if location.endswith(".py") or not _MODULE_NAME.fullmatch(location):
        raise ProgramLoadError(
            f"the artifact names the program {target!r}, a file: an artifact may only name a module "
            f"of an installed package; to run that file, name it yourself: --program {target} "
            "(plait eval: its program argument)"
        )
    top, leaf = location.partition(".")[0], location.rpartition(".")[2]
    if leaf == "__main__":
        raise ProgramLoadError(f"the artifact names {location!r}, a script, not a module of programs")
    if top in sys.stdlib_module_names:
        raise ProgramLoadError(
            f"the artifact names {location!r}, part of Python's standard library, not a program"
        )
    if location not in sys.modules and top not in importlib.metadata.packages_distributions():
        raise ProgramLoadError(
            f"the artifact names the module {location!r}, which is not part of an installed package: "
            f"install it, or name its file yourself: --program path/to/{leaf}.py:{name} "
            "(plait eval: its program argument)"
        )
    return load_program_class(target)


def instantiate(cls: type, init: dict[str, Any] | None = None) -> Any:
    """`cls(**init)`, with a constructor failure reported as a `ProgramLoadError`."""
    try:
        return cls(**(init or {}))
    except TypeError as exc:
        raise ProgramLoadError(f"cannot construct {cls.__name__}({', '.join(init or {})}): {exc}") from exc
