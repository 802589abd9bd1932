"""Idealized cost of an LM call: its run time on a named reference accelerator, from the model's
architecture alone.

Measured seconds depend on the machine, its load, the batch a call shared and the prefix cache;
they cannot compare two programs (or two models) fairly. The idealized cost prices a call as if
it ran alone on uniform hardware and software, from four numbers: the model's architecture,
the call's prompt tokens, its completion tokens, and how many of those the grammar forced.

The model of a call (`call_cost`):

- **Prefill**: one pass over the prompt. Tokens the grammar forces (field markers, JSON keys)
  are known before they are generated, so a grammar-aware engine appends them in the pass of
  the next sampled token: they are priced as prompt tokens. The pass produces the first sampled
  token.
- **Decode**: one step per further sampled token, each feeding one token.
- A pass costs `max(FLOPs / peak FLOP/s, bytes / bandwidth)` on the reference accelerator (a
  roofline: compute and memory traffic overlap perfectly, nothing else costs).
- FLOPs: 2 per matmul weight per token (only the experts a token is routed to), the LM head
  once per sampled token (only those logits are needed), attention's `QKᵀ` and `AV`
  (4 · query heads · head dim per key: it grows with the context), and per Mamba layer its causal
  conv (2 · channels · kernel) and its state update and readout (5 per state element: constant
  per token, whatever the context).
- Bytes: every pass reads the weights once (batch 1: nothing shares the read) at the
  reference's weight precision; a decode step reads the whole KV cache of its context and
  writes one token's keys and values, and reads and writes each Mamba layer's conv and SSM state
  (constant); prefill writes its tokens' keys and values and the Mamba state once.

Not priced: norms, biases, rotary embeddings, the embedding lookup, MoE routing's top-k, MTP
heads and speculation (the idealized engine decodes plainly), a prefix cache (every call pays
its whole prompt: that is what makes a shorter prompt cheaper). Which weights, cache and state
precision the engine really ran at does not matter either: the reference states its own.

Everything here is plain arithmetic on a model config: no weights, no engine, no torch tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plait.backends.models.llama import LlamaConfig
from plait.backends.models.nemotron_h_config import ATTENTION, MAMBA, MLP, MOE, NemotronHConfig

SSM_FLOPS_PER_STATE_ELEMENT = 5
"""A Mamba-2 step per state element: decay and input (h·a + x·B: 3) and readout (h·C: 2)."""


@dataclass(frozen=True)
class Accelerator:
    """A reference accelerator: peak dense FLOP/s at the reference precision, and memory
    bandwidth. `usd_per_hour` turns idealized seconds into dollars (an assumed rental price)."""

    name: str
    flops: float
    bandwidth: float
    usd_per_hour: float


H100_SXM = Accelerator("H100-SXM", flops=989e12, bandwidth=3.35e12, usd_per_hour=2.50)
"""NVIDIA H100 SXM5: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3; $2.50 an hour assumed."""


@dataclass(frozen=True)
class Reference:
    """The accelerator and the precisions every model is priced at, whatever it really ran at."""

    accelerator: Accelerator = H100_SXM
    weight_bytes: float = 2.0  # bf16 weights
    cache_bytes: float = 2.0  # bf16 KV cache and Mamba conv state
    state_bytes: float = 4.0  # fp32 SSM state (Nemotron-H's mamba_ssm_cache_dtype)

    @property
    def name(self) -> str:
        a = self.accelerator
        return (
            f"{a.name} ({a.flops / 1e12:g} TFLOP/s, {a.bandwidth / 1e12:g} TB/s, ${a.usd_per_hour:g}/h; "
            f"{8 * self.weight_bytes:g}-bit weights and KV cache, {8 * self.state_bytes:g}-bit SSM state)"
        )

    def usd(self, seconds: float) -> float:
        return seconds * self.accelerator.usd_per_hour / 3600


REFERENCE = Reference()


@dataclass(frozen=True)
class Architecture:
    """What one token costs in a model, as element counts (the reference turns them into bytes).

    `linear_params` are the matmul weights a token passes through (routed experts: only the
    top-k it is sent to; the LM head apart). `attention_width` is query heads × head dim summed
    over attention layers (`QKᵀ` and `AV` FLOPs per key are 4×), `kv_width` the keys and values
    one token adds to the cache, over all layers. `recurrent_flops`, `ssm_state` and
    `conv_state` are the Mamba layers' per-token FLOPs and state elements, over all layers."""

    linear_params: int
    head_params: int
    attention_width: int = 0
    kv_width: int = 0
    recurrent_flops: int = 0
    ssm_state: int = 0
    conv_state: int = 0


def architecture(config: LlamaConfig | NemotronHConfig) -> Architecture:
    """The `Architecture` of a model config (Llama or Nemotron-H)."""
    if isinstance(config, LlamaConfig):
        return _llama(config)
    if isinstance(config, NemotronHConfig):
        return _nemotron_h(config)
    raise TypeError(f"no cost model for {type(config).__name__}")


