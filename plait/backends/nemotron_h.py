"""Nemotron-H: a hybrid of Mamba-2, attention (no positional encoding), MLP and MoE layers.

Every layer is the same pre-norm residual block, `x + mixer(norm(x))`; only the mixer differs,
chosen per layer by the checkpoint's pattern (`M` Mamba-2, `*` attention, `-` squared-ReLU MLP,
`E` mixture of experts). The Mamba layers carry position, so attention uses no RoPE.

Parameter names are the HF checkpoint names without their `backbone.` (or `model.`) prefix, so
loading needs no rename map beyond that prefix and stacking per-expert MoE matrices.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plait.backends.attention import Attention
from plait.backends.cache import Batch, LayerState, StateSpec
from plait.backends.mamba2 import DtClamp, Mamba2Config, Mamba2Mixer
from plait.backends.model import CausalLM
from plait.backends.moe import MoEConfig, NemotronMoE, ReLU2MLP
from plait.errors import CheckpointError

MAMBA, ATTENTION, MLP, MOE = "mamba", "attention", "mlp", "moe"

PATTERN_SYMBOLS = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}
"""`hybrid_override_pattern` symbols (older checkpoints: Nemotron-H-8B, Nano-9B-v2)."""

BLOCK_TYPE_NAMES = {
    "mamba": MAMBA, "linear_attention": MAMBA,
    "attention": ATTENTION, "full_attention": ATTENTION,
    "mlp": MLP, "moe": MOE,
}
"""`layers_block_type` names: transformers 5 writes linear_attention/full_attention."""

LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
    "layer_types": "layers_block_type",
}
"""Old config keys and the names transformers 5 uses for them."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _float(value: Any, key: str) -> float:
    """A float from config JSON, where infinity may be spelled `Infinity` (Python's json reads
    it as float inf), "inf"/"Infinity" as a string, or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json: {key} should be a number, got {value!r}") from None


@dataclass
class NemotronHConfig:
    """The fields of a HF Nemotron-H config.json that the model uses, with transformers 5.23's
    defaults; `layer_types` holds plait's names (mamba, attention, mlp, moe) whichever way the
    file spelled the pattern. `dt_clamp` is plait's option (see `DtClamp`), not a config key."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    layer_types: list[str] = field(default_factory=lambda: [MAMBA, MOE, ATTENTION, MLP])
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = False
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    # MLP
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_hidden_act: str = "silu"
    time_step_min: float = 0.001
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    n_shared_experts: int = 1
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # plait's own choices, not read from config.json
    dt_clamp: str = "transformers"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> "NemotronHConfig":
        """Parse a HF config.json dict (either pattern key, legacy key names, inf spellings)."""
        d = dict(raw)
        for old, new in LEGACY_KEYS.items():
            if old in d and new not in d:
                d[new] = d[old]
        if d.get("layers_block_type") is not None:
            names = d["layers_block_type"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CheckpointError("config.json: layers_block_type should be a list of layer type names")
            unknown = sorted({n for n in names if n not in BLOCK_TYPE_NAMES})
            if unknown:
                raise CheckpointError(f"config.json: unknown layer types {unknown} in layers_block_type "
                                      f"(known: {', '.join(BLOCK_TYPE_NAMES)})")
            layer_types = [BLOCK_TYPE_NAMES[n] for n in names]
        elif d.get("hybrid_override_pattern") is not None:
            pattern = d["hybrid_override_pattern"]
            unknown = sorted({s for s in pattern if s not in PATTERN_SYMBOLS})
            if unknown:
                raise CheckpointError(f"config.json: unknown symbols {unknown} in hybrid_override_pattern "
                                      f"(known: M, *, -, E)")
            layer_types = [PATTERN_SYMBOLS[s] for s in pattern]
        else:
            raise CheckpointError("config.json has neither hybrid_override_pattern nor layers_block_type")
        if not layer_types:
            raise CheckpointError("config.json: the layer pattern is empty")

        kwargs: dict[str, Any] = {"layer_types": layer_types}
        for name, f in cls.__dataclass_fields__.items():
            if name in ("layer_types", "dt_clamp") or d.get(name) is None:
                continue
            value = d[name]
            if name == "time_step_limit":
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise CheckpointError(
                        f"config.json: time_step_limit should be [low, high], got {value!r}")
                value = (_float(value[0], name), _float(value[1], name))
            elif f.type in (float, "float"):
                value = _float(value, name)
            kwargs[name] = value
        if d.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        kwargs.update(overrides)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> "NemotronHConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"no config.json in {Path(path).parent}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a JSON object")
        return cls.from_dict(raw, **overrides)

    def validate(self) -> None:
        if self.mlp_hidden_act != "relu2" and (MLP in self.layer_types or MOE in self.layer_types):
            raise CheckpointError(f"config.json: mlp_hidden_act {self.mlp_hidden_act!r} is not supported "
                                  "(Nemotron-H uses relu2)")
        if MAMBA in self.layer_types:
            if self.mamba_hidden_act != "silu":
                raise CheckpointError(
                    f"config.json: mamba_hidden_act {self.mamba_hidden_act!r} is not supported (silu)")
            if self.mamba_num_heads % self.n_groups:
                raise CheckpointError("config.json: mamba_num_heads must be a multiple of n_groups")
        if ATTENTION in self.layer_types and self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                "config.json: num_attention_heads must be a multiple of num_key_value_heads")
        if MOE in self.layer_types and self.n_routed_experts % self.n_group:
            raise CheckpointError("config.json: n_routed_experts must be a multiple of n_group")
        if self.mamba_ssm_cache_dtype not in DTYPES:
            raise CheckpointError(
                f"config.json: unknown mamba_ssm_cache_dtype {self.mamba_ssm_cache_dtype!r}")
        if self.dt_clamp not in DtClamp.MODES:
            raise CheckpointError(
                f"unknown dt_clamp {self.dt_clamp!r}: expected one of {', '.join(DtClamp.MODES)}")

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def hybrid_override_pattern(self) -> str:
        symbols = {v: k for k, v in PATTERN_SYMBOLS.items()}
        return "".join(symbols[t] for t in self.layer_types)

    def mamba(self) -> Mamba2Config:
        return Mamba2Config(
            hidden_size=self.hidden_size, num_heads=self.mamba_num_heads, head_dim=self.mamba_head_dim,
            state_size=self.ssm_state_size, n_groups=self.n_groups, conv_kernel=self.conv_kernel,
            chunk_size=self.chunk_size, use_conv_bias=self.use_conv_bias, proj_bias=self.use_bias,
            norm_eps=self.layer_norm_epsilon,
            dt_clamp=DtClamp.named(self.dt_clamp, self.time_step_min, self.time_step_limit),
            ssm_state_dtype=DTYPES[self.mamba_ssm_cache_dtype])

    def moe(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size, num_experts=self.n_routed_experts, top_k=self.num_experts_per_tok,
            intermediate_size=self.moe_intermediate_size,
            shared_intermediate_size=self.moe_shared_expert_intermediate_size if self.n_shared_experts else 0,
            latent_size=self.moe_latent_size, n_group=self.n_group, topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=float(self.routed_scaling_factor),
            bias=self.mlp_bias)


