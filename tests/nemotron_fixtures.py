"""Tiny random Nemotron-H checkpoints written by transformers, for checking plait against it.

transformers' own init leaves many weights tiny or degenerate (zero router, zero correction
bias, identical A per layer), which would let a wrong implementation match by accident. So
every parameter is re-drawn from a seeded distribution of sensible scale before saving.
"""

import math
from pathlib import Path

import torch

from plait.backends.models.nemotron_h import NemotronHForCausalLM
from plait.backends.models.state import Batch
from plait.backends.runtime.state_pool import StatePool

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    mamba_num_heads=8,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    max_position_embeddings=512,
    layer_norm_epsilon=1e-5,
    eos_token_id=2,
    pad_token_id=0,
    bos_token_id=1,
)

CONFIGS: dict[str, dict] = {
    # Mamba, attention and MLP layers (Nemotron-H-8B / Nano-9B-v2 style).
    "dense": dict(hybrid_override_pattern="M*M-M*-"),
    # MoE with a shared expert, correction bias, group-limited top-3 of 8 (Nemotron-3 style).
    "moe": dict(
        hybrid_override_pattern="ME*EM-E",
        n_routed_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    # LatentMoE: routed experts in a 24-wide latent space, unnormalised top-2 weights.
    "latent": dict(
        hybrid_override_pattern="MEM*E",
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=40,
        moe_shared_expert_intermediate_size=32,
        moe_latent_size=24,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
    ),
}


def hf_config(kind: str, **overrides):
    from transformers import NemotronHConfig

    return NemotronHConfig(**(COMMON | CONFIGS[kind] | overrides))


@torch.no_grad()
def reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights of a scale where every part of the model visibly matters."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":  # A = -exp(A_log) in [-8, -1]
            p.copy_(torch.empty(p.shape).uniform_(0.0, math.log(8.0), generator=g))
        elif leaf == "dt_bias":  # softplus(dt_bias) log-uniform in [0.01, 0.1]
            dt = torch.exp(torch.empty(p.shape).uniform_(math.log(0.01), math.log(0.1), generator=g))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "D":
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * randn(*p.shape))
        elif "conv1d" in name:
            p.copy_(0.3 * randn(*p.shape))
        elif leaf == "bias" or p.dim() == 1:
            p.copy_(0.05 * randn(*p.shape))
        elif "embeddings" in name:
            p.copy_(randn(*p.shape))
        else:  # matrices, including stacked [E, out, in] experts: unit-scale outputs
            p.copy_(randn(*p.shape) / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * randn(*b.shape))


def write_checkpoint(directory: Path, kind: str, seed: int = 0, **overrides):
    """Save a seeded tiny transformers model to `directory`; returns the (eval) HF model."""
    from transformers import NemotronHForCausalLM as HFModel

    torch.manual_seed(seed)
    model = HFModel(hf_config(kind, **overrides)).float().eval()
    reinitialise(model, seed)
    model.save_pretrained(directory)
    return model


def random_ids(length: int, seed: int, vocab: int = 256) -> torch.Tensor:
    """[1, length] token ids avoiding the special ids 0..2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=g)


def new_pool(model: NemotronHForCausalLM, slots: int = 1, capacity: int = 64) -> StatePool:
    """A pool for `slots` sequences, its state in the model's dtype (SSM state: fp32)."""
    return StatePool(
        model.state_specs(model.embeddings.weight.dtype),
        slots=slots,
        capacity=capacity,
        max_length=model.context_length,
    )


@torch.no_grad()
def prefill(
    model: NemotronHForCausalLM,
    pool: StatePool,
    slot: int,
    ids: torch.Tensor,
    start: int = 0,
    chunks: list[int] | None = None,
) -> torch.Tensor:
    """Feed `ids` [1, T] into `slot` (already holding `start` tokens), in passes of the given
    sizes (one pass by default); returns the logits of every fed position [1, T, V]."""
    sizes = chunks or [ids.shape[1]]
    logits, pos = [], 0
    for size in sizes:
        part = ids[:, pos : pos + size]
        pool.reserve(pool.slots, start + pos + part.shape[1])
        batch = Batch(pool, slot, torch.tensor([start + pos]))
        logits.append(model(part, batch))
        pos += part.shape[1]
    assert pos == ids.shape[1]
    return torch.cat(logits, dim=1)


@torch.no_grad()
def decode_step(
    model: NemotronHForCausalLM,
    pool: StatePool,
    first_slot: int,
    tokens: torch.Tensor,
    cache_lens: torch.Tensor,
) -> torch.Tensor:
    """One token per row for rows first_slot.. ; returns logits [B, V]."""
    pool.reserve(pool.slots, int(cache_lens.max()) + 1)
    batch = Batch(pool, first_slot, cache_lens.clone())
    return model(tokens[:, None], batch)[:, -1]
