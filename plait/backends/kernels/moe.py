"""The routed experts of a Nemotron-H MoE layer as two grouped GEMMs in Triton (reference:
`moe.RoutedExperts`; the router stays `moe.TopKRouter`, a few small PyTorch ops).

Every (token, slot) pair the router picked is one row of work for its expert. The pairs are
sorted by expert on the device, and each expert's rows are padded to a whole number of
`BLOCK_M`-row blocks, so every block belongs to one expert. Then:

1. up:   H[row] = relu(x[token] @ up[e]^T)^2        (rounded to the model dtype, as the reference)
2. down: P[pair] = weight[pair] * (H[row] @ down[e]^T)   (fp32)

and the k pairs of a token are summed. Both GEMMs are one kernel, `_grouped_gemm`, that reads
its A rows either through the token index (up) or straight from H (down). Nothing here asks
the host how many tokens each expert got: the number of blocks is bounded by the shapes alone
and a block past the end finds expert -1 and returns, so the step can be captured in a CUDA
graph.
"""

import torch

from plait.backends.kernels.dispatch import dot_precision, interpreting, modules

__all__ = ["expert_blocks", "fused_experts"]

triton, tl = modules()


@triton.jit
def _grouped_gemm(
    a_ptr,
    w_ptr,
    out_ptr,
    rows_ptr,
    block_expert_ptr,
    pair_weight_ptr,
    num_pairs,
    top_k,
    n_out,
    n_in,
    sa,
    swe,
    swn,
    swk,
    so,
    GATHER_TOKENS: tl.constexpr,
    RELU2: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:  # past the last expert's blocks
        return
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(rows_ptr + slots)  # the (token * top_k + slot) each row serves; num_pairs = padding
    live = pair < num_pairs
    a_rows = pair // top_k if GATHER_TOKENS else slots
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + a_rows[:, None] * sa + ks[None, :], mask=live[:, None] & (ks < n_in)[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + expert * swe + ns[None, :] * swn + ks[:, None] * swk,
            mask=(ks < n_in)[:, None] & (ns < n_out)[None, :],
            other=0.0,
        )
        if WIDEN:  # see dispatch.interpreting
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(a, w, input_precision=PRECISION)
    acc = acc.to(a_ptr.dtype.element_ty).to(tl.float32)  # F.linear's output rounding
    ok = live[:, None] & (ns < n_out)[None, :]
    if RELU2:
        acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + slots[:, None] * so + ns[None, :], acc * acc, mask=ok)
    else:
        scale = tl.load(pair_weight_ptr + pair, mask=live, other=0.0)
        tl.store(out_ptr + pair[:, None] * so + ns[None, :], acc * scale[:, None], mask=ok)


def expert_blocks(indices: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the router's picks by expert, each expert padded to whole blocks.

    indices [N, k] -> (rows [capacity]: the pair id (token * k + slot) at each row, or N*k for
    padding; block_expert [capacity / block_m]: each block's expert, or -1 past the end).
    Only device ops whose sizes follow from the shapes (no host sync).
    """
    pairs = indices.numel()
    flat = indices.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)  # pair ids grouped by expert
    expert = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[expert]
    # At most min(E, pairs) experts are non-empty, each wasting < block_m rows.
    capacity = triton.cdiv(pairs + min(num_experts, pairs) * (block_m - 1), block_m) * block_m
    rows = torch.full((capacity,), pairs, dtype=torch.long, device=flat.device)
    rows[padded_end[expert] - padded[expert] + rank] = order
    starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return rows, block_expert


def _launch(a, w, out, rows, block_expert, pair_weight, pairs, top_k, gather, relu2, block_m):
    n_out, n_in = w.shape[1], w.shape[2]
    block_n = max(16, min(64, triton.next_power_of_2(n_out)))
    block_k = max(16, min(64, triton.next_power_of_2(n_in)))
    _grouped_gemm[(block_expert.shape[0], triton.cdiv(n_out, block_n))](
        a,
        w,
        out,
        rows,
        block_expert,
        pair_weight,
        pairs,
        top_k,
        n_out,
        n_in,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        GATHER_TOKENS=gather,
        RELU2=relu2,
        PRECISION=dot_precision(a.dtype),
        WIDEN=interpreting(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


def fused_experts(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """x [N, D]; up [E, I, D]; down [E, D, I]; weights, indices [N, k] ->
    sum_k weights * down(relu(up(x))^2)  [N, D] in x's dtype (as `RoutedExperts.forward`)."""
    tokens, top_k = indices.shape
    num_experts, inner, _ = up.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_m = 16 if tokens * top_k <= 8 * num_experts else 64
    rows, block_expert = expert_blocks(indices, num_experts, block_m)
    pairs = tokens * top_k
    hidden = torch.empty(rows.shape[0], inner, dtype=x.dtype, device=x.device)
    per_pair = torch.empty(pairs, down.shape[1], dtype=torch.float32, device=x.device)
    pair_weight = weights.float().reshape(-1).contiguous()
    _launch(x, up, hidden, rows, block_expert, pair_weight, pairs, top_k, True, True, block_m)
    _launch(hidden, down, per_pair, rows, block_expert, pair_weight, pairs, top_k, False, False, block_m)
    return per_pair.view(tokens, top_k, -1).sum(1).to(x.dtype)
