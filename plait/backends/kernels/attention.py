"""One-token (decode) attention over the slot KV cache in Triton (reference: `Attention._attend_cached`).

PyTorch's path attends over the cache up to the longest row under a mask, and inside a CUDA
graph up to the pool's whole capacity, because the graph cannot ask the host how long the rows
are. This kernel reads each row's length on the device and touches only that row's keys, so a
graph-captured step costs what the real lengths cost.

Work is split "flash-decoding" style: program (row, kv head, split) takes one stretch of keys
for all the query heads that share that kv head (GQA), with an online softmax, and writes its
partial output and log-sum-exp; a second kernel merges the splits. Splits let a batch of one
sequence still spread over the GPU's SMs. Their number depends only on shapes (batch, heads,
capacity), so a captured graph stays valid for any lengths; a split past a row's end writes an
empty partial (log-sum-exp -inf).
"""

import torch

from plait.backends.kernels.dispatch import dot_precision, interpreting, modules

__all__ = ["decode_attention"]

triton, tl = modules()

BLOCK_KEYS = 64
TARGET_PROGRAMS = 264
"""About two programs per SM of an H100 (132 SMs): enough splits to keep them all busy."""


@triton.jit
def _attention_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lens_ptr,
    out_ptr,
    lse_ptr,
    kv_heads,
    splits,
    keys_per_split,
    scale,
    sqb,
    sqh,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    visible = tl.load(lens_ptr + r) + 1  # the cached keys and the one this step wrote
    start = s * keys_per_split
    end = tl.minimum(start + keys_per_split, visible)
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    g_ok, d_ok = gs < GROUP, ds < HEAD_DIM
    heads = kvh * GROUP + gs
    q = tl.load(
        q_ptr + r * sqb + heads[:, None] * sqh + ds[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0
    )
    if WIDEN:  # see dispatch.interpreting
        q = q.to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < end
        kv_ok = l_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + r * skb + kvh * skh + ls[:, None] * skl + ds[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + r * svb + kvh * svh + ls[:, None] * svl + ds[None, :], mask=kv_ok, other=0.0)
        if WIDEN:
            k, v = k.to(tl.float32), v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, L]
        scores = tl.where(l_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: this block has a visible key
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    part = (r * kv_heads * GROUP + heads) * splits + s  # [B, H, splits] index of each query head
    empty = total == 0.0
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total)))
    tl.store(lse_ptr + part, lse, mask=g_ok)
    out = acc / tl.where(empty, 1.0, total)[:, None]
    tl.store(out_ptr + part[:, None] * HEAD_DIM + ds[None, :], out, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _attention_merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    splits,
    so,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row_head = tl.program_id(0)  # r * heads + h
    ss = tl.arange(0, BLOCK_S)
    ds = tl.arange(0, BLOCK_D)
    s_ok, d_ok = ss < splits, ds < HEAD_DIM
    lse = tl.load(lse_ptr + row_head * splits + ss, mask=s_ok, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, axis=0))  # split 0 always holds key 0: the max is finite
    parts = tl.load(
        part_ptr + (row_head * splits + ss)[:, None] * HEAD_DIM + ds[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + row_head * so + ds, out, mask=d_ok)


def split_count(batch: int, kv_heads: int, capacity: int) -> int:
    """Splits of the key axis: enough programs for the GPU, at least `BLOCK_KEYS` keys each.
    Shapes only, never lengths, so a captured graph keeps its launch."""
    wanted = triton.cdiv(TARGET_PROGRAMS, batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(capacity, BLOCK_KEYS)))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor
) -> torch.Tensor:
    """q [B, H, D] (one new token per row); k_cache, v_cache [B, Hkv, capacity, D] holding each
    row's keys at 0..cache_lens[r], the new one included; -> softmax(q k^T / sqrt(D)) v [B, H, D]
    in q's dtype, row r attending to its first cache_lens[r] + 1 keys."""
    batch, heads, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    splits = split_count(batch, kv_heads, capacity)
    keys_per_split = triton.cdiv(triton.cdiv(capacity, splits), BLOCK_KEYS) * BLOCK_KEYS
    parts = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _attention_split_kernel[(batch, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        cache_lens,
        parts,
        lse,
        kv_heads,
        splits,
        keys_per_split,
        head_dim**-0.5,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_L=BLOCK_KEYS,
        PRECISION=dot_precision(q.dtype),
        WIDEN=interpreting(),
    )
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    _attention_merge_kernel[(batch * heads,)](
        parts,
        lse,
        out,
        splits,
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(splits),
    )
    return out
