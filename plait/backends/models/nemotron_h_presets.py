"""The dimensions of NVIDIA's published Nemotron-H checkpoints, without their weights.

The GPU benchmark (`benchmarks/engine_gpu.py`) builds models of these sizes with random
weights, and the kernel build report (`triton_aot`) compiles the kernels at the shapes these
models launch. The values are the checkpoints' config.json keys, so `NemotronHConfig.from_dict`
and transformers' `NemotronHConfig(**...)` both read them.
"""

COMMON = dict(
    vocab_size=131072,
    head_dim=128,
    ssm_state_size=128,
    n_groups=8,
    conv_kernel=4,
    chunk_size=128,
    layer_norm_epsilon=1e-5,
    max_position_embeddings=16384,
    tie_word_embeddings=False,
    time_step_min=0.001,
)

PUBLISHED = {
    # nvidia/NVIDIA-Nemotron-Nano-9B-v2 config.json
    "nano-9b-v2": COMMON
    | dict(
        hidden_size=4480,
        hybrid_override_pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=15680,
        mamba_num_heads=128,
        mamba_head_dim=80,
    ),
    # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config.json
    "nano-30b-a3b": COMMON
    | dict(
        hidden_size=2688,
        hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        num_attention_heads=32,
        num_key_value_heads=2,
        intermediate_size=1856,
        mamba_num_heads=64,
        mamba_head_dim=64,
        n_routed_experts=128,
        num_experts_per_tok=6,
        moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
    ),
}
"""Full configs of the published models, by short name."""

TINY = dict(
    vocab_size=4096,
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=512,
    mamba_num_heads=8,
    mamba_head_dim=32,
    ssm_state_size=32,
    n_groups=2,
    moe_intermediate_size=128,
    moe_shared_expert_intermediate_size=256,
    n_routed_experts=16,
    num_experts_per_tok=4,
    chunk_size=32,
    max_position_embeddings=2048,
)
"""Scaled-down dimensions shared by both models (smoke runs on CPU)."""

TINY_PATTERNS = {"nano-9b-v2": "M-M*-M-", "nano-30b-a3b": "MEM*EME"}
"""A few layers of each published pattern: every layer kind the full model has, in its order."""


def preset(name: str, tiny: bool = False, pattern: str | None = None) -> dict:
    """The config dict of a published model, optionally at the tiny dimensions or with another
    layer pattern (fewer layers of the same sizes)."""
    if name not in PUBLISHED:
        raise KeyError(f"unknown model {name!r}: expected one of {', '.join(PUBLISHED)}")
    config = PUBLISHED[name] | (TINY | dict(hybrid_override_pattern=TINY_PATTERNS[name]) if tiny else {})
    return config | (dict(hybrid_override_pattern=pattern) if pattern else {})


def one_layer_per_kind(name: str) -> str:
    """A published model's layer pattern cut to one layer of each kind, in order of first use
    (e.g. "M-*"): the shapes of every layer with a fraction of the weights."""
    return "".join(dict.fromkeys(PUBLISHED[name]["hybrid_override_pattern"]))
