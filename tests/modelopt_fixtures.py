"""Tiny NVIDIA ModelOpt checkpoints (FP8, NVFP4, MIXED_PRECISION), made by the tests' own quantizer.

The seeded tiny transformers checkpoints of nemotron_fixtures are quantized here, without plait,
into the layout ModelOpt's Hugging Face export writes: per quantized linear layer
  FP8    weight float8_e4m3fn [out, in], weight_scale and input_scale fp32 scalars;
  NVFP4  weight uint8 [out, in/2] (low nibble = even element), weight_scale float8_e4m3fn
         [out, in/16], weight_scale_2 and input_scale fp32 scalars;
every other tensor in bf16; optional k_scale / v_scale on attention layers (FP8 KV cache);
hf_quant_config.json and/or config.json's flat quantization_config. Beside it goes a plain fp32
checkpoint of exactly the weights the quantized files encode, which transformers loads as the
reference.
"""

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.nemotron_fixtures import write_checkpoint

FP8, NVFP4, MIXED = "FP8", "NVFP4", "MIXED_PRECISION"
FP8_MAX = 448.0
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
GROUP = 16
QUANT_FILE, CONFIG_FILE = "hf_quant_config.json", "config.json"
PRODUCER = {"name": "modelopt", "version": "0.39.0"}


def quantize_fp8(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-tensor FP8 E4M3 with scale amax/448: (stored tensors, what they dequantize to)."""
    scale = (w.abs().max() / FP8_MAX).float()
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    stored = {"weight": q, "weight_scale": scale, "input_scale": torch.tensor(0.02)}
    return stored, q.float() * scale


def quantize_nvfp4(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """NVFP4: a global scale amax/(6*448), one FP8 scale per 16 inputs, e2m1 codes rounded to
    nearest, packed two per byte (even element in the low nibble, sign in bit 3)."""
    out_features, in_features = w.shape
    scale_2 = (w.abs().max() / (6 * FP8_MAX)).float()
    blocks = w.float().view(out_features, in_features // GROUP, GROUP)
    block_scale = (blocks.abs().amax(-1) / 6 / scale_2).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    step = block_scale.float() * scale_2
    x = blocks / torch.where(step == 0, 1.0, step)[..., None]
    magnitude = (x.abs()[..., None] - E2M1_GRID).abs().argmin(-1)
    negative = x < 0
    codes = (magnitude | (negative.long() << 3)).to(torch.uint8).view(out_features, in_features)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    values = torch.where(negative, -E2M1_GRID[magnitude], E2M1_GRID[magnitude])
    dequantized = values * block_scale.float()[..., None] * scale_2
    stored = {
        "weight": packed,
        "weight_scale": block_scale,
        "weight_scale_2": scale_2,
        "input_scale": torch.tensor(0.03),
    }
    return stored, dequantized.view(out_features, in_features)


QUANTIZERS = {FP8: quantize_fp8, NVFP4: quantize_nvfp4}


def is_linear(key: str) -> bool:
    """A linear layer's weight in a Nemotron-H checkpoint (every one is a *_proj or the head;
    the router, conv1d, norms and embeddings are not linear layers)."""
    return key.endswith("proj.weight") or key == "lm_head.weight"


@dataclass
class QuantizedCheckpoint:
    directory: Path
    reference_dir: Path
    """A plain fp32 checkpoint of the weights the quantized files encode."""
    formats: dict[str, str]
    """The quantized modules and their format."""
    reference: dict[str, torch.Tensor]
    """Every tensor, by checkpoint key, as the quantized files encode it (fp32)."""


def _quant_sections(
    algo: str | None, exclude: list[str], kv_cache: bool, formats: dict[str, str]
) -> tuple[dict, dict]:
    """(hf_quant_config.json's "quantization" object, config.json's flat quantization_config)."""
    layers = {
        m: {"quant_algo": f} | ({"group_size": GROUP} if f == NVFP4 else {}) for m, f in formats.items()
    }
    extra = ({"group_size": GROUP} if algo in (NVFP4, MIXED) else {}) | (
        {"quantized_layers": layers} if algo == MIXED else {}
    )
    nested = {
        "quant_algo": algo,
        "kv_cache_quant_algo": FP8 if kv_cache else None,
        "exclude_modules": exclude,
    }
    flat = {"quant_method": "modelopt", "quant_algo": algo, "ignore": exclude, "producer": PRODUCER}
    if kv_cache:
        flat["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return nested | extra, flat | extra


def write_modelopt(
    directory: Path,
    kind: str,
    formats: Callable[[str], str | None],
    *,
    algo: str | None,
    exclude: Iterable[str] = (),
    kv_scales: bool = False,
    files: Iterable[str] = (QUANT_FILE, CONFIG_FILE),
    seed: int = 0,
    **overrides,
) -> QuantizedCheckpoint:
    """Write a ModelOpt checkpoint of the tiny `kind` model to `directory`.

    `formats(module)` says how each linear layer is stored (FP8, NVFP4 or None: bf16); `algo`,
    `exclude` and the MIXED_PRECISION map written from `formats` must describe the same thing,
    since the loader reads the config, not these choices. `files` says where the quantization
    config goes (hf_quant_config.json, config.json's quantization_config, both, or neither:
    then `algo` must be None and this is a plain bf16 checkpoint). With `kv_scales`, attention
    layers get FP8 KV-cache scales, under the HF export's names (k_proj.k_scale) on the first
    attention layer and Megatron's (mixer.k_scale) on the others.
    """
    reference_dir = directory.with_name(directory.name + "-reference")
    write_checkpoint(reference_dir, kind, seed=seed, **overrides)
    stored: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    used: dict[str, str] = {}
    for key, w in load_file(reference_dir / "model.safetensors").items():
        module = key.removesuffix(".weight")
        fmt = formats(module) if is_linear(key) else None
        if fmt is None:
            stored[key] = w.to(torch.bfloat16)
            reference[key] = stored[key].float()
            continue
        tensors, reference[key] = QUANTIZERS[fmt](w)
        stored |= {f"{module}.{name}": t for name, t in tensors.items()}
        used[module] = fmt
    if kv_scales:
        attention = sorted(
            k.removesuffix(".k_proj.weight") for k in reference if k.endswith(".k_proj.weight")
        )
        for i, mixer in enumerate(attention):
            k_name, v_name = ("k_proj.k_scale", "v_proj.v_scale") if i == 0 else ("k_scale", "v_scale")
            stored[f"{mixer}.{k_name}"] = torch.tensor(0.05)
            stored[f"{mixer}.{v_name}"] = torch.tensor(0.04)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(stored, directory / "model.safetensors", metadata={"format": "pt"})
    save_file(reference, reference_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(reference_dir / "generation_config.json", directory)
    nested, flat = _quant_sections(algo, list(exclude), kv_scales, used)
    config = json.loads((reference_dir / CONFIG_FILE).read_text())
    if CONFIG_FILE in files:
        config["quantization_config"] = flat
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if QUANT_FILE in files:
        (directory / QUANT_FILE).write_text(json.dumps({"producer": PRODUCER, "quantization": nested}))
    return QuantizedCheckpoint(directory, reference_dir, used, reference)
