"""Errors of the compile / evaluate lifecycle. Each is a `PlaitError`: the CLI prints its
message on one line and exits 2, the server answers 4xx."""

from plait.errors import PlaitError


class ProgramLoadError(PlaitError):
    """`module:Class` or `file.py:Class` cannot be imported, or is not a DSPy module."""


class ArtifactError(PlaitError):
    """Base class for compiled-artifact problems."""


class ArtifactNotFoundError(ArtifactError):
    """The artifact file does not exist."""


class ArtifactCorruptError(ArtifactError):
    """The file is not a plait artifact: bad JSON, missing keys, or state that does not load."""


class ArtifactMismatchError(ArtifactError):
    """The artifact was compiled for a program whose signatures differ from the one importable
    now (the program's fields changed since it was compiled)."""


class LMStateError(ArtifactError):
    """A saved predictor's LM is not a plait LM that can be rebuilt from plain values (see
    `plait.compilers.lm_state`): refused rather than trusted."""


class DatasetError(PlaitError):
    """A train/dev set is missing, not JSONL, or has rows the program cannot read."""


class MetricError(PlaitError):
    """Unknown metric name, or a `module:function` metric that cannot be imported."""


class OptimizerError(PlaitError):
    """Unknown optimizer or setting, or one that cannot run with the given data."""


class OutputPathError(PlaitError):
    """An output file (`--out`, `--json-out`) cannot be written: its directory is missing or
    read-only, or the path is a directory."""


class SelectionError(PlaitError):
    """A cost-aware pick that cannot be made: a malformed --objective, conflicting rules, no
    candidate under --max-cost, or candidates without an idealized cost."""
