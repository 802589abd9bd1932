"""plait: declarative LM pipelines (DSPy programs) compiled and served on a local engine."""

import os

from plait.paths import plait_home

# No network at run time, and DSPy's cache inside plait's own directory. Both must be set
# before DSPy (and litellm under it) is first imported.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DSPY_CACHEDIR", str(plait_home() / "cache" / "dspy"))

from plait.backends.dspy_engine import LM, PlaitEngine  # noqa: E402
from plait.backends.engine import Engine, GenerationResult  # noqa: E402
from plait.errors import PlaitError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["LM", "Engine", "GenerationResult", "PlaitEngine", "PlaitError", "__version__"]
