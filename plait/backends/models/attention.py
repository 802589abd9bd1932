"""Grouped-query self-attention over the slot KV cache, with optional rotary positions.

Llama uses RoPE; Nemotron-H's attention layers use no positional encoding at all (the Mamba
layers carry position), so `rope=None` there.

On CUDA (with triton) a decode step attends with the kernel in `plait.backends.kernels.attention`, which reads
each row's length on the device; this file's SDPA code is its reference and the CPU path.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from plait.backends.kernels.dispatch import use_kernels
from plait.backends.models.state import SEQ, LayerState, StateSpec


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One `nn.Linear` whose output is the given layers' outputs side by side. It is made on
    the meta device and given the concatenated tensors: a random init of real memory, thrown
    away at once, cost SmolLM2's load 0.4 s."""
    first = linears[0]
    fused = nn.Linear(
        first.in_features,
        sum(m.out_features for m in linears),
        bias=first.bias is not None,
        device="meta",
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
    return fused


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
        self.inv_freq = 1.0 / (base**exponents)
        self._tables: tuple | None = None  # (positions, dtype, cos, sin)
        self._range: torch.Tensor | None = None

    def positions(self, steps: int, device: torch.device) -> torch.Tensor:
        """[1, steps] positions 0.. of an uncached pass: the same tensor for every layer of it."""
        positions = self._range  # one entry: a pass needs only its own (and lengths vary without end)
        if positions is None or positions.shape[1] != steps or positions.device != device:
            positions = self._range = torch.arange(steps, device=device)[None]
        return positions

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
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool = False,
        rope: RotaryEmbedding | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.qkv_proj: nn.Linear | None = None
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.rope = rope
        self.fixed_order_attention: Callable[..., torch.Tensor] | None = None
        """Set by the loader beside the int4 C pass (`loading.decode_kernel`): attention of a CPU
        pass's tokens over the bf16 cache, each token's sums in one fixed order. PyTorch's SDPA
        sums in an order that follows the pass's key length and query count, so without it a
        prompt token's output (and a greedy answer) changed with how its prompt was split into
        passes, what it was batched with, and what the prefix cache restored."""

    def fuse(self) -> None:
        """Merge q/k/v into one matmul (checkpoints load them separately, by their own names):
        one weight read and one kernel call per step instead of three."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkv_proj is not None:
            return self.qkv_proj(x)
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def state_specs(self, dtype: torch.dtype) -> dict[str, StateSpec]:
        shape = (self.num_kv_heads, SEQ, self.head_dim)
        return {"k": StateSpec(shape, dtype), "v": StateSpec(shape, dtype)}

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        bsz, steps, _ = x.shape
        heads = self.num_heads + 2 * self.num_kv_heads
        qkv = self._project(x).view(bsz, steps, heads, self.head_dim).transpose(1, 2)
        rotated, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.rope is not None:  # q and k rotate together: one set of ops for both
            positions = (
                self.rope.positions(steps, x.device) if state is None else state.batch.positions(steps)
            )
            rotated = self.rope(rotated, positions)
        q, k = rotated.split([self.num_heads, self.num_kv_heads], dim=1)
        if state is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = self._attend_cached(q, k, v, state)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, steps, -1))

    def _attend_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        """Write this pass's keys/values into the slots, attend over each row's cached prefix."""
        bsz, _, steps, _ = q.shape
        lens = state.batch.cache_lens
        k_cache, v_cache = state.tensors["k"], state.tensors["v"]
        on_kernel = steps == 1 and use_kernels(q)  # decode on the GPU: no host sync, only real keys read
        fixed_order = (
            self.fixed_order_attention is not None and not on_kernel and k_cache.dtype == torch.bfloat16
        )
        if bsz == 1 and not on_kernel:
            start = int(lens[0])
            k_cache[0, :, start : start + steps] = k[0]
            v_cache[0, :, start : start + steps] = v[0]
            if start == 0 and not fixed_order:  # a fresh sequence sees only its own keys: causal
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # several rows, or the kernel: each row writes at its own positions, no host sync
            rows = torch.arange(bsz, device=q.device)[:, None]
            positions = state.batch.positions(steps)
            k_cache[rows, :, positions] = k.transpose(1, 2)
            v_cache[rows, :, positions] = v.transpose(1, 2)
        if on_kernel:
            from plait.backends.kernels import attention as attention_kernels

            return attention_kernels.decode_attention(q[:, :, 0], k_cache, v_cache, lens)[:, :, None]
        if fixed_order:
            return self.fixed_order_attention(q, k_cache, v_cache, lens)
        mask = state.batch.key_mask(steps)
        length = mask.shape[-1]
        keys, values = k_cache[:, :, :length], v_cache[:, :, :length]
        if steps == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
            # PyTorch's CPU SDPA for one bf16 query row is ~6x slower than casting to fp32
            q, keys, values = q.float(), keys.float(), values.float()
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True).to(k.dtype)
