"""A `BertModel`'s query forward on the C encoder (`plait.backends.kernels.cpu_retrieval`).

Why: a batch of ~20-token queries is where PyTorch's fp32 path is weakest (small GEMMs, a query
alone at half the rate of a batch) and where a query's cost decides a search's; the C pass
multiplies bf16 pairs at twice the fp32 rate and its answer for a query does not depend on the
batch (see `cpu_bert.c`). This module knows which of the model's weights the kernel reads and
keeps one kernel per model (its bf16 weights are converted once, on the first query).
"""

from __future__ import annotations

import threading
import weakref

import torch

from plait.backends.kernels import cpu_retrieval
from plait.backends.kernels.cpu_retrieval import BertKernel, pack_bf16
from plait.retrievers.bert import BertModel

_kernels: weakref.WeakKeyDictionary[BertModel, BertKernel | None] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def fits(model: BertModel) -> bool:
    """The shapes and activation the kernel is written for: fp32 weights, exact-erf GELU,
    outputs in multiples of 64 (its register tiles), heads in multiples of 16 dimensions."""
    cfg = model.config
    head_dim, rem = divmod(cfg.hidden_size, cfg.num_attention_heads)
    return (
        model.embeddings.word_embeddings.weight.dtype == torch.float32
        and cfg.hidden_act == "gelu"
        and rem == 0
        and head_dim % 16 == 0
        and cfg.hidden_size % 64 == 0
        and cfg.intermediate_size % 64 == 0
    )


def kernel_for(model: BertModel) -> BertKernel | None:
    """The model's C encoder, or None where the kernels cannot run or the model does not fit."""
    lib = cpu_retrieval.library()
    if lib is None or not fits(model):
        return None
    with _lock:
        if model not in _kernels:
            _kernels[model] = _build(lib, model)
        return _kernels[model]


def _build(lib, model: BertModel) -> BertKernel:
    cfg, emb = model.config, model.embeddings
    tensors = {
        "word": emb.word_embeddings.weight,
        "position": emb.position_embeddings.weight,
        "type0": emb.token_type_embeddings.weight[0],
        "norm.weight": emb.LayerNorm.weight,
        "norm.bias": emb.LayerNorm.bias,
    }
    for i, layer in enumerate(model.layers):
        qkv = [layer.query, layer.key, layer.value]
        tensors[f"{i}.qkv.weight"] = pack_bf16(torch.cat([m.weight for m in qkv]))
        tensors[f"{i}.qkv.bias"] = torch.cat([m.bias for m in qkv])
        for name in ("attn_out", "intermediate", "output"):
            tensors[f"{i}.{name}.weight"] = pack_bf16(getattr(layer, name).weight)
            tensors[f"{i}.{name}.bias"] = getattr(layer, name).bias
        for name in ("attn_norm", "out_norm"):
            tensors[f"{i}.{name}.weight"] = getattr(layer, name).weight
            tensors[f"{i}.{name}.bias"] = getattr(layer, name).bias
    dims = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.max_position_embeddings,
    )
    with torch.inference_mode():
        return BertKernel(lib, dims, cfg.layer_norm_eps, {k: v.detach() for k, v in tensors.items()})