def _attention_params(hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """q and o (hidden × heads·head_dim each), k and v (hidden × kv_heads·head_dim each)."""
    return 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim


def _llama(c: LlamaConfig) -> Architecture:
    per_layer = (
        _attention_params(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        + 3 * c.hidden_size * c.intermediate_size
    )  # SwiGLU: gate, up, down
    layers = c.num_hidden_layers
    return Architecture(
        linear_params=layers * per_layer,
        head_params=c.vocab_size * c.hidden_size,
        attention_width=layers * c.num_attention_heads * c.head_dim,
        kv_width=layers * 2 * c.num_key_value_heads * c.head_dim,
    )


def _nemotron_h(c: NemotronHConfig) -> Architecture:
    hidden = c.hidden_size
    linear = attention_width = kv_width = recurrent_flops = ssm_state = conv_state = 0
    for kind in c.layer_types:
        if kind == MAMBA:
            m = c.mamba()
            heads, inner = m.num_heads, m.inner_size
            linear += hidden * (inner + m.conv_dim + heads) + inner * hidden  # in_proj, out_proj
            recurrent_flops += 2 * m.conv_dim * m.conv_kernel
            recurrent_flops += SSM_FLOPS_PER_STATE_ELEMENT * inner * m.state_size
            ssm_state += inner * m.state_size
            conv_state += m.conv_dim * (m.conv_kernel - 1)
        elif kind == ATTENTION:
            heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
            linear += _attention_params(hidden, heads, kv_heads, head_dim)
            attention_width += heads * head_dim
            kv_width += 2 * kv_heads * head_dim
        elif kind == MLP:
            linear += 2 * hidden * c.intermediate_size  # squared ReLU: up, down
        elif kind == MOE:
            moe = c.moe()
            linear += hidden * moe.num_experts  # the router
            linear += moe.top_k * 2 * moe.expert_dim * moe.intermediate_size  # routed experts
            linear += 2 * hidden * moe.shared_intermediate_size  # the shared expert
            if moe.latent_size is not None:
                linear += 2 * hidden * moe.latent_size  # down to the latent space and back
    return Architecture(
        linear_params=linear,
        head_params=c.vocab_size * hidden,
        attention_width=attention_width,
        kv_width=kv_width,
        recurrent_flops=recurrent_flops,
        ssm_state=ssm_state,
        conv_state=conv_state,
    )


@dataclass(frozen=True)
class CallCost:
    """One call's FLOPs and bytes (prefill and decode), and its idealized seconds."""

    prefill_flops: float
    prefill_bytes: float
    decode_flops: float
    decode_bytes: float
    seconds: float

    @property
    def flops(self) -> float:
        return self.prefill_flops + self.decode_flops

    @property
    def bytes(self) -> float:
        return self.prefill_bytes + self.decode_bytes


def call_cost(
    arch: Architecture,
    prompt_tokens: int,
    completion_tokens: int,
    forced_tokens: int = 0,
    reference: Reference = REFERENCE,
) -> CallCost:
    """The idealized cost of one call (see the module docstring for the model)."""
    forced = min(max(forced_tokens, 0), completion_tokens)
    prefilled = prompt_tokens + forced
    steps = max(completion_tokens - forced - 1, 0)
    peak, bandwidth = reference.accelerator.flops, reference.accelerator.bandwidth
    weights = reference.weight_bytes * (arch.linear_params + arch.head_params)
    state = reference.state_bytes * arch.ssm_state + reference.cache_bytes * arch.conv_state
    kv_per_token = reference.cache_bytes * arch.kv_width

    # Prefill: token t (0-based) attends to t + 1 keys, so attention adds 4·width·Σ(t+1).
    prefill_flops = (
        2 * arch.linear_params * prefilled
        + 2 * arch.head_params
        + 2 * arch.attention_width * prefilled * (prefilled + 1)
        + arch.recurrent_flops * prefilled
    )
    prefill_bytes = weights + kv_per_token * prefilled + state
    prefill_seconds = max(prefill_flops / peak, prefill_bytes / bandwidth)

    # A decode step with `c` keys in its context (its own included): affine in c.
    step_flops = (
        2 * (arch.linear_params + arch.head_params) + arch.recurrent_flops,
        4 * arch.attention_width,
    )
    step_bytes = (weights + 2 * state, kv_per_token)
    first, last = prefilled + 1, prefilled + steps
    decode_flops = _affine_sum(*step_flops, first, last)
    decode_bytes = _affine_sum(*step_bytes, first, last)
    decode_seconds = _sum_of_max(
        (step_flops[0] / peak, step_flops[1] / peak),
        (step_bytes[0] / bandwidth, step_bytes[1] / bandwidth),
        first,
        last,
    )
    return CallCost(
        prefill_flops, prefill_bytes, decode_flops, decode_bytes, prefill_seconds + decode_seconds
    )


def _affine_sum(a: float, b: float, first: int, last: int) -> float:
    """Σ (a + b·c) for integer c in [first, last] (0 when the range is empty)."""
    n = last - first + 1
    return 0.0 if n <= 0 else n * a + b * n * (first + last) / 2


def _sum_of_max(f: tuple[float, float], g: tuple[float, float], first: int, last: int) -> float:
    """Σ max(f(c), g(c)) over integer c in [first, last] for affine f and g, in closed form (a
    call may decode thousands of tokens, and a run prices thousands of calls). f − g is affine,
    so it is positive on one contiguous stretch of the range: sum g everywhere, and f − g there."""
    if last < first:
        return 0.0
    d0, d1 = f[0] - g[0], f[1] - g[1]
    lo, hi = first, last
    if d1 > 0:  # f - g > 0 for c > -d0/d1
        lo = max(first, math.floor(-d0 / d1) + 1)
    elif d1 < 0:  # f - g > 0 for c < -d0/d1
        hi = min(last, math.ceil(-d0 / d1) - 1)
    elif d0 <= 0:
        lo, hi = 1, 0
    return _affine_sum(*g, first, last) + max(_affine_sum(d0, d1, lo, hi), 0.0)
