"""The SSD scan and the one-token state update in Triton (reference: `plait.backends.models.ssd`).

The chunked scan is the reference's four steps as three kernels (see ssd.py for the maths):

1. `_chunk_state_kernel`: each chunk's own contribution to the state at its end, a
   [p, L] x [L, n] product per (row, chunk, head) with the decay-to-chunk-end folded into x.
2. `_state_pass_kernel`: the only sequential part, one step per chunk: carry the state across
   chunk boundaries, starting from the initial state. It overwrites each contribution with the
   state after that chunk, so the per-chunk states the prefix cache wants cost no extra memory.
3. `_chunk_output_kernel`: per block of positions, the inside-chunk "attention"
   (C_l . B_s) exp(a_l - a_s) dt_s x_s for s <= l, plus C_l . (state entering the chunk)
   decayed to l, plus D x_l.

Chunks are aligned to absolute positions exactly as in the reference: the pass is padded with
`start % chunk_size` leading steps of dt = 0 (decay 1, no input), which leave the state alone.
Within a chunk the decays are differences of one fp32 cumulative sum (the reference sums the
increments; both agree to ~1e-6 over a chunk of 128).

`selective_state_update` is decode: state = exp(dt A) state + dt x B^T, y = state C + D x, in
place on the pool's fp32 state, one program per (row, head, block of head_dim). Rows whose
cache length is 0 start from zero state, so no host code has to clear slots between sequences.
"""

import torch
import torch.nn.functional as F

from plait.backends.kernels.dispatch import dot_precision, modules
from plait.backends.kernels.scan_state import ScanResult

__all__ = ["selective_state_update", "ssd_chunk_scan"]

triton, tl = modules()


def _block(n: int, cap: int = 64) -> int:
    """A tile edge: a power of two covering n (at most `cap`), at least 16 for tl.dot."""
    return max(16, min(cap, triton.next_power_of_2(n)))


