"""The idealized cost model (plait/backends/models/cost.py) against counts derived here on
tiny configs: matmul weights counted from the real modules (built on the meta device, no
memory), prefill and decode summed token by token, the roofline taken step by step."""

import random

import pytest
import torch

from plait.backends.models.cost import (
    REFERENCE,
    SSM_FLOPS_PER_STATE_ELEMENT,
    Architecture,
    _sum_of_max,
    architecture,
    call_cost,
)
from plait.backends.models.llama import LlamaConfig, LlamaForCausalLM
from plait.backends.models.nemotron_h import NemotronHForCausalLM
from plait.backends.models.nemotron_h_config import NemotronHConfig
from tests.nemotron_fixtures import COMMON

LLAMA = LlamaConfig(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)

NEMOTRON = {  # the tiny checkpoints' dimensions, with MoE layers' settings
    **COMMON,
    "n_routed_experts": 6,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "moe_shared_expert_intermediate_size": 20,
}


def nemotron(pattern: str, **overrides) -> NemotronHConfig:
    return NemotronHConfig.from_dict({**NEMOTRON, "hybrid_override_pattern": pattern, **overrides})


def active_matmul_weights(model: torch.nn.Module, top_k: int = 0, experts: int = 1) -> int:
    """Matmul weights a token passes through, counted from the modules: every 2-D weight but the
    embedding and the LM head, and the routed experts' 3-D stacks scaled to the top-k."""
    count = 0
    for name, p in model.named_parameters():
        if any(part in name for part in ("embed", "lm_head", "conv1d")):
            continue
        if p.ndim == 2:
            count += p.numel()
        elif p.ndim == 3 and ".experts." in name:
            count += p.numel() * top_k // experts
    return count


def build(cls, config):
    with torch.device("meta"):
        return cls(config)


def test_llama_counts_match_the_modules():
    arch = architecture(LLAMA)
    assert arch.linear_params == active_matmul_weights(build(LlamaForCausalLM, LLAMA))
    assert arch.head_params == LLAMA.vocab_size * LLAMA.hidden_size
    head_dim = LLAMA.hidden_size // LLAMA.num_attention_heads
    assert arch.kv_width == LLAMA.num_hidden_layers * 2 * LLAMA.num_key_value_heads * head_dim
    assert arch.attention_width == LLAMA.num_hidden_layers * LLAMA.hidden_size
    assert (arch.recurrent_flops, arch.ssm_state, arch.conv_state) == (0, 0, 0)


@pytest.mark.parametrize(
    "pattern,overrides",
    [("M*M-", {}), ("ME*E", {}), ("MEM*E", {"moe_latent_size": 12})],
    ids=["dense", "moe", "latent-moe"],
)
def test_nemotron_h_counts_match_the_modules(pattern, overrides):
    config = nemotron(pattern, **overrides)
    arch = architecture(config)
    model = build(NemotronHForCausalLM, config)
    assert arch.linear_params == active_matmul_weights(
        model, config.num_experts_per_tok, config.n_routed_experts
    )
    mamba_layers, attention_layers = pattern.count("M"), pattern.count("*")
    inner = config.mamba_num_heads * config.mamba_head_dim
    conv_channels = inner + 2 * config.n_groups * config.ssm_state_size
    assert arch.ssm_state == mamba_layers * inner * config.ssm_state_size
    assert arch.conv_state == mamba_layers * conv_channels * (config.conv_kernel - 1)
    assert arch.recurrent_flops == mamba_layers * (
        2 * conv_channels * config.conv_kernel + SSM_FLOPS_PER_STATE_ELEMENT * inner * config.ssm_state_size
    )
    assert arch.kv_width == attention_layers * 2 * config.num_key_value_heads * config.head_dim


