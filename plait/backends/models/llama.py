"""Llama: RMSNorm, rotary GQA attention, SwiGLU MLP. The embedded SmolLM2 is one."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.backends.kernels.cpu_decode import LlamaDecodeKernel
from plait.backends.models.attention import Attention, RotaryEmbedding, fuse_linears
from plait.backends.models.base import CausalLM
from plait.backends.models.norms import RMSNorm
from plait.backends.models.passes import in_prompt_pass
from plait.backends.models.state import Batch, StateSpec


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def fuse(self) -> None:
        """Merge gate and up into one matmul (see `Attention.fuse`)."""
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, rope=rope
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, state):
        x = x + self.self_attn(self.input_layernorm(x), state)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.context_length = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # weights come from a checkpoint (the loader builds this on the meta device): no random
        # init, whose normal_ on meta would import torch._dynamo, seconds of a cold start
        self.embed_tokens = nn.Embedding.from_pretrained(
            torch.empty(cfg.vocab_size, cfg.hidden_size), freeze=False
        )
        self.layers = nn.ModuleList(LlamaBlock(cfg, rope) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.decode_kernel: LlamaDecodeKernel | None = None
        """Set by the loader for the int4 model on AVX-512 CPUs (`loading.decode_kernel`): it
        then runs the passes of generated tokens; prompt passes stay on PyTorch."""

    def state_specs(self, dtype: torch.dtype) -> list[dict[str, StateSpec]]:
        return [layer.self_attn.state_specs(dtype) for layer in self.layers]

    def forward(
        self, input_ids: torch.Tensor, batch: Batch | None = None, last_only: bool = False
    ) -> torch.Tensor:
        if self._on_kernel(batch, last_only):
            return self._forward_on_kernel(input_ids, batch)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch.layer(i) if batch is not None else None)
        if last_only:
            x = x[:, -1:] if batch is None else batch.last_tokens(x)
        return self.lm_head(self.norm(x)).float()

    def _on_kernel(self, batch: Batch | None, last_only: bool) -> bool:
        """Generated tokens continuing a batch, with the kernel's cache layout (bf16, on CPU)."""
        if self.decode_kernel is None or batch is None or not last_only or in_prompt_pass():
            return False
        keys = batch.pool.layers[0]["k"]
        return keys.dtype == torch.bfloat16 and keys.device.type == "cpu" and keys.is_contiguous()

    def _forward_on_kernel(self, input_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The same pass as `forward(..., last_only=True)`, its layers and head in one C call each."""
        kernel = self.decode_kernel
        assert kernel is not None
        layers = batch.pool.layers
        x = kernel.layers(
            self.embed_tokens(input_ids).float(),
            batch.cache_lens,
            [layer["k"] for layer in layers],
            [layer["v"] for layer in layers],
            batch.first_slot,
        )
        last = batch.last_tokens(x)
        return kernel.head(last.reshape(-1, x.shape[-1])).view(*last.shape[:2], -1)
