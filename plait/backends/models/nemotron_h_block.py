"""The block every Nemotron-H layer is, in the main stack and in the MTP head alike:
`x + mixer(norm(x))`, the mixer chosen by the layer's kind (`M` Mamba-2, `*` attention with no
positional encoding, `-` squared-ReLU MLP, `E` mixture of experts), and the RMSNorm it uses.
"""

import torch
from torch import nn

from plait.backends.models.attention import Attention
from plait.backends.models.mamba2 import Mamba2Mixer
from plait.backends.models.moe import NemotronMoE, ReLU2MLP
from plait.backends.models.nemotron_h_config import ATTENTION, MAMBA, MLP, NemotronHConfig
from plait.backends.models.state import LayerState


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
