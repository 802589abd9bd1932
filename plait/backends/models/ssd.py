"""Mamba-2 state space duality (SSD): the chunked scan for prefill and the one-token update.

The recurrence, per head h (head dim p, state size n), with a scalar decay per step:

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t        [p, n]
    y_t     = state_t @ C_t + D * x_t                                      [p]

Running it token by token is slow for a prompt; the chunked form splits the sequence into
chunks of `chunk_size` tokens and computes, per chunk, (1) the outputs that stay inside the chunk
as a small masked "attention" (C_l . B_s weighted by the decay from s to l), (2) the state the
chunk contributes at its end, then (3) passes the state across chunk boundaries sequentially and
(4) adds each chunk's view of the state it started from. Only step (3) is sequential, one step
per chunk instead of per token.

Chunks are aligned to absolute positions (`start`): a pass that continues a sequence from
position 13 with chunk_size 8 has its first boundary at 16, so the states it returns per chunk
are the states after positions 16, 24, ... whatever way the prompt was split into passes. The
prefix cache checkpoints Mamba state exactly there.

Everything runs in fp32: the decays are products of many factors close to 1.
"""

import torch
import torch.nn.functional as F

from plait.backends.kernels.scan_state import ScanResult


def _heads_from_groups(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., g, n] -> [..., h, n]: heads h*g/H .. share group g's B or C."""
    groups = t.shape[-2]
    return t.repeat_interleave(num_heads // groups, dim=-2)


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L] with out[..., l, s] = a[s+1] + ... + a[l] for s <= l, else -inf.

    Summing the masked increments (instead of subtracting two cumulative sums) keeps the
    small differences exact enough in fp32.
    """
    length = a.shape[-1]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    increments = a[..., :, None].expand(*a.shape, length).masked_fill(~strictly_lower, 0.0)
    sums = increments.cumsum(dim=-2)  # sums[l, s] = sum of a[k] for s < k <= l
    lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(0)
    return sums.masked_fill(~lower, float("-inf"))


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    start: int = 0,
) -> ScanResult:
    """Run the SSD recurrence over a whole pass.

    x: [b, T, h, p]; dt: [b, T, h] (already softplus'd and clamped); A: [h] (negative);
    B, C: [b, T, g, n] with h a multiple of g; D: [h]; initial_state: [b, h, p, n] or None
    (zeros); start: absolute position of x's first token, for aligning chunks.
    """
    batch, length, heads, head_dim = x.shape
    state_size = B.shape[-1]
    x, dt, A = x.float(), dt.float(), A.float()
    B = _heads_from_groups(B.float(), heads)
    C = _heads_from_groups(C.float(), heads)

    # Pad to whole aligned chunks. A padded step has dt = 0: decay exp(0) = 1 and input 0, so it
    # leaves the state untouched, and its output is dropped.
    lead = start % chunk_size
    tail = (-(lead + length)) % chunk_size

    def pad(t: torch.Tensor) -> torch.Tensor:
        widths = [0, 0] * (t.dim() - 2) + [lead, tail]
        return F.pad(t, widths)

    xs, dts, Bs, Cs = (pad(t) for t in (x, dt, B, C))
    chunks = (lead + length + tail) // chunk_size
    # [b, c, l, h, ...] layout; a and its cumulative sum as [b, h, c, l].
    xs = xs.view(batch, chunks, chunk_size, heads, head_dim)
    Bs = Bs.view(batch, chunks, chunk_size, heads, state_size)
    Cs = Cs.view(batch, chunks, chunk_size, heads, state_size)
    dts = dts.view(batch, chunks, chunk_size, heads)
    a = (dts * A).permute(0, 3, 1, 2)
    a_cum = a.cumsum(dim=-1)
    x_dt = xs * dts[..., None]  # the input term dt_s * x_s

    # (1) Inside each chunk: y_l += sum_{s<=l} (C_l . B_s) exp(a_{s+1} + .. + a_l) dt_s x_s.
    decay = torch.exp(_segment_sums(a))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", Cs, Bs) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, x_dt)

    # (2) Each chunk's own contribution to the state at its end (starting from zero).
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, l]
    contrib = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bs, to_end, x_dt)

    # (3) Carry the state across chunk boundaries.
    state = (
        initial_state.float()
        if initial_state is not None
        else x.new_zeros(batch, heads, head_dim, state_size)
    )
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, h, c]
    entering, ends = [], []
    for c in range(chunks):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + contrib[:, c]
        ends.append(state)
    entering_states = torch.stack(entering, dim=1)  # [b, c, h, p, n]

    # (4) Each position's view of the state its chunk started from.
    from_start = torch.exp(a_cum)  # [b, h, c, l]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cs, entering_states, from_start)

    y = y.reshape(batch, chunks * chunk_size, heads, head_dim)[:, lead : lead + length]
    if D is not None:
        y = y + x * D.float()[:, None]
    chunk_ends = [min((c + 1) * chunk_size - lead, length) for c in range(chunks)]
    return ScanResult(y, state, torch.stack(ends, dim=1), chunk_ends)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row: update `state` in place and return y.

    state: [b, h, p, n] (fp32, typically a view into the state pool); x: [b, h, p];
    dt: [b, h]; A: [h]; B, C: [b, g, n]; D: [h]. Returns y [b, h, p] fp32.
    """
    heads = x.shape[1]
    x, dt = x.float(), dt.float()
    B = _heads_from_groups(B.float(), heads)
    C = _heads_from_groups(C.float(), heads)
    decay = torch.exp(dt * A.float())[..., None, None]  # [b, h, 1, 1]
    new_state = state.float() * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + x * D.float()[:, None]
    return y