def brute_force(arch: Architecture, prompt: int, completion: int, forced: int) -> tuple[float, float, float]:
    """(prefill FLOPs, decode FLOPs, seconds), token by token and step by step."""
    peak, bandwidth = REFERENCE.accelerator.flops, REFERENCE.accelerator.bandwidth
    weights = 2 * (arch.linear_params + arch.head_params)  # bf16
    state = 4 * arch.ssm_state + 2 * arch.conv_state
    prefilled = prompt + forced
    prefill = 2 * arch.head_params  # the logits of the last position only
    for position in range(prefilled):
        prefill += 2 * arch.linear_params + 4 * arch.attention_width * (position + 1) + arch.recurrent_flops
    seconds = max(prefill / peak, (weights + 2 * arch.kv_width * prefilled + state) / bandwidth)
    decode = 0.0
    for context in range(prefilled + 1, prompt + completion):  # one step per sampled token after the first
        flops = 2 * (arch.linear_params + arch.head_params) + 4 * arch.attention_width * context
        flops += arch.recurrent_flops
        moved = weights + 2 * arch.kv_width * context + 2 * state
        decode += flops
        seconds += max(flops / peak, moved / bandwidth)
    return prefill, decode, seconds


@pytest.mark.parametrize(
    "config", [LLAMA, nemotron("M*M-"), nemotron("ME*E")], ids=["llama", "hybrid", "moe"]
)
@pytest.mark.parametrize("prompt,completion,forced", [(1, 1, 0), (37, 12, 0), (200, 30, 9), (5, 3, 3)])
def test_call_cost_is_the_token_by_token_sum(config, prompt, completion, forced):
    arch = architecture(config)
    cost = call_cost(arch, prompt, completion, forced)
    prefill, decode, seconds = brute_force(arch, prompt, completion, forced)
    assert cost.prefill_flops == prefill
    assert cost.decode_flops == pytest.approx(decode, rel=1e-12)
    assert cost.seconds == pytest.approx(seconds, rel=1e-9)


def test_forced_tokens_are_priced_as_prompt_tokens():
    arch = architecture(nemotron("M*M-"))
    assert call_cost(arch, 100, 10, forced_tokens=4) == call_cost(arch, 104, 6)


def test_a_mamba_step_costs_the_same_at_any_context_an_attention_step_grows():
    def step(arch, context):  # the cost of one more sampled token at this context
        return call_cost(arch, context, 2).seconds - call_cost(arch, context, 1).seconds

    mamba = architecture(nemotron("M-"))
    assert step(mamba, 10) == pytest.approx(step(mamba, 100_000), rel=1e-12)
    attention = architecture(nemotron("*-"))
    assert step(attention, 100_000) > step(attention, 10)


def test_sum_of_max_matches_a_loop():
    rng = random.Random(0)
    for _ in range(500):
        f = (rng.uniform(-50, 50), rng.uniform(-2, 2))
        g = (rng.uniform(-50, 50), rng.choice([0.0, rng.uniform(-2, 2)]))
        first = rng.randint(-40, 40)
        last = first + rng.randint(-2, 80)
        expected = sum(max(f[0] + f[1] * c, g[0] + g[1] * c) for c in range(first, last + 1))
        assert _sum_of_max(f, g, first, last) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_reference_names_itself_and_prices_in_dollars():
    assert "H100-SXM" in REFERENCE.name and "989 TFLOP/s" in REFERENCE.name
    assert REFERENCE.usd(3600) == REFERENCE.accelerator.usd_per_hour


def test_unknown_configs_are_refused():
    with pytest.raises(TypeError, match="no cost model"):
        architecture(object())


def test_published_checkpoints_have_their_published_sizes():
    """NVIDIA's model cards: Nano-9B-v2 has 8.89B parameters; Nemotron-3-Nano-30B-A3B activates
    3.2B per token (3.6B with the embeddings). Norms, convs and biases are the rest."""
    from plait.backends.models.nemotron_h_presets import preset

    dense = architecture(NemotronHConfig.from_dict(preset("nano-9b-v2")))
    embedding = dense.head_params  # untied: the embedding is another vocab x hidden matrix
    assert dense.linear_params + dense.head_params + embedding == pytest.approx(8.89e9, rel=0.005)
    moe = architecture(NemotronHConfig.from_dict(preset("nano-30b-a3b")))
    assert moe.linear_params + moe.head_params == pytest.approx(3.2e9, rel=0.015)
    assert moe.linear_params + 2 * moe.head_params == pytest.approx(3.6e9, rel=0.01)
