"""Compile and evaluate DSPy programs, with every result recorded in the store.

    from plait.compilers import save_artifact, load_artifact, load_program_class
    from plait.compilers import load_program    # a DSPy `program.save("p.json")`, plait LMs included

Heavy imports (DSPy) happen on first use, so `import plait.compilers` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plait.compilers.errors import (
    ArtifactCorruptError,
    ArtifactError,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    DatasetError,
    LMStateError,
    MetricError,
    OptimizerError,
    OutputPathError,
    ProgramLoadError,
)

if TYPE_CHECKING:
    from plait.compilers.artifact import (
        LoadedArtifact,
        load_artifact,
        load_program,
        read_artifact,
        save_artifact,
    )
    from plait.compilers.loading import load_program_class

_LAZY = {
    "LoadedArtifact": "plait.compilers.artifact",
    "load_artifact": "plait.compilers.artifact",
    "load_program": "plait.compilers.artifact",
    "read_artifact": "plait.compilers.artifact",
    "save_artifact": "plait.compilers.artifact",
    "load_program_class": "plait.compilers.loading",
}

__all__ = [
    "ArtifactCorruptError",
    "ArtifactError",
    "ArtifactMismatchError",
    "ArtifactNotFoundError",
    "DatasetError",
    "LMStateError",
    "LoadedArtifact",
    "MetricError",
    "OptimizerError",
    "OutputPathError",
    "ProgramLoadError",
    "load_artifact",
    "load_program",
    "load_program_class",
    "read_artifact",
    "save_artifact",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plait.compilers' has no attribute {name!r}")
