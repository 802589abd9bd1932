"""Nemotron-H: a hybrid of Mamba-2, attention (no positional encoding), MLP and MoE layers.

Every layer is the same pre-norm residual block, `x + mixer(norm(x))`; only the mixer differs,
chosen per layer by the checkpoint's pattern (`M` Mamba-2, `*` attention, `-` squared-ReLU MLP,
`E` mixture of experts). The Mamba layers carry position, so attention uses no RoPE.
Checkpoints with multi-token prediction layers (Nemotron 3 Super) also get their MTP head
(`plait.backends.models.nemotron_h_mtp`), which drafts tokens from this model's hidden states.

Parameter names are the HF checkpoint names without their `backbone.` (or `model.`) prefix (the
MTP head's keep their `mtp.`), so loading (`plait.backends.loading.nemotron_h`) needs no rename
map beyond that prefix and stacking per-expert MoE matrices.
"""

import torch
from torch import nn

from plait.backends.models.base import CausalLM
from plait.backends.models.nemotron_h_block import NemotronHBlock, NemotronRMSNorm
from plait.backends.models.nemotron_h_config import NemotronHConfig
from plait.backends.models.nemotron_h_mtp import NemotronHMTP
from plait.backends.models.state import Batch, StateSpec

FP32_PARAMS = ("e_score_correction_bias", "A_log", "dt_bias", "D")
"""Small parameters that feed fp32 math; kept fp32 whatever the model dtype."""


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter or buffer of a `dtype` model is kept in (see `FP32_PARAMS`)."""
    return torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype


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
        self.mtp = NemotronHMTP(cfg, len(self.layers)) if cfg.num_nextn_predict_layers else None

    def state_specs(self, dtype: torch.dtype) -> list[dict[str, StateSpec]]:
        """Per layer of the main stack, then per MTP sublayer (`NemotronHMTP.first_state_layer`)."""
        blocks = [*self.layers, *(self.mtp.layers if self.mtp is not None else ())]
        return [block.mixer.state_specs(dtype) if block.stateful else {} for block in blocks]

    def forward(
        self,
        input_ids: torch.Tensor,
        batch: Batch | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, or with `return_hidden` (logits, hidden): the hidden states of every position
        of the pass after `norm_f` [B, T, H], which the MTP head drafts from (`mtp_forward`)."""
        x = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch.layer(i) if batch is not None and layer.stateful else None)
        hidden = self.norm_f(x).to(self.embeddings.weight.dtype)
        head_in = hidden
        if last_only:
            head_in = hidden[:, -1:] if batch is None else batch.last_tokens(hidden)
        logits = self.lm_head(head_in).float()
        return (logits, hidden) if return_hidden else logits

    def mtp_forward(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: Batch | None = None, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step of the MTP head at every position t: hidden [B, T, H] is h[t] (this
        model's hidden states, or the MTP hidden states of the previous draft step) and
        next_ids [B, T] the tokens x[t+1]; returns (logits [B, T, V] fp32 for the tokens at
        t+2, MTP hidden states [B, T, H] to chain the next step on).

        `batch` continues its rows' MTP state (`cache_lens`: positions the MTP layers hold);
        None is one full causal pass with no cache. `step` picks the MTP layer
        (step % num_nextn_predict_layers)."""
        if self.mtp is None:
            raise ValueError("this checkpoint has no MTP layers (num_nextn_predict_layers is 0)")
        mtp_hidden = self.mtp(hidden, self.embeddings(next_ids), batch, step)
        return self.lm_head(mtp_hidden).float(), mtp_hidden
