"""Nemotron-H's config.json, read once into the fields the model uses.

Checkpoints spell the layer pattern two ways (`hybrid_override_pattern` symbols in older ones,
`layers_block_type` names in transformers 5) and use older key names; `NemotronHConfig` takes
either, with transformers 5.23's defaults, and checks what plait can run.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.backends.models.dtypes import DTYPES
from plait.backends.models.mamba2 import DtClamp, Mamba2Config
from plait.backends.models.moe import MoEConfig
from plait.errors import CheckpointError

MAMBA, ATTENTION, MLP, MOE = "mamba", "attention", "mlp", "moe"

PATTERN_SYMBOLS = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}
"""`hybrid_override_pattern` symbols (older checkpoints: Nemotron-H-8B, Nano-9B-v2)."""

BLOCK_TYPE_NAMES = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
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


def _float(value: Any, key: str) -> float:
    """A float from config JSON, where infinity may be spelled `Infinity` (Python's json reads
    it as float inf), "inf"/"Infinity" as a string, or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json: {key} should be a number, got {value!r}") from None


def _layer_types(d: dict[str, Any], list_key: str, pattern_key: str) -> list[str] | None:
    """plait's layer type names from a list of names (`list_key`) or a string of pattern symbols
    (`pattern_key`), the list first; None when the config has neither."""
    if d.get(list_key) is not None:
        names = d[list_key]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"config.json: {list_key} should be a list of layer type names")
        unknown = sorted({n for n in names if n not in BLOCK_TYPE_NAMES})
        if unknown:
            raise CheckpointError(
                f"config.json: unknown layer types {unknown} in {list_key} "
                f"(known: {', '.join(BLOCK_TYPE_NAMES)})"
            )
        return [BLOCK_TYPE_NAMES[n] for n in names]
    if d.get(pattern_key) is not None:
        pattern = d[pattern_key]
        if not isinstance(pattern, str):
            raise CheckpointError(f"config.json: {pattern_key} should be a string of layer symbols")
        unknown = sorted({s for s in pattern if s not in PATTERN_SYMBOLS})
        if unknown:
            raise CheckpointError(
                f"config.json: unknown symbols {unknown} in {pattern_key} (known: M, *, -, E)"
            )
        return [PATTERN_SYMBOLS[s] for s in pattern]
    return None


@dataclass
class NemotronHConfig:
    """The fields of a HF Nemotron-H config.json that the model uses, with transformers 5.23's
    defaults; `layer_types` holds plait's names (mamba, attention, mlp, moe) whichever way the
    file spelled the pattern. `dt_clamp` is plait's option (see `DtClamp`), not a config key.

    Multi-token prediction (Nemotron 3 Super): `num_nextn_predict_layers` MTP layers, each made
    of the sublayers `mtp_layer_types` (`mtp_layers_block_type` names or
    `mtp_hybrid_override_pattern` symbols; transformers' default attention + MoE when neither is
    given). Without MTP layers the pattern keys are not read: transformers writes its default
    list into every config."""

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
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_layer_types: list[str] = field(default_factory=list)
    # plait's own choices, not read from config.json
    dt_clamp: str = "transformers"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> "NemotronHConfig":
        """Parse a HF config.json dict (either pattern key, legacy key names, inf spellings)."""
        d = dict(raw)
        for old, new in LEGACY_KEYS.items():
            if old in d and new not in d:
                d[new] = d[old]
        layer_types = _layer_types(d, "layers_block_type", "hybrid_override_pattern")
        if layer_types is None:
            raise CheckpointError("config.json has neither hybrid_override_pattern nor layers_block_type")
        if not layer_types:
            raise CheckpointError("config.json: the layer pattern is empty")
        mtp_layer_types: list[str] = []
        if d.get("num_nextn_predict_layers"):
            spelled = _layer_types(d, "mtp_layers_block_type", "mtp_hybrid_override_pattern")
            mtp_layer_types = [ATTENTION, MOE] if spelled is None else spelled

        kwargs: dict[str, Any] = {"layer_types": layer_types, "mtp_layer_types": mtp_layer_types}
        for name, f in cls.__dataclass_fields__.items():
            if name in kwargs or name == "dt_clamp" or d.get(name) is None:
                continue
            value = d[name]
            if name == "time_step_limit":
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise CheckpointError(
                        f"config.json: time_step_limit should be [low, high], got {value!r}"
                    )
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
        return cls.from_dict(read_config_json(path), **overrides)

    def validate(self) -> None:
        kinds = set(self.layer_types) | set(self.mtp_layer_types)
        depth = self.num_nextn_predict_layers
        if not isinstance(depth, int) or depth < 0:
            raise CheckpointError(f"config.json: num_nextn_predict_layers should be a count, got {depth!r}")
        if depth and not self.mtp_layer_types:
            raise CheckpointError("config.json: the MTP layer pattern is empty")
        if self.mlp_hidden_act != "relu2" and (MLP in kinds or MOE in kinds):
            raise CheckpointError(
                f"config.json: mlp_hidden_act {self.mlp_hidden_act!r} is not supported "
                "(Nemotron-H uses relu2)"
            )
        if MAMBA in kinds:
            if self.mamba_hidden_act != "silu":
                raise CheckpointError(
                    f"config.json: mamba_hidden_act {self.mamba_hidden_act!r} is not supported (silu)"
                )
            if self.mamba_num_heads % self.n_groups:
                raise CheckpointError("config.json: mamba_num_heads must be a multiple of n_groups")
        if ATTENTION in kinds and self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                "config.json: num_attention_heads must be a multiple of num_key_value_heads"
            )
        if MOE in kinds and self.n_routed_experts % self.n_group:
            raise CheckpointError("config.json: n_routed_experts must be a multiple of n_group")
        if self.mamba_ssm_cache_dtype not in DTYPES:
            raise CheckpointError(
                f"config.json: unknown mamba_ssm_cache_dtype {self.mamba_ssm_cache_dtype!r}"
            )
        if self.dt_clamp not in DtClamp.MODES:
            raise CheckpointError(
                f"unknown dt_clamp {self.dt_clamp!r}: expected one of {', '.join(DtClamp.MODES)}"
            )

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def hybrid_override_pattern(self) -> str:
        symbols = {v: k for k, v in PATTERN_SYMBOLS.items()}
        return "".join(symbols[t] for t in self.layer_types)

    def mamba(self) -> Mamba2Config:
        return Mamba2Config(
            hidden_size=self.hidden_size,
            num_heads=self.mamba_num_heads,
            head_dim=self.mamba_head_dim,
            state_size=self.ssm_state_size,
            n_groups=self.n_groups,
            conv_kernel=self.conv_kernel,
            chunk_size=self.chunk_size,
            use_conv_bias=self.use_conv_bias,
            proj_bias=self.use_bias,
            norm_eps=self.layer_norm_epsilon,
            dt_clamp=DtClamp.named(self.dt_clamp, self.time_step_min, self.time_step_limit),
            ssm_state_dtype=DTYPES[self.mamba_ssm_cache_dtype],
        )

    def moe(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size,
            num_experts=self.n_routed_experts,
            top_k=self.num_experts_per_tok,
            intermediate_size=self.moe_intermediate_size,
            shared_intermediate_size=self.moe_shared_expert_intermediate_size if self.n_shared_experts else 0,
            latent_size=self.moe_latent_size,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=float(self.routed_scaling_factor),
            bias=self.mlp_bias,
        )


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json as a dict; `CheckpointError` when missing or unreadable."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in {Path(path).parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return raw