class NemotronRMSNorm(nn.Module):
    """RMSNorm whose weight multiplies in fp32 before the cast back (unlike Llama's, which
    casts first); the two differ in bf16, and this is the order Nemotron-H was trained with."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class NemotronHBlock(nn.Module):
    """x + mixer(norm(x)).

    With `residual_in_fp32` the residual stream is kept in fp32 and only the mixer input is in
    the model dtype. transformers 5.23 reads but ignores that flag (its stream stays in the model
    dtype); the published Nemotron-H configs set it to false, so both agree on them.
    """

    def __init__(self, cfg: NemotronHConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = NemotronRMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        if kind == MAMBA:
            self.mixer: nn.Module = Mamba2Mixer(cfg.mamba())
        elif kind == ATTENTION:
            self.mixer = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                   cfg.head_dim, bias=cfg.attention_bias, rope=None)
        elif kind == MLP:
            self.mixer = ReLU2MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        else:
            self.mixer = NemotronMoE(cfg.moe())

    @property
    def stateful(self) -> bool:
        return self.kind in (MAMBA, ATTENTION)

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        h = self.norm(x.to(self.norm.weight.dtype))
        h = self.mixer(h, state) if self.stateful else self.mixer(h)
        return residual + h


class NemotronHForCausalLM(CausalLM):
    def __init__(self, cfg: NemotronHConfig):
        super().__init__()
        self.config = cfg
        self.context_length = cfg.max_position_embeddings
        self.state_chunk = cfg.chunk_size
        self.vocab_size = cfg.vocab_size
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(NemotronHBlock(cfg, kind) for kind in cfg.layer_types)
        self.norm_f = NemotronRMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def state_specs(self, dtype: torch.dtype) -> list[dict[str, StateSpec]]:
        return [layer.mixer.state_specs(dtype) if layer.stateful else {} for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, batch: Batch | None = None,
                last_only: bool = False) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch.layer(i) if batch is not None and layer.stateful else None)
        if last_only:
            x = x[:, -1:] if batch is None else batch.last_tokens(x)
        x = self.norm_f(x).to(self.embeddings.weight.dtype)
        return self.lm_head(x).float()


# ---------------------------------------------------------------------------------------------
# Loading a HF checkpoint directory


HF_PREFIXES = ("backbone.", "model.")
IGNORED_PREFIXES = ("mtp.",)
"""Multi-token-prediction heads (Nemotron-3) are for speculative decoding; not used here."""

FP32_PARAMS = ("e_score_correction_bias", "A_log", "dt_bias", "D")
"""Small parameters that feed fp32 math; kept fp32 whatever the model dtype."""


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter or buffer of a `dtype` model is kept in (see `FP32_PARAMS`)."""
    return torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype


