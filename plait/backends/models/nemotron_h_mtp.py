"""Nemotron 3 Super's multi-token prediction (MTP) head: drafts the token after next.

One draft step, for each position t, with `h[t]` the hidden state the main model computed there
and `x[t+1]` the token that follows it:

    h' = eh_proj(cat(enorm(embed(x[t+1])), hnorm(h[t])))
    h' = the MTP layer's sublayers (pre-norm residual blocks, as in the main stack)
    h' = final_layernorm(h')        ->  lm_head(h') = logits of the token at t+2

What this follows, read in vLLM's `vllm/model_executor/models/nemotron_h_mtp.py` (and the
`nemotron_h.py` beside it):
- `h[t]` is the main model's output *after* its final norm `norm_f`: vLLM's NemotronH model
  returns `norm_f(hidden + residual)`, and that is what its proposer hands the MTP head.
- The embedding comes first in the concatenation, the hidden state second.
- The embedding and the lm_head are the main model's; the checkpoint stores no copies.
- The output of `final_layernorm` is both what the lm_head reads and the `h` of the next draft
  step: vLLM's MTP model returns that one tensor, and its proposer feeds it back unchanged.
- Weights are flat per sublayer: MTP layer d with P sublayers is `mtp.layers.{d*P + j}`. The
  first sublayer of a layer holds `enorm`, `hnorm` and `eh_proj` (2H -> H, no bias), the last
  holds `final_layernorm`, and each holds its own `norm` and `mixer` under the main stack's
  names. Multimodal checkpoints put it all under `language_model.`.
- vLLM builds only attention and MoE sublayers and a single MTP layer. plait builds any kind
  (each is a `NemotronHBlock`) and any number of MTP layers; draft step s uses layer
  s % num_nextn_predict_layers, so with one layer every step reuses it.
"""

import torch
from torch import nn

from plait.backends.models.nemotron_h_block import NemotronHBlock, NemotronRMSNorm
from plait.backends.models.nemotron_h_config import NemotronHConfig
from plait.backends.models.state import Batch


class MTPBlock(NemotronHBlock):
    """A sublayer of an MTP layer: a main-stack block that also carries the weights the
    checkpoint stores with it, the input fusion on the first sublayer and the output norm on
    the last."""

    def __init__(self, cfg: NemotronHConfig, kind: str, first: bool, last: bool):
        super().__init__(cfg, kind)
        size, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        if first:
            self.enorm = NemotronRMSNorm(size, eps)
            self.hnorm = NemotronRMSNorm(size, eps)
            self.eh_proj = nn.Linear(2 * size, size, bias=False)
        if last:
            self.final_layernorm = NemotronRMSNorm(size, eps)


class NemotronHMTP(nn.Module):
    """The MTP layers, their sublayers in one flat list named as in the checkpoint.

    Stateful sublayers keep their state in the engine's pool after the main stack's layers:
    sublayer i of this list at pool layer `first_state_layer + i`. Position t of that state
    holds the pair (h[t], x[t+1]).
    """

    def __init__(self, cfg: NemotronHConfig, first_state_layer: int):
        super().__init__()
        self.depth = cfg.num_nextn_predict_layers
        self.sublayers = len(cfg.mtp_layer_types)
        self.first_state_layer = first_state_layer
        last = self.sublayers - 1
        self.layers = nn.ModuleList(
            MTPBlock(cfg, kind, first=j == 0, last=j == last)
            for _ in range(self.depth)
            for j, kind in enumerate(cfg.mtp_layer_types)
        )

    def forward(
        self, hidden: torch.Tensor, embeds: torch.Tensor, batch: Batch | None, step: int
    ) -> torch.Tensor:
        """hidden [B, T, H] (h[t]), embeds [B, T, H] (embed(x[t+1])) -> [B, T, H] after
        `final_layernorm`, in the embeddings' dtype, like the main model's hidden states."""
        start = (step % self.depth) * self.sublayers
        blocks = self.layers[start : start + self.sublayers]
        first, last = blocks[0], blocks[-1]
        x = first.eh_proj(torch.cat([first.enorm(embeds), first.hnorm(hidden)], dim=-1))
        for i, block in enumerate(blocks, start):
            stateful = batch is not None and block.stateful
            x = block(x, batch.layer(self.first_state_layer + i) if stateful else None)
        return last.final_layernorm(x).to(embeds.dtype)
