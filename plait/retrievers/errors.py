"""Errors the retrieval stack raises on purpose.

Every class subclasses `plait.errors.PlaitError`, so the CLI prints one line and exits 2 and
the index server answers 4xx instead of a stack trace.
"""

from plait.errors import CheckpointError, PlaitError


class IndexNotFoundError(PlaitError):
    """The index directory, its manifest, or a file the manifest names does not exist."""


class IndexCorruptError(PlaitError):
    """An index file's size or sha256 does not match the manifest, or the manifest is unreadable."""


class IndexFormatError(PlaitError):
    """The index was written by an incompatible format version or with settings we cannot serve."""


class IndexExistsError(PlaitError):
    """`build_index` was pointed at a non-empty directory without `overwrite=True`."""


class CorpusError(PlaitError):
    """A corpus row is malformed: bad JSON, missing id or text, duplicate id, empty corpus."""


class EncoderLoadError(CheckpointError):
    """An encoder checkpoint directory is missing files or has weights we cannot map."""


class BadQueryError(PlaitError):
    """A search request is invalid: empty query, k out of range, unknown stage."""


class SettingsError(PlaitError):
    """A build or server setting cannot work: a count below 1, a public address without a key."""
