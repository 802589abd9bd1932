"""Give an int4 Llama on CPU the C pass for its generated tokens (`kernels.cpu_decode`).

The kernel reads its own 4-bit layout, packed from each layer's kept bf16 weight (the GGUF's
Q4_1 grid, recovered) and cached beside the other quantised weights: packing SmolLM2's 107M
weights takes a second or two, reading them back a fraction of that. The output head is packed
the same way to 8 bits per 32-block, from its kept bf16 weight (the GGUF's Q8_0 grid, recovered):
one scale per row, as the PyTorch int8 head has, cost 2 points of top-1 agreement with fp32.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plait.backends.kernels import cpu_decode
from plait.backends.kernels.cpu_decode import LAYER_MATRICES, LlamaDecodeKernel, LlamaShape
from plait.backends.loading.quant import Int4Linear, Int8Linear
from plait.backends.models.llama import LlamaForCausalLM
from plait.paths import cache_dir


def attach_decode_kernel(model: torch.nn.Module, cache: Path) -> bool:
    """Set `model.decode_kernel` when the model, the CPU and the compiler allow; -> whether it did.

    The model must be an int4-quantised `LlamaForCausalLM` (`quantize(model, "int4")`) whose
    layers kept their bf16 weight, with fused projections (`fuse_projections`)."""
    if not isinstance(model, LlamaForCausalLM):
        return False
    cfg = model.config
    shape = LlamaShape(
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
        model.context_length,
        cfg.rms_norm_eps,
    )
    matrices = {
        f"{i}.{name}": _matrix(layer, name) for i, layer in enumerate(model.layers) for name in LAYER_MATRICES
    }
    head = model.lm_head
    if not shape.fits() or not isinstance(head, Int8Linear) or head.dense is None:
        return False
    if any(m is None or m.dense is None for m in matrices.values()):
        return False
    lib = cpu_decode.library(cache_dir("kernels"))
    if lib is None:
        return False
    tensors = _packed(matrices, head.dense, cache)  # type: ignore[arg-type]
    rope = model.layers[0].self_attn.rope
    angles = torch.arange(shape.max_positions, dtype=torch.float32)[:, None] * rope.inv_freq.float().cpu()
    tensors |= {
        "cos": angles.cos(),
        "sin": angles.sin(),
        "final_norm": model.norm.weight.detach().float(),
    }
    for i, layer in enumerate(model.layers):
        tensors[f"{i}.attn_norm"] = layer.input_layernorm.weight.detach().float()
        tensors[f"{i}.mlp_norm"] = layer.post_attention_layernorm.weight.detach().float()
    model.decode_kernel = LlamaDecodeKernel(lib, shape, tensors)
    for layer in model.layers:  # prompt passes: the same token, the same bits, however it is batched
        layer.self_attn.fixed_order_attention = model.decode_kernel.prompt_attention
    return True


def _matrix(layer: torch.nn.Module, name: str) -> Int4Linear | None:
    """A layer's fused projection by the kernel's name for it (None: not an int4 layer)."""
    module = {
        "qkv": getattr(layer.self_attn, "qkv_proj", None),
        "o": layer.self_attn.o_proj,
        "gate_up": getattr(layer.mlp, "gate_up_proj", None),
        "down": layer.mlp.down_proj,
    }[name]
    return module if isinstance(module, Int4Linear) else None


def _packed(matrices: dict[str, Int4Linear], head: torch.Tensor, cache: Path) -> dict[str, torch.Tensor]:
    """Every matrix's 4-bit tensors and the head's 8-bit ones, from `cache` when it holds them
    all with the right shapes and dtypes (left in the file's mapping: the kernel's vector loads
    assume no alignment), else packed now and written there."""
    vocab, hidden = head.shape
    blocks = hidden // cpu_decode.BLOCK
    expected = {
        f"{name}.{part}": layout
        for name, m in matrices.items()
        for part, layout in _layouts(m.out_features, m.in_features).items()
    } | {"head": ((vocab, hidden), torch.uint8), "head_scales": ((vocab, blocks), torch.float16)}
    try:
        cached = load_file(str(cache)) if cache.exists() else {}
    except Exception:  # a damaged or foreign file: pack again
        cached = {}
    if all(
        key in cached and (tuple(cached[key].shape), cached[key].dtype) == layout
        for key, layout in expected.items()
    ):
        return {key: cached[key] for key in expected}
    packed = {
        f"{name}.{part}": tensor
        for name, m in matrices.items()
        for part, tensor in cpu_decode.pack_q4(m.dense).items()  # type: ignore[arg-type]
    } | cpu_decode.pack_q8(head)
    tmp = cache.with_name(cache.name + ".tmp")
    save_file(packed, str(tmp))
    tmp.replace(cache)
    return packed


def _layouts(out_features: int, in_features: int) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """(shape, dtype) of each tensor `pack_q4` makes for an [out, in] weight."""
    blocks = in_features // cpu_decode.BLOCK
    return {
        "nibbles": ((out_features, in_features // 2), torch.uint8),
        "scales": ((out_features, blocks), torch.float16),
        "mins": ((out_features, blocks), torch.float16),
    }
