"""Nemotron-H: a hybrid of Mamba-2, attention (no positional encoding), MLP and MoE layers.

Every layer is the same pre-norm residual block, `x + mixer(norm(x))`; only the mixer differs,
chosen per layer by the checkpoint's pattern (`M` Mamba-2, `*` attention, `-` squared-ReLU MLP,
`E` mixture of experts). The Mamba layers carry position, so attention uses no RoPE.

Parameter names are the HF checkpoint names without their `backbone.` (or `model.`) prefix, so
loading (`plait.backends.loading.nemotron_h`) needs no rename map beyond that prefix and
stacking per-expert MoE matrices.
"""

import torch
from torch import nn

from plait.backends.models.attention import Attention
from plait.backends.models.base import CausalLM
from plait.backends.models.mamba2 import Mamba2Mixer
from plait.backends.models.moe import NemotronMoE, ReLU2MLP
from plait.backends.models.nemotron_h_config import ATTENTION, MAMBA, MLP, NemotronHConfig
from plait.backends.models.state import Batch, LayerState, StateSpec

FP32_PARAMS = ("e_score_correction_bias", "A_log", "dt_bias", "D")
"""Small parameters that feed fp32 math; kept fp32 whatever the model dtype."""


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter or buffer of a `dtype` model is kept in (see `FP32_PARAMS`)."""
    return torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype


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
            self.mixer = Attention(
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                bias=cfg.attention_bias,
                rope=None,
            )
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

    def forward(
        self, input_ids: torch.Tensor, batch: Batch | None = None, last_only: bool = False
    ) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch.layer(i) if batch is not None and layer.stateful else None)
        if last_only:
            x = x[:, -1:] if batch is None else batch.last_tokens(x)
        x = self.norm_f(x).to(self.embeddings.weight.dtype)
        return self.lm_head(x).float()
