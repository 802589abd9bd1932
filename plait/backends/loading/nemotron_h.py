"""Loading a Hugging Face Nemotron-H checkpoint directory: config.json + *.safetensors.

Every name and shape is checked from the safetensors headers before any weight is read, so a
mismatched checkpoint fails fast; then tensors are read one at a time into the model's dtype.
"""

import json
from pathlib import Path

import torch
from torch import nn

from plait.backends.models.nemotron_h import NemotronHForCausalLM, param_dtype
from plait.backends.models.nemotron_h_config import NemotronHConfig
from plait.errors import CheckpointError

HF_PREFIXES = ("backbone.", "model.")
IGNORED_PREFIXES = ("mtp.",)
"""Multi-token-prediction heads (Nemotron-3) are for speculative decoding; not used here."""


def _plait_name(hf_name: str) -> str | None:
    """HF parameter name -> plait's (None for weights plait deliberately skips)."""
    if hf_name.startswith(IGNORED_PREFIXES):
        return None
    for prefix in HF_PREFIXES:
        if hf_name.startswith(prefix):
            return hf_name[len(prefix) :]
    return hf_name


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
    """`layers.L.mixer.experts.E.up_proj.weight` (HF stores one matrix per expert) ->
    (`layers.L.mixer.experts.up_proj`, E): plait stacks them as [E, out, in]."""
    parts = name.split(".")
    if len(parts) == 7 and parts[3] == "experts" and parts[4].isdigit() and parts[6] == "weight":
        return ".".join(parts[:4] + [parts[5]]), int(parts[4])
    return None


def _open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"corrupt or unreadable weights file {path}: {exc}")


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

    `config`: the directory's config.json when the caller has already read it (the registry
    does, to learn the model type), else it is read here.

    Raises `CheckpointError` naming what is wrong: missing or corrupt files, a bad config,
    weights the model does not have or lacks, or shapes that do not match the config.
    """
    from safetensors import SafetensorError

    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    cfg = config or NemotronHConfig.from_json_file(directory / "config.json", dt_clamp=dt_clamp)
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embeddings
    params.update(model.named_buffers())

    # Pass 1: headers only. plan: (file, HF key, plait name, expert index or None)
    plan: list[tuple[Path, str, str, int | None]] = []
    unknown, experts_seen = [], {}
    for path in _checkpoint_files(directory):
        try:
            with _open(path) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    name = _plait_name(key)
                    if name is None:
                        continue
                    if name == "lm_head.weight" and name not in params:
                        # Tied by the config, yet the checkpoint has its own head (transformers
                        # 5.23 never ties Nemotron-H): use it, as transformers does.
                        model.lm_head.weight = nn.Parameter(torch.empty_like(params["embeddings.weight"]))
                        params[name] = model.lm_head.weight
                    slot = _expert_slot(name)
                    target, index = slot if slot else (name, None)
                    if target not in params:
                        unknown.append(name)
                        continue
                    shape = tuple(f.get_slice(key).get_shape())
                    expected = tuple(params[target].shape[1:] if index is not None else params[target].shape)
                    if shape != expected or (index is not None and index >= params[target].shape[0]):
                        raise CheckpointError(
                            f"{directory}: weight {name} has shape {shape}, the config implies {expected}"
                        )
                    if index is not None:
                        experts_seen.setdefault(target, set()).add(index)
                    plan.append((path, key, target, index))
        except (SafetensorError, OSError, ValueError) as exc:
            raise _unreadable(path, exc) from None
    if unknown:
        raise CheckpointError(
            f"{directory}: {len(unknown)} weights the config does not account for, "
            f"e.g. {', '.join(sorted(unknown)[:5])}"
        )
    loaded = {target for _, _, target, index in plan if index is None}
    loaded |= {t for t, seen in experts_seen.items() if len(seen) == params[t].shape[0]}
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} weights missing, e.g. {', '.join(missing[:5])}")

    # Pass 2: read, convert, place.
    state = {
        name: torch.empty(params[name].shape, dtype=param_dtype(name, dtype), device=device)
        for name in experts_seen
    }
    by_file: dict[Path, list[tuple[str, str, int | None]]] = {}
    for path, key, target, index in plan:
        by_file.setdefault(path, []).append((key, target, index))
    for path, entries in by_file.items():
        try:
            with _open(path) as f:
                for key, target, index in entries:
                    tensor = f.get_tensor(key)
                    if index is None:
                        state[target] = tensor.to(device=device, dtype=param_dtype(target, dtype))
                    else:
                        state[target][index].copy_(tensor)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _unreadable(path, exc) from None
    model.load_state_dict(state, strict=False, assign=True)
    if "lm_head.weight" not in state:
        model.lm_head.weight = model.embeddings.weight
    model.requires_grad_(False)
    return model.eval()
