"""NVIDIA ModelOpt quantized checkpoints (FP8, NVFP4, MIXED_PRECISION), read as they are.

ModelOpt's Hugging Face export keeps every tensor name of the original checkpoint and stores,
beside each quantized linear layer's `weight`, the scales needed to read it:

  FP8    weight float8_e4m3fn [out, in]                weight_scale fp32 scalar
  NVFP4  weight uint8 [out, in/2] (two e2m1 codes      weight_scale float8_e4m3fn [out, in/16]
         per byte)                                     weight_scale_2 fp32 scalar
  both   input_scale fp32 scalar (the static activation scale; may be absent)

and `k_scale` / `v_scale` on attention layers when the KV cache is FP8. Which layers carry which
format is described by `hf_quant_config.json` ({"producer": ..., "quantization": {"quant_algo",
"exclude_modules", "kv_cache_quant_algo", "group_size", "quantized_layers"}}) and by its flat
copy in config.json's `quantization_config` (`quant_method: "modelopt"`, `ignore` for the
exclusions). Module names in both are the checkpoint's own (`backbone.layers.3.mixer.in_proj`).

plait dequantizes these weights once, at load, into the run dtype: its PyTorch path has no FP8
or FP4 matmul (weight-only requantisation for CPU decode is `quant.py`'s job, after loading).
The activation and KV-cache scales exist for engines that also quantize activations and the KV
cache; plait keeps both in the run dtype, so those scales are checked and then dropped. A model
loaded here computes what the original network computes with the dequantized weights, not what
an FP8/FP4 kernel, which also rounds activations, would.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import torch

from plait.backends.models.nemotron_h_config import read_config_json
from plait.errors import CheckpointError

FP8, NVFP4, MIXED = "FP8", "NVFP4", "MIXED_PRECISION"
LAYER_FORMATS = (FP8, NVFP4)
"""What a single layer can be stored as (MIXED_PRECISION picks one of these per layer)."""
KV_CACHE_FORMATS = (FP8,)
NVFP4_GROUP = 16
"""Elements per NVFP4 block scale, along the input dimension (ModelOpt's only NVFP4 layout)."""

WEIGHT_SCALES = ("weight_scale", "weight_scale_2", "input_scale")
KV_SCALES = ("k_scale", "v_scale")
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "U8", "I8")
"""safetensors dtypes a weight is never stored in unless it is quantized."""
SCALAR_DTYPES = ("F32", "F16", "BF16")

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""The values of an e2m1 (FP4) code's low 3 bits; bit 3 is the sign."""


