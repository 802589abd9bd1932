"""plait: declarative LM pipelines (DSPy programs) compiled and served on a local engine."""

import os

# No network at run time: litellm (DSPy's dependency) must not fetch its cost map.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