@triton.jit
def _chunk_program(heads, chunks, L: tl.constexpr):
    """Program axis 0 is (row, chunk, head): (r, c, h) and the offset of that chunk's L
    entries in the [b, h, c, L] a_cum and dt tensors."""
    pid = tl.program_id(0)
    h = pid % heads
    c = (pid // heads) % chunks
    r = pid // (heads * chunks)
    return r, c, h, ((r * heads + h) * chunks + c) * L


@triton.jit
def _chunk_state_kernel(
    x_ptr,
    dt_ptr,
    acum_ptr,
    b_ptr,
    states_ptr,
    chunks,
    heads,
    head_dim,
    state_size,
    heads_per_group,
    sxb,
    sxt,
    sxh,
    sbb,
    sbt,
    sbg,
    L: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    r, c, h, at = _chunk_program(heads, chunks, L)
    g = h // heads_per_group
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    cum, dts = acum_ptr + at, dt_ptr + at
    a_end = tl.load(cum + L - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        scale = tl.exp(a_end - tl.load(cum + ls, mask=l_ok, other=0.0)) * tl.load(
            dts + ls, mask=l_ok, other=0.0
        )
        t = c * L + ls
        xs = tl.load(
            x_ptr + r * sxb + t[:, None] * sxt + h * sxh + ps[None, :],
            mask=l_ok[:, None] & (ps < head_dim)[None, :],
            other=0.0,
        ).to(tl.float32)
        bs = tl.load(
            b_ptr + r * sbb + t[:, None] * sbt + g * sbg + ns[None, :],
            mask=l_ok[:, None] & (ns < state_size)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(tl.trans(xs * scale[:, None]), bs, input_precision=PRECISION)
    out = states_ptr + (((r * chunks + c) * heads + h) * head_dim) * state_size
    ok = (ps < head_dim)[:, None] & (ns < state_size)[None, :]
    tl.store(out + ps[:, None] * state_size + ns[None, :], acc, mask=ok)


@triton.jit
def _state_pass_kernel(
    states_ptr,
    acum_ptr,
    init_ptr,
    chunks,
    heads,
    size,
    L: tl.constexpr,
    HAS_INIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # (row, head)
    h = pid % heads
    r = pid // heads
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # flat (p, n) index
    ok = idx < size
    state = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_INIT:
        state = tl.load(init_ptr + (r * heads + h) * size + idx, mask=ok, other=0.0).to(tl.float32)
    for c in range(chunks):
        decay = tl.exp(tl.load(acum_ptr + ((r * heads + h) * chunks + c) * L + L - 1))
        slot = states_ptr + ((r * chunks + c) * heads + h) * size + idx
        state = state * decay + tl.load(slot, mask=ok, other=0.0)
        tl.store(slot, state, mask=ok)


@triton.jit
def _chunk_output_kernel(
    x_ptr,
    dt_ptr,
    acum_ptr,
    b_ptr,
    c_ptr,
    states_ptr,
    init_ptr,
    d_ptr,
    y_ptr,
    chunks,
    heads,
    head_dim,
    state_size,
    heads_per_group,
    sxb,
    sxt,
    sxh,
    sbb,
    sbt,
    sbg,
    scb,
    sct,
    scg,
    syb,
    syt,
    syh,
    L: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    r, c, h, at = _chunk_program(heads, chunks, L)
    g = h // heads_per_group
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)  # the whole state size in one tile
    l_ok, p_ok, n_ok = ls < L, ps < head_dim, ns < state_size
    cum, dts = acum_ptr + at, dt_ptr + at
    a_l = tl.load(cum + ls, mask=l_ok, other=0.0)
    t_l = c * L + ls
    cl = tl.load(
        c_ptr + r * scb + t_l[:, None] * sct + g * scg + ns[None, :],
        mask=l_ok[:, None] & n_ok[None, :],
        other=0.0,
    ).to(tl.float32)

    # The state this chunk started from: the previous chunk's end state, or the initial state.
    size = head_dim * state_size
    pn = ps[None, :] * state_size + ns[:, None]  # [n, p] offsets: read the state transposed
    pn_ok = n_ok[:, None] & p_ok[None, :]
    prev = states_ptr + ((r * chunks + c - 1) * heads + h) * size
    entering = tl.load(prev + pn, mask=pn_ok & (c > 0), other=0.0)
    if HAS_INIT:
        entering += tl.load(init_ptr + (r * heads + h) * size + pn, mask=pn_ok & (c == 0), other=0.0).to(
            tl.float32
        )
    acc = tl.dot(cl, entering, input_precision=PRECISION) * tl.exp(a_l)[:, None]

    # Inside the chunk, positions s <= l of this block.
    for s0 in range(0, (tl.program_id(1) + 1) * BLOCK_L, BLOCK_L):
        ss = s0 + tl.arange(0, BLOCK_L)
        s_ok = ss < L
        t_s = c * L + ss
        bs = tl.load(
            b_ptr + r * sbb + t_s[:, None] * sbt + g * sbg + ns[None, :],
            mask=s_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        scores = tl.dot(cl, tl.trans(bs), input_precision=PRECISION)  # [l, s]
        a_s = tl.load(cum + ss, mask=s_ok, other=0.0)
        causal = (ls[:, None] >= ss[None, :]) & s_ok[None, :]
        decay = tl.exp(tl.where(causal, a_l[:, None] - a_s[None, :], float("-inf")))
        weights = scores * decay * tl.load(dts + ss, mask=s_ok, other=0.0)[None, :]
        xs = tl.load(
            x_ptr + r * sxb + t_s[:, None] * sxt + h * sxh + ps[None, :],
            mask=s_ok[:, None] & p_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(weights, xs, input_precision=PRECISION)

    if HAS_D:
        xl = tl.load(
            x_ptr + r * sxb + t_l[:, None] * sxt + h * sxh + ps[None, :],
            mask=l_ok[:, None] & p_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.load(d_ptr + h).to(tl.float32) * xl
    tl.store(
        y_ptr + r * syb + t_l[:, None] * syt + h * syh + ps[None, :], acc, mask=l_ok[:, None] & p_ok[None, :]
    )


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
    """Same arguments and result as `plait.backends.models.ssd.ssd_chunk_scan`."""
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[-2], B.shape[-1]
    L = chunk_size
    lead = start % L
    tail = (-(lead + length)) % L
    chunks = (lead + length + tail) // L

    def pad(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, [0, 0] * (t.dim() - 2) + [lead, tail]) if lead or tail else t
        return t if t.stride(-1) == 1 else t.contiguous()

    xs, Bs, Cs = pad(x), pad(B), pad(C)
    dts = pad(dt.float()).reshape(batch, chunks, L, heads)
    a_cum = (dts * A.float()).cumsum(dim=2).permute(0, 3, 1, 2).contiguous()  # [b, h, c, L]
    dts = dts.permute(0, 3, 1, 2).contiguous()
    init = initial_state.float().contiguous() if initial_state is not None else None
    states = torch.empty(batch, chunks, heads, head_dim, state_size, dtype=torch.float32, device=x.device)
    y = torch.empty(batch, chunks * L, heads, head_dim, dtype=torch.float32, device=x.device)

    precision = dot_precision(x.dtype)
    # IEEE fp32 dots run on the FMA units, operands in registers: 64-wide tiles spill ~7 KB per
    # thread on sm_90 (`python -m plait.backends.runtime.triton_aot --dtype float32`); 32 do not.
    cap = 32 if precision == "ieee" else 64
    block_l, block_p = _block(L, cap), _block(head_dim, cap)
    state_tile = _block(state_size)  # chunk states: tiles of the state axis
    block_n = _block(state_size, cap=256)  # outputs: the whole state axis in one tile
    common = (chunks, heads, head_dim, state_size, heads // groups)
    _chunk_state_kernel[
        (batch * chunks * heads, triton.cdiv(head_dim, block_p), triton.cdiv(state_size, state_tile))
    ](
        xs,
        dts,
        a_cum,
        Bs,
        states,
        *common,
        xs.stride(0),
        xs.stride(1),
        xs.stride(2),
        Bs.stride(0),
        Bs.stride(1),
        Bs.stride(2),
        L=L,
        BLOCK_L=block_l,
        BLOCK_P=block_p,
        BLOCK_N=state_tile,
        PRECISION=precision,
    )
    size = head_dim * state_size
    block = min(1024, triton.next_power_of_2(size))
    _state_pass_kernel[(batch * heads, triton.cdiv(size, block))](
        states,
        a_cum,
        init if init is not None else states,
        chunks,
        heads,
        size,
        L=L,
        HAS_INIT=init is not None,
        BLOCK=block,
    )
    _chunk_output_kernel[(batch * chunks * heads, triton.cdiv(L, block_l), triton.cdiv(head_dim, block_p))](
        xs,
        dts,
        a_cum,
        Bs,
        Cs,
        states,
        init if init is not None else states,
        D if D is not None else states,
        y,
        *common,
        xs.stride(0),
        xs.stride(1),
        xs.stride(2),
        Bs.stride(0),
        Bs.stride(1),
        Bs.stride(2),
        Cs.stride(0),
        Cs.stride(1),
        Cs.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        L=L,
        BLOCK_L=block_l,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        HAS_INIT=init is not None,
        HAS_D=D is not None,
        PRECISION=precision,
    )

    chunk_ends = [min((c + 1) * L - lead, length) for c in range(chunks)]
    return ScanResult(y[:, lead : lead + length], states[:, -1], states, chunk_ends)


@triton.jit
def _state_update_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    lens_ptr,
    y_ptr,
    heads,
    head_dim,
    state_size,
    heads_per_group,
    ssb,
    ssh,
    sxb,
    sdb,
    sbb,
    sbg,
    scb,
    scg,
    syb,
    HAS_D: tl.constexpr,
    HAS_LENS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    g = h // heads_per_group
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    p_ok, n_ok = ps < head_dim, ns < state_size
    ok = p_ok[:, None] & n_ok[None, :]
    slot = state_ptr + r * ssb + h * ssh + ps[:, None] * state_size + ns[None, :]
    state = tl.load(slot, mask=ok, other=0.0).to(tl.float32)
    if HAS_LENS:  # nothing cached yet: start from zero, whatever the slot held
        state = state * (tl.load(lens_ptr + r) > 0).to(tl.float32)
    x = tl.load(x_ptr + r * sxb + h * head_dim + ps, mask=p_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + r * sdb + h).to(tl.float32)
    decay = tl.exp(dt * tl.load(a_ptr + h).to(tl.float32))
    bn = tl.load(b_ptr + r * sbb + g * sbg + ns, mask=n_ok, other=0.0).to(tl.float32)
    cn = tl.load(c_ptr + r * scb + g * scg + ns, mask=n_ok, other=0.0).to(tl.float32)
    state = state * decay + (dt * x)[:, None] * bn[None, :]
    tl.store(slot, state, mask=ok)
    y = tl.sum(state * cn[None, :], axis=1)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + r * syb + h * head_dim + ps, y, mask=p_ok)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    cache_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """`plait.backends.models.ssd.ssd_step` plus zero-start rows: state [b, h, p, n] (updated in
    place); x [b, h, p]; dt [b, h]; A [h]; B, C [b, g, n]; D [h]; cache_lens [b]. -> y [b, h, p] fp32."""
    batch, heads, head_dim = x.shape
    groups, state_size = B.shape[-2], B.shape[-1]
    assert state.stride(-1) == 1 and state.stride(-2) == state_size, "state rows must be contiguous"
    x = x if x.stride(-1) == 1 and x.stride(-2) == head_dim else x.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    dt = dt.float() if dt.stride(-1) == 1 else dt.float().contiguous()
    A = A.float()
    y = torch.empty(batch, heads, head_dim, dtype=torch.float32, device=x.device)
    block_p = min(32, triton.next_power_of_2(head_dim))
    _state_update_kernel[(batch, heads, triton.cdiv(head_dim, block_p))](
        state,
        x,
        dt,
        A,
        B,
        C,
        D if D is not None else A,
        cache_lens if cache_lens is not None else A,
        y,
        heads,
        head_dim,
        state_size,
        heads // groups,
        state.stride(0),
        state.stride(1),
        x.stride(0),
        dt.stride(0),
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
        y.stride(0),
        HAS_D=D is not None,
        HAS_LENS=cache_lens is not None,
        BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(state_size),
    )
    return y
