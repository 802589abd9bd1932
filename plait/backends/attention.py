"""Grouped-query self-attention over the slot KV cache, with optional rotary positions.

Llama uses RoPE; Nemotron-H's attention layers use no positional encoding at all (the Mamba
layers carry position), so `rope=None` there.
"""

import torch
import torch.nn.functional as F
from torch import nn

from plait.backends.cache import SEQ, LayerState, StateSpec


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the half-split layout (`rotate_half`).

    The frequencies are a plain fp32 attribute, not a buffer: they stay fp32 when the weights
    go to bf16, and models built on the meta device (to load weights without a random init)
    still get real values. One instance is shared by every layer; the cos/sin tables of the
    last positions tensor are kept, so a pass computes them once, not twice per layer.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        self.inv_freq = 1.0 / (base ** exponents)
        self._tables: tuple | None = None  # (positions, dtype, cos, sin)
        self._ranges: dict[tuple[int, torch.device], torch.Tensor] = {}

    def positions(self, steps: int, device: torch.device) -> torch.Tensor:
        """[1, steps] positions 0.. of an uncached pass: one tensor per length, reused by every layer."""
        key = (steps, device)
        if key not in self._ranges:
            self._ranges[key] = torch.arange(steps, device=device)[None]
        return self._ranges[key]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D]; positions: [B, T]."""
        tables = self._tables  # read once: caller threads may score while the scheduler decodes
        if tables is None or tables[0] is not positions or tables[1] != x.dtype:
            if self.inv_freq.device != x.device:
                self.inv_freq = self.inv_freq.to(x.device)
            angles = positions[:, None, :, None].float() * self.inv_freq
            cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
            sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
            tables = self._tables = (positions, x.dtype, cos, sin)
        _, _, cos, sin = tables
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.rope = rope

    def state_specs(self, dtype: torch.dtype) -> dict[str, StateSpec]:
        shape = (self.num_kv_heads, SEQ, self.head_dim)
        return {"k": StateSpec(shape, dtype), "v": StateSpec(shape, dtype)}

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        bsz, steps, _ = x.shape
        q = self.q_proj(x).view(bsz, steps, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if state is None:
            if self.rope is not None:
                positions = self.rope.positions(steps, x.device)
                q, k = self.rope(q, positions), self.rope(k, positions)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            lens = state.batch.cache_lens
            if self.rope is not None:
                positions = state.batch.positions(steps)
                q, k = self.rope(q, positions), self.rope(k, positions)
            k_cache, v_cache = state.tensors["k"], state.tensors["v"]
            if bsz == 1:
                start = int(lens[0])
                k_cache[0, :, start:start + steps] = k[0]
                v_cache[0, :, start:start + steps] = v[0]
            else:  # decode: one new token per row, each at its own position
                rows = torch.arange(bsz, device=x.device)
                k_cache[rows, :, lens] = k[:, :, 0]
                v_cache[rows, :, lens] = v[:, :, 0]
            mask = state.batch.key_mask(steps)
            length = mask.shape[-1]
            keys, values = k_cache[:, :, :length], v_cache[:, :, :length]
            if steps == 1 and x.device.type == "cpu" and q.dtype != torch.float32:
                # PyTorch's CPU SDPA for one bf16 query row is ~6x slower than casting to fp32
                q, keys, values = q.float(), keys.float(), values.float()
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True).to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, steps, -1))
