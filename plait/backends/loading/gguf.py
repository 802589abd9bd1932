"""Llama-family GGUF files: dequantised once at load, then cached as safetensors.

Dequantising SmolLM2's Q4_1 blocks takes tens of seconds in numpy; the cache makes every later
load a memory-mapped read. The metadata (config and tokenizer fields) is cached beside it as
JSON: gguf-py parses a 49k-token vocabulary item by item, seconds of a cold start otherwise.
llama.cpp stores Q and K rows permuted for its interleaved rotary layout; we undo that so the
model uses the same half-split rotary as the HF checkpoints.
"""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from plait.backends.loading.tokenizer import Tokenizer
from plait.backends.models.dtypes import dtype_name
from plait.backends.models.llama import LlamaConfig, LlamaForCausalLM
from plait.errors import CheckpointError
from plait.paths import cache_dir

log = logging.getLogger(__name__)

_TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _read(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors/IndexError on damaged files
        raise CheckpointError(f"{path} is not a readable GGUF file: {exc}") from exc


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # fields of unusual types are not needed for loading
            continue
    return out


def _hf_name(name: str) -> str:
    if name in _TENSOR_NAMES:
        return _TENSOR_NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise CheckpointError(f"unexpected tensor {name!r} in a llama GGUF file")


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of Q/K rows."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _config(fields: dict, tensor_names: set[str]) -> LlamaConfig:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    try:
        return LlamaConfig(
            vocab_size=int(fields.get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"])),
            hidden_size=int(fields["llama.embedding_length"]),
            intermediate_size=int(fields["llama.feed_forward_length"]),
            num_hidden_layers=int(fields["llama.block_count"]),
            num_attention_heads=int(fields["llama.attention.head_count"]),
            num_key_value_heads=int(
                fields.get("llama.attention.head_count_kv", fields["llama.attention.head_count"])
            ),
            rms_norm_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
            rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
            max_position_embeddings=int(fields["llama.context_length"]),
            tie_word_embeddings="output.weight" not in tensor_names,
        )
    except KeyError as exc:
        raise CheckpointError(f"GGUF metadata lacks {exc}") from exc


def _dequantised_state(reader, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    import gguf

    state = {}
    for tensor in reader.tensors:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name.endswith("attn_q.weight"):
            weight = _unpermute(weight, cfg.num_attention_heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = _unpermute(weight, cfg.num_key_value_heads)
        state[_hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(weight))
    return state


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _metadata(path: Path, cached: Path) -> tuple[dict, set[str], object | None]:
    """(fields, tensor names, reader) of the file: from the JSON cache (reader None), else read
    and cached (the reader is returned so a first load parses the file once)."""
    try:
        meta = json.loads(cached.read_text())
        return meta["fields"], set(meta["tensors"]), None
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet, or a damaged cache: read the file itself
    reader = _read(path)
    fields = {k: v for k, v in _fields(reader).items() if _is_json(v)}
    names = [t.name for t in reader.tensors]
    tmp = cached.with_name(cached.name + ".tmp")
    tmp.write_text(json.dumps({"fields": fields, "tensors": names}))
    tmp.replace(cached)
    return fields, set(names), reader


def _write(state: dict[str, torch.Tensor], cached: Path) -> dict[str, torch.Tensor]:
    """Save `state` to `cached` (whole or not at all) and return it."""
    tmp = cached.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(cached)
    return state


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def load_gguf(
    path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[LlamaForCausalLM, Tokenizer]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    cached = cache_dir("gguf") / f"{path.stem}-{_cache_key(path)}.safetensors"
    fields, tensor_names, reader = _metadata(path, cached.with_suffix(".json"))
    cfg = _config(fields, tensor_names)
    tokenizer = Tokenizer.from_gguf_fields(fields)
    # the dequantised weights in the dtype asked for: a later load maps them as they are (the
    # default int4 loads bf16; converting 135M fp32 weights took it seconds on a busy machine)
    in_dtype = cached
    if dtype != torch.float32:
        in_dtype = cached.with_name(f"{cached.stem}-{dtype_name(dtype)}.safetensors")
    if in_dtype.exists():
        state = load_file(str(in_dtype))
    else:
        if cached.exists():
            state = load_file(str(cached))
        else:
            log.info("dequantising %s (once; cached at %s)", path.name, cached)
            state = _write(_dequantised_state(reader or _read(path), cfg), cached)
        if in_dtype != cached:
            state = _write({name: t.to(dtype) for name, t in state.items()}, in_dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{path.name}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval(), tokenizer
