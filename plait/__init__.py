"""plait: declarative LM pipelines (DSPy programs) compiled and served on a local engine."""

import importlib
import os

from plait.errors import PlaitError
from plait.paths import plait_home
from plait.version import __version__

# No network at run time, and DSPy's cache inside plait's own directory. Both must be set
# before DSPy (and litellm under it) is first imported.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DSPY_CACHEDIR", str(plait_home() / "cache" / "dspy"))

# The public API, imported on first use: `plait generate` need not pay for importing DSPy.
_EXPORTS = {
    "LM": "plait.backends.clients.local",
    "PlaitEngine": "plait.backends.clients.local",
    "Engine": "plait.backends.runtime.engine",
    "GenerationResult": "plait.backends.runtime.engine",
    "ConstrainedAdapter": "plait.modules.adapter",
    "ConstrainedJSONAdapter": "plait.modules.adapter",
    "on_fields_closed": "plait.modules.field_events",
    "prefill_stage": "plait.modules.prefill",
    "stage_prefill": "plait.modules.prefill",
    "pin_static_prefixes": "plait.modules.prefill",
    "load_program": "plait.compilers.artifact",
}
_SUBPACKAGES = ("backends", "modules", "retrievers", "compilers", "pipelines", "serve", "store")

__all__ = [*_EXPORTS, *_SUBPACKAGES, "PlaitError", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"plait.{name}")
    raise AttributeError(f"module 'plait' has no attribute {name!r}")