def _plait_name(hf_name: str) -> str | None:
    """HF parameter name -> plait's (None for weights plait deliberately skips)."""
    if hf_name.startswith(IGNORED_PREFIXES):
        return None
    for prefix in HF_PREFIXES:
        if hf_name.startswith(prefix):
            return hf_name[len(prefix):]
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
                f"{directory}: shards listed in {index.name} are missing: {', '.join(missing)}")
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


def load_nemotron_h(checkpoint_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu", *,
                    dt_clamp: str = "transformers") -> NemotronHForCausalLM:
    """Build a model from a HF checkpoint directory (config.json + *.safetensors, sharded or not).

    Every name and shape is checked from the safetensors headers before any weight is read, so
    a mismatched checkpoint fails fast; then tensors are read one at a time, converted to
    `dtype` (the `FP32_PARAMS` stay fp32) and moved to `device`, experts straight into their
    stacked tensor, so peak memory stays near the model's own size.

    Raises `CheckpointError` naming what is wrong: missing or corrupt files, a bad config,
    weights the model does not have or lacks, or shapes that do not match the config.
    """
    from safetensors import SafetensorError

    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    cfg = NemotronHConfig.from_json_file(directory / "config.json", dt_clamp=dt_clamp)
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
                for key in f.keys():
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
                        raise CheckpointError(f"{directory}: weight {name} has shape {shape}, "
                                              f"the config implies {expected}")
                    if index is not None:
                        experts_seen.setdefault(target, set()).add(index)
                    plan.append((path, key, target, index))
        except (SafetensorError, OSError, ValueError) as exc:
            raise _unreadable(path, exc) from None
    if unknown:
        raise CheckpointError(f"{directory}: {len(unknown)} weights the config does not account for, "
                              f"e.g. {', '.join(sorted(unknown)[:5])}")
    loaded = {target for _, _, target, index in plan if index is None}
    loaded |= {t for t, seen in experts_seen.items() if len(seen) == params[t].shape[0]}
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} weights missing, e.g. {', '.join(missing[:5])}")

    # Pass 2: read, convert, place.
    state = {name: torch.empty(params[name].shape, dtype=param_dtype(name, dtype), device=device)
             for name in experts_seen}
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
