"""Loading a Hugging Face Nemotron-H checkpoint directory: config.json + *.safetensors.

Every name and shape is checked from the safetensors headers before any weight is read, so a
mismatched checkpoint fails fast; then tensors are read one at a time into the model's dtype.
NVIDIA ModelOpt FP8 / NVFP4 / MIXED_PRECISION checkpoints load as they are: each quantized
weight is read with its scales and dequantized on the way in (`plait.backends.loading.modelopt`).
"""

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from plait.backends.loading.modelopt import (
    KV_SCALES,
    QUANTIZED_DTYPES,
    Header,
    check_quantized,
    dequantize,
    is_scale,
    read_quant_config,
)
from plait.backends.models.moe import RoutedExperts
from plait.backends.models.nemotron_h import NemotronHForCausalLM, param_dtype
from plait.backends.models.nemotron_h_config import NemotronHConfig
from plait.errors import CheckpointError

logger = logging.getLogger(__name__)

HF_PREFIXES = ("backbone.", "model.")
MULTIMODAL_PREFIX = "language_model."
"""Multimodal checkpoints keep the language model's weights, MTP head included, under this."""
MTP_PREFIX = "mtp."


def _plait_name(hf_name: str, mtp: bool) -> str | None:
    """HF parameter name -> plait's. The MTP head's weights keep their `mtp.` name, or are
    skipped (None) when the config has no MTP layers: a draft head plait was not asked to run."""
    name = hf_name.removeprefix(MULTIMODAL_PREFIX)
    if name.startswith(MTP_PREFIX):
        return name if mtp else None
    for prefix in HF_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {index}: {exc}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{directory}: shards listed in {index.name} are missing: {', '.join(missing)}"
            )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {directory}")
    return files


def _expert_slot(name: str) -> tuple[str, int] | None:
    """`layers.L.mixer.experts.E.up_proj.weight` (HF stores one matrix per expert; likewise
    under `mtp.`) -> (`layers.L.mixer.experts.up_proj`, E): plait stacks them as [E, out, in]."""
    parts = name.split(".")
    if len(parts) >= 5 and parts[-4] == "experts" and parts[-3].isdigit() and parts[-1] == "weight":
        return ".".join(parts[:-3] + [parts[-2]]), int(parts[-3])
    return None


def _open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"corrupt or unreadable weights file {path}: {exc}")


def _headers(directory: Path) -> dict[str, Header]:
    """Every tensor's file, shape and dtype, from the headers alone (a weight's scales may sit
    in another shard)."""
    from safetensors import SafetensorError

    headers: dict[str, Header] = {}
    for path in _checkpoint_files(directory):
        try:
            with _open(path) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensor = f.get_slice(key)
                    headers[key] = Header(path, tuple(tensor.get_shape()), tensor.get_dtype())
        except (SafetensorError, OSError, ValueError) as exc:
            raise _unreadable(path, exc) from None
    return headers


def _linear_weights(model: nn.Module) -> set[str]:
    """The parameters a quantized checkpoint may store quantized: linear layers' weights and the
    routed experts' (stored per expert as linear layers). Norms, embeddings, conv1d, the router
    and the SSM parameters are never quantized."""
    names = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            names.update(f"{name}.{p}" for p, _ in m.named_parameters(recurse=False))
    return names


def _on_attention(name: str, params: dict[str, torch.Tensor]) -> bool:
    """An FP8 KV cache's k_scale / v_scale, on an attention mixer or on its k_proj / v_proj."""
    module, _, leaf = name.rpartition(".")
    mixer = module.removesuffix(".k_proj").removesuffix(".v_proj")
    return leaf in KV_SCALES and f"{mixer}.k_proj.weight" in params


class _Read(NamedTuple):
    """One tensor to read: into `target` (row `index` of stacked experts), dequantized by
    `scheme` with `scales` ({scale name: key}) when it is stored quantized."""

    key: str
    target: str
    index: int | None
    scheme: str | None
    scales: dict[str, str]


