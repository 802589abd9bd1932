"""Nemotron-H's feed-forward layers: the squared-ReLU MLP and the (Latent) mixture of experts.

Experts are plain two-matrix MLPs with relu(x)^2 (no gate projection, unlike Mixtral/DeepSeek).
The router is DeepSeek-V3 style: sigmoid scores, a per-expert correction bias that only steers
*which* experts are picked (the weights come from the uncorrected scores), optional group
limiting, normalised top-k weights times `routed_scaling_factor`, plus one always-on shared
expert. LatentMoE (Nemotron-3) runs the routed experts in a smaller latent space: the token is
projected down once (`fc1_latent_proj`), every chosen expert works there, and the weighted sum is
projected back up (`fc2_latent_proj`); the shared expert still sees the full hidden state.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.backends.kernels.dispatch import use_kernels


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class ReLU2MLP(nn.Module):
    """down(relu(up(x))^2): Nemotron-H's dense MLP layers and its shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int
    latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias: bool = False  # on the shared expert and the latent projections (HF `mlp_bias`)

    @property
    def expert_dim(self) -> int:
        """The width the routed experts read and write: the latent size, or the hidden size."""
        return self.latent_size if self.latent_size is not None else self.hidden_size


class TopKRouter(nn.Module):
    """Picks `top_k` experts per token and their weights, in fp32.

    `e_score_correction_bias` is a load-balancing offset learned during training; adding it to
    the scores changes the selection only. It stays fp32 whatever the model dtype.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] fp32, expert indices [N, k])."""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1:
            # Keep only the `topk_group` groups whose best two experts score highest.
            per_group = choice.unflatten(-1, (cfg.n_group, -1))
            group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)
            keep_groups = group_score.topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per_group.shape[-1], dim=-1), float("-inf"))
        indices = choice.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, indices


class RoutedExperts(nn.Module):
    """All experts' matrices stacked: up_proj [E, I, D], down_proj [E, D, I] (D = expert_dim).

    The CPU path runs each chosen expert once over the tokens routed to it; a token's result
    does not depend on which other tokens share the pass. On CUDA the same sum is two grouped
    GEMMs (`plait.backends.kernels.moe`), with no host sync, so a decode step can be graph-captured.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.intermediate_size, cfg.expert_dim))
        self.down_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.expert_dim, cfg.intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, D]; weights, indices [N, k] -> sum_k weights * expert_k(x)  [N, D]."""
        if use_kernels(x):
            from plait.backends.kernels import moe as moe_kernels

            return moe_kernels.fused_experts(x, self.up_proj, self.down_proj, weights, indices)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert in indices.unique().tolist():
            token, slot = (indices == expert).nonzero(as_tuple=True)
            h = relu2(F.linear(x[token], self.up_proj[expert]))
            h = F.linear(h, self.down_proj[expert])
            out.index_add_(0, token, h.float() * weights[token, slot, None])
        return out.to(x.dtype)


class NemotronMoE(nn.Module):
    """Names follow the HF checkpoints: gate, experts, shared_experts, fc1/fc2_latent_proj."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = TopKRouter(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (
            ReLU2MLP(cfg.hidden_size, cfg.shared_intermediate_size, cfg.bias)
            if cfg.shared_intermediate_size > 0
            else None
        )
        if cfg.latent_size is not None:
            self.fc1_latent_proj = nn.Linear(cfg.hidden_size, cfg.latent_size, bias=cfg.bias)
            self.fc2_latent_proj = nn.Linear(cfg.latent_size, cfg.hidden_size, bias=cfg.bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, indices = self.gate(tokens)
        h = self.fc1_latent_proj(tokens) if self.fc1_latent_proj is not None else tokens
        h = self.experts(h, weights, indices)
        if self.fc2_latent_proj is not None:
            h = self.fc2_latent_proj(h)
        out = h.view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
