"""Typed errors with messages a user can act on.

The CLI turns any `PlaitError` into one line on stderr and exit code 2; the server turns it
into a 4xx JSON error. Anything else escaping is a bug.
"""


class PlaitError(Exception):
    """Base class for every error plait raises on purpose."""


class ModelNotFoundError(PlaitError):
    """The model name is not registered and is not a path to a checkpoint."""


class CheckpointError(PlaitError):
    """A checkpoint exists but cannot be read: missing files, bad config, corrupt tensors."""


class UnsupportedFeatureError(PlaitError):
    """The request asks for something plait does not do (log probabilities, an image input,
    a repetition penalty, ...): refused before anything runs, since ignoring it would give
    an answer the caller did not ask for."""


class ContextLengthError(PlaitError):
    """The prompt (plus the requested tokens) does not fit the model's context window."""


class MemoryBudgetError(PlaitError):
    """Serving a request would exceed the engine's memory budget."""


class EngineOverloadedError(PlaitError):
    """The engine's queue is full: back off and retry (HTTP 503)."""


class EngineClosedError(PlaitError):
    """The engine was shut down; no further requests are accepted."""


class RequestCancelledError(PlaitError):
    """The request was cancelled (its client went away) before it finished."""