def load_nemotron_h(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    dt_clamp: str = "transformers",
    config: NemotronHConfig | None = None,
) -> NemotronHForCausalLM:
    """Build a model from a HF checkpoint directory (config.json + *.safetensors, sharded or not).

    Every name and shape is checked from the safetensors headers before any weight is read, so
    a mismatched checkpoint fails fast; then tensors are read one at a time, converted to
    `dtype` (the `FP32_PARAMS` stay fp32) and moved to `device`, experts straight into their
    stacked tensor, so peak memory stays near the model's own size.

    A ModelOpt checkpoint (hf_quant_config.json, or a "modelopt" quantization_config in
    config.json) is checked the same way, a quantized weight against the shape its format packs
    the config's shape into, with its scales; it is then dequantized to `dtype`. Activation and
    KV-cache scales are accepted and not used: activations and the KV cache stay in `dtype`.

    A multi-token prediction head (`mtp.*`, Nemotron 3 Super) loads into `model.mtp` when the
    config has MTP layers (`num_nextn_predict_layers`), and is skipped when it has none.

    `config`: the directory's config.json when the caller has already read it (the registry
    does, to learn the model type), else it is read here.

    Raises `CheckpointError` naming what is wrong: missing or corrupt files, a bad config,
    weights the model does not have or lacks, shapes that do not match the config, or a
    quantized weight whose format, scales or quantization config do not fit together.
    """
    from safetensors import SafetensorError

    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    cfg = config or NemotronHConfig.from_json_file(directory / "config.json", dt_clamp=dt_clamp)
    quant = read_quant_config(directory)
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embeddings
    params.update(model.named_buffers())
    linear_weights = _linear_weights(model)
    mtp = model.mtp is not None

    # Pass 1: headers only.
    headers = _headers(directory)
    plan: list[_Read] = []
    unknown: list[str] = []
    experts_seen: dict[str, set[int]] = {}
    scales_read: set[str] = set()
    for key, header in headers.items():
        name = _plait_name(key, mtp)
        if name is None or (quant is not None and is_scale(key)):
            continue  # scales are taken with their weight, or checked below
        if name == "lm_head.weight" and name not in params:
            # Tied by the config, yet the checkpoint has its own head (transformers 5.23 never
            # ties Nemotron-H): use it, as transformers does.
            model.lm_head.weight = nn.Parameter(torch.empty_like(params["embeddings.weight"]))
            params[name] = model.lm_head.weight
        slot = _expert_slot(name)
        target, index = slot if slot else (name, None)
        if target not in params:
            unknown.append(name)
            continue
        expected = tuple(params[target].shape[1:] if index is not None else params[target].shape)
        if index is not None and index >= params[target].shape[0]:
            raise CheckpointError(
                f"{directory}: weight {name} is expert {index}, the config has {params[target].shape[0]}"
            )
        scheme = quant.scheme(key.removesuffix(".weight")) if quant and target in linear_weights else None
        scales: dict[str, str] = {}
        if scheme is not None:
            scales = check_quantized(key, scheme, expected, headers, quant.source)
            scales_read.update(scales.values())
        elif header.shape != expected:
            raise CheckpointError(
                f"{directory}: weight {name} has shape {header.shape}, the config implies {expected}"
            )
        elif header.dtype in QUANTIZED_DTYPES:
            said = quant.source if quant else "no quantization config (hf_quant_config.json)"
            raise CheckpointError(
                f"{directory}: {key} is stored as {header.dtype}, a quantized type, but {said} "
                "does not make it a quantized layer"
            )
        if index is not None:
            experts_seen.setdefault(target, set()).add(index)
        plan.append(_Read(key, target, index, scheme, scales))
    if unknown:
        with_scales = any(map(is_scale, unknown))
        hint = " (quantization scales, but no ModelOpt hf_quant_config.json)" if with_scales else ""
        raise CheckpointError(
            f"{directory}: {len(unknown)} weights the config does not account for, "
            f"e.g. {', '.join(sorted(unknown)[:5])}{hint}"
        )
    if quant is not None:
        stray = sorted(
            key
            for key in headers
            if is_scale(key)
            and key not in scales_read
            and (name := _plait_name(key, mtp)) is not None
            and not _on_attention(name, params)
        )
        if stray:
            raise CheckpointError(
                f"scales that belong to no quantized weight ({len(stray)}), e.g. "
                f"{', '.join(stray[:5])}: {quant.source} leaves their layers unquantized "
                "(exclude_modules, quantized_layers) or their weight is missing"
            )
    loaded = {r.target for r in plan if r.index is None}
    loaded |= {t for t, seen in experts_seen.items() if len(seen) == params[t].shape[0]}
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} weights missing, e.g. {', '.join(missing[:5])}")
    if quant is not None:
        logger.info(
            "%s: ModelOpt %s checkpoint, weights dequantized to %s at load (KV cache %s kept in %s)",
            directory,
            quant.algo or "KV-cache-only",
            dtype,
            quant.kv_cache or "unquantized",
            dtype,
        )

    # Pass 2: read, convert, place.
    state = {
        name: torch.empty(params[name].shape, dtype=param_dtype(name, dtype), device=device)
        for name in experts_seen
    }
    with ExitStack() as files:
        handles = {}

        def read(key: str) -> torch.Tensor:
            path = headers[key].path
            if path not in handles:
                handles[path] = files.enter_context(_open(path))
            return handles[path].get_tensor(key)

        for r in plan:
            target_dtype = param_dtype(r.target, dtype)
            try:
                tensor = read(r.key).to(device)
                if r.scheme is not None:
                    scales = {name: read(key).to(device) for name, key in r.scales.items()}
                    tensor = dequantize(r.scheme, tensor, scales, target_dtype)
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise _unreadable(headers[r.key].path, exc) from None
            if r.index is None:
                state[r.target] = tensor.to(dtype=target_dtype)
            else:
                state[r.target][r.index].copy_(tensor)
    model.load_state_dict(state, strict=False, assign=True)
    if "lm_head.weight" not in state:
        model.lm_head.weight = model.embeddings.weight
    model.requires_grad_(False)
    return model.eval()