class Header(NamedTuple):
    """One tensor as its safetensors header describes it: checked before any data is read."""

    path: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's ModelOpt quantization, validated.

    `algo` None means the weights are not quantized (a KV-cache-only export); `layers` is
    MIXED_PRECISION's module -> FP8/NVFP4 map; `source` is the file it came from, for errors.
    """

    algo: str | None
    source: str
    exclude: tuple[str, ...] = ()
    layers: Mapping[str, str] = field(default_factory=dict)
    kv_cache: str | None = None

    def scheme(self, module: str) -> str | None:
        """FP8, NVFP4, or None (stored unquantized) for a linear layer, named as in the
        checkpoint. exclude_modules (names or glob patterns) win over everything; under
        MIXED_PRECISION a layer missing from `quantized_layers` is unquantized, as in vLLM."""
        if self.algo is None or any(fnmatchcase(module, pattern) for pattern in self.exclude):
            return None
        if self.algo == MIXED:
            return self.layers.get(module)
        return self.algo


def _group_size(value: Any, where: str) -> None:
    if value is not None and value != NVFP4_GROUP:
        raise CheckpointError(
            f"{where}: NVFP4 group_size {value!r} is not supported (ModelOpt writes {NVFP4_GROUP})"
        )


def _kv_cache_format(value: Any, where: str) -> str | None:
    """kv_cache_quant_algo ("FP8" or null), or the flat form's kv_cache_scheme, which is that
    string or {"type": "float", "num_bits": 8, ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = FP8 if value.get("type") == "float" and value.get("num_bits") == 8 else repr(value)
    fmt = str(value).upper()
    if fmt not in KV_CACHE_FORMATS:
        raise CheckpointError(
            f"{where}: kv_cache_quant_algo {value} is not supported (FP8, or none; plait keeps the "
            "KV cache in the run dtype)"
        )
    return fmt


def _parse(section: dict[str, Any], where: str) -> QuantConfig:
    """The quantization section of either file: hf_quant_config.json's "quantization" object or
    config.json's flat quantization_config (which says `ignore` and `kv_cache_scheme`)."""
    raw_algo = section.get("quant_algo")
    algo = None if raw_algo is None else str(raw_algo).upper()
    if algo is not None and algo not in (*LAYER_FORMATS, MIXED):
        raise CheckpointError(
            f"{where}: quant_algo {raw_algo!r} is not supported; plait reads ModelOpt FP8, NVFP4 and "
            "MIXED_PRECISION (of FP8 and NVFP4 layers) checkpoints"
        )
    exclude = section.get("exclude_modules", section.get("ignore")) or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise CheckpointError(f"{where}: exclude_modules should be a list of module names, got {exclude!r}")
    if algo in (NVFP4, MIXED):
        _group_size(section.get("group_size"), where)
    layers: dict[str, str] = {}
    if algo == MIXED:
        quantized = section.get("quantized_layers")
        if not isinstance(quantized, dict) or not quantized:
            raise CheckpointError(f"{where}: MIXED_PRECISION needs a non-empty quantized_layers map")
        for module, spec in quantized.items():
            layer_algo = str(spec.get("quant_algo")).upper() if isinstance(spec, dict) else None
            if layer_algo not in LAYER_FORMATS:
                raise CheckpointError(
                    f"{where}: quantized_layers[{module!r}] is {spec!r}; plait reads FP8 and NVFP4 layers"
                )
            if layer_algo == NVFP4:
                _group_size(spec.get("group_size"), f"{where}: quantized_layers[{module!r}]")
            layers[module] = layer_algo
    kv_cache = _kv_cache_format(section.get("kv_cache_quant_algo", section.get("kv_cache_scheme")), where)
    return QuantConfig(algo, where, tuple(exclude), layers, kv_cache)


def read_quant_config(directory: Path) -> QuantConfig | None:
    """The checkpoint's ModelOpt quantization, or None for an unquantized checkpoint.

    When both files describe it, hf_quant_config.json is used (ModelOpt writes it first, and
    only it is sure to hold MIXED_PRECISION's per-layer map) and config.json must agree on the
    quant_algo. A config.json quantization_config of another method is refused by name rather
    than read as plain weights.
    """
    hf_file = directory / "hf_quant_config.json"
    flat = read_config_json(directory / "config.json").get("quantization_config")
    flat_where = "config.json quantization_config"
    if flat is not None and (
        not isinstance(flat, dict) or str(flat.get("quant_method", "")).lower() != "modelopt"
    ):
        method = flat.get("quant_method") if isinstance(flat, dict) else flat
        raise CheckpointError(
            f"{directory}: {flat_where} has quant_method {method!r}; plait reads unquantized "
            'checkpoints and NVIDIA ModelOpt ones (quant_method "modelopt")'
        )
    if not hf_file.exists():
        return None if flat is None else _parse(flat, f"{directory / 'config.json'} quantization_config")
    try:
        section = json.loads(hf_file.read_text(encoding="utf-8")).get("quantization")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {hf_file}: {exc}") from None
    if not isinstance(section, dict):
        raise CheckpointError(f'{hf_file}: no "quantization" object')
    config = _parse(section, str(hf_file))
    if flat is not None and str(flat.get("quant_algo")).upper() != str(config.algo).upper():
        raise CheckpointError(
            f"{directory}: {hf_file.name} says quant_algo {config.algo}, {flat_where} says "
            f"{flat.get('quant_algo')}"
        )
    return config


def is_scale(key: str) -> bool:
    """A weight's or the KV cache's quantization scale (read with, or instead of, its weight)."""
    return key.rpartition(".")[2] in WEIGHT_SCALES + KV_SCALES


def _is_scalar(header: Header) -> bool:
    return header.dtype in SCALAR_DTYPES and len(header.shape) <= 1 and all(n == 1 for n in header.shape)


def check_quantized(
    key: str, scheme: str, expected: tuple[int, ...], headers: Mapping[str, Header], source: str
) -> dict[str, str]:
    """Check a quantized `weight` and its scales from their headers against the [out, in] shape
    the model config implies; returns {scale name: key} of the scales stored with it (an
    input_scale too, so it counts as the weight's, although `dequantize` does not use it).

    Raises `CheckpointError` naming the tensor: a wrong dtype or (packed) shape, a missing scale.
    """
    module = key.removesuffix(".weight")
    out_features, in_features = expected
    per = f"{scheme} per {source}"
    if scheme == NVFP4 and in_features % NVFP4_GROUP:
        raise CheckpointError(
            f"{key}: NVFP4 needs the input size ({in_features}) to be a multiple of {NVFP4_GROUP} ({per})"
        )
    want = ("F8_E4M3", expected) if scheme == FP8 else ("U8", (out_features, in_features // 2))
    stored = headers[key]
    if (stored.dtype, stored.shape) != want:
        packed = ", two e2m1 codes per byte" if scheme == NVFP4 else ""
        raise CheckpointError(
            f"{key} is stored as {stored.dtype} {list(stored.shape)}; the [{out_features}, {in_features}] "
            f"weight the config implies should be {want[0]} {list(want[1])}{packed} ({per})"
        )
    scales = {"weight_scale": f"{module}.weight_scale"}
    if scheme == NVFP4:
        scales["weight_scale_2"] = f"{module}.weight_scale_2"
    for name, scale_key in scales.items():
        header = headers.get(scale_key)
        if header is None:
            raise CheckpointError(f"{scale_key} is missing: {key} cannot be read without it ({per})")
        if name == "weight_scale" and scheme == NVFP4:
            block = (out_features, in_features // NVFP4_GROUP)
            if (header.dtype, header.shape) != ("F8_E4M3", block):
                raise CheckpointError(
                    f"{scale_key} is {header.dtype} {list(header.shape)}; the block scales of a "
                    f"[{out_features}, {in_features}] weight are F8_E4M3 {list(block)} ({per})"
                )
        elif not _is_scalar(header):
            raise CheckpointError(
                f"{scale_key} is {header.dtype} {list(header.shape)}, not one fp32 number ({per})"
            )
    input_scale = f"{module}.input_scale"
    if input_scale in headers:
        header = headers[input_scale]
        if not _is_scalar(header):
            raise CheckpointError(
                f"{input_scale} is {header.dtype} {list(header.shape)}, not one fp32 number ({per})"
            )
        scales["input_scale"] = input_scale
    return scales


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 (E4M3), one scale per tensor: W = weight.float() * weight_scale (fp32), cast to `dtype`."""
    return (weight.float() * weight_scale.float().reshape(())).to(dtype)


def e2m1_byte_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """[256, 2] fp32: the two e2m1 values a byte holds, the low nibble's first (it is the even
    element). In a 4-bit code bit 3 is the sign and bits 0-2 index `E2M1`."""
    codes = torch.tensor(E2M1 + tuple(-v for v in E2M1), device=device)
    byte = torch.arange(256, device=device)
    return torch.stack((codes[byte & 0x0F], codes[byte >> 4]), dim=-1)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> fp32 [..., 2n]: element 2j is byte j's low nibble, 2j+1 its high one."""
    # index_select with int32 indices: 2.5x faster on CPU than indexing, half the index memory
    values = torch.index_select(e2m1_byte_table(packed.device), 0, packed.flatten().int())
    return values.view(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize_nvfp4(
    weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """NVFP4: W[o, i] = e2m1(weight)[o, i] * weight_scale[o, i // 16] * weight_scale_2, in fp32
    (the block scale is FP8 E4M3, the global one fp32), cast to `dtype`."""
    values = unpack_e2m1(weight)
    out_features, in_features = values.shape
    blocks = values.view(out_features, in_features // NVFP4_GROUP, NVFP4_GROUP)
    blocks = blocks * weight_scale.float()[..., None] * weight_scale_2.float().reshape(())
    return blocks.view(out_features, in_features).to(dtype)


CHUNK_ELEMENTS = 1 << 20
"""Dequantize this many weights at a time, so the fp32 intermediates (and NVFP4's int32 byte
indices) stay a few MB instead of several fp32 copies of the largest matrix (gigabytes for a
quantized 131072 x 4480 head). Measured on a 33M-parameter NVFP4 model (2 cores, 1 thread): peak
RSS of the load 24 MB lower and the load 1.5x faster; FP8 the same either way."""


def dequantize(
    scheme: str, weight: torch.Tensor, scales: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """A weight checked by `check_quantized`, with the scales it returned, in `dtype`; computed
    in blocks of rows (every scale is per tensor or per row, so rows dequantize independently)."""
    rows = weight.shape[0]
    in_features = weight.shape[1] * (2 if scheme == NVFP4 else 1)
    out = torch.empty(rows, in_features, dtype=dtype, device=weight.device)
    step = max(1, CHUNK_ELEMENTS // in_features)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        if scheme == FP8:
            out[part] = dequantize_fp8(weight[part], scales["weight_scale"], dtype)
        else:
            out[part] = dequantize_nvfp4(
                weight[part], scales["weight_scale"][part], scales["weight_scale_2"], dtype
            )
    return out
