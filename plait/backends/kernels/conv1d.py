"""Causal depthwise conv1d + SiLU for the Mamba-2 mixer, in Triton (reference: `mamba2.CausalConv1d`).

Each channel has its own K-tap filter over the previous K-1 inputs and the current one. The
previous inputs of a continuing sequence are its `history` ([B, C, K-1], the conv state).
Two kernels:

* `causal_conv1d`: a multi-token pass. Taps that reach before the pass read the history.
  Returns the new history from the reference's own `mamba2.conv_history` (the K-1 inputs
  ending at each row's last real one, which for a right-padded row is not the pass's end).
* `causal_conv1d_update`: one token per row (decode). Reads and shifts the history in place,
  and treats rows whose cache length is 0 as having zero history, so a decode step needs no
  host-side check of which rows are new (a CUDA graph cannot have one).

Accumulation is fp32; the conv output is rounded to the input dtype before the SiLU, as the
reference's `F.conv1d` in that dtype is.
"""

import torch

from plait.backends.kernels.dispatch import modules
from plait.backends.kernels.scan_state import conv_history

__all__ = ["causal_conv1d", "causal_conv1d_update"]

triton, tl = modules()


@triton.jit
def _conv1d_kernel(
    x_ptr,
    hist_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    channels,
    length,
    sxb,
    sxc,
    sxt,
    shb,
    shc,
    sht,
    sob,
    soc,
    sot,
    K: tl.constexpr,
    HAS_HISTORY: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ts = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    c_ok = cs < channels
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in tl.static_range(K):
        src = ts + k - (K - 1)  # input position this tap reads; < 0 means the history
        w = tl.load(w_ptr + cs * K + k, mask=c_ok, other=0.0).to(tl.float32)
        in_x = c_ok[:, None] & (src >= 0)[None, :] & (src < length)[None, :]
        v = tl.load(x_ptr + b * sxb + cs[:, None] * sxc + src[None, :] * sxt, mask=in_x, other=0.0)
        v = v.to(tl.float32)
        if HAS_HISTORY:
            in_h = c_ok[:, None] & (src < 0)[None, :]
            h = tl.load(
                hist_ptr + b * shb + cs[:, None] * shc + (src + K - 1)[None, :] * sht, mask=in_h, other=0.0
            )
            v += h.to(tl.float32)
        acc += w[:, None] * v
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    out = acc * tl.sigmoid(acc)
    ok = c_ok[:, None] & (ts < length)[None, :]
    tl.store(out_ptr + b * sob + cs[:, None] * soc + ts[None, :] * sot, out, mask=ok)


def causal_conv1d(
    x: torch.Tensor,
    history: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, C, T] (any strides), history [B, C, K-1] or None (zeros), weight [C, 1, K],
    lengths [B] real inputs per row of a right-padded pass (None: all T) ->
    (silu(conv) [B, C, T] in x's dtype, new history [B, C, K-1])."""
    batch, channels, length = x.shape
    kernel = weight.shape[-1]
    # [B, T, C] memory seen as [B, C, T]: the mixer transposes back to a contiguous [B, T, C].
    out = torch.empty(batch, length, channels, dtype=x.dtype, device=x.device).transpose(1, 2)
    w = weight.reshape(channels, kernel).contiguous()
    hist = history if history is not None else x.new_zeros(1, 1, 1)
    # 64 x 64 tiles need 255 registers and spill on sm_90 (`python -m plait.backends.runtime.triton_aot`)
    block_c, block_t = 64, min(32, triton.next_power_of_2(length))
    grid = (batch, triton.cdiv(channels, block_c), triton.cdiv(length, block_t))
    _conv1d_kernel[grid](
        x,
        hist,
        w,
        bias if bias is not None else w,
        out,
        channels,
        length,
        *x.stride(),
        *hist.stride(),
        *out.stride(),
        K=kernel,
        HAS_HISTORY=history is not None,
        HAS_BIAS=bias is not None,
        BLOCK_C=block_c,
        BLOCK_T=block_t,
    )
    return out, conv_history(x, history, kernel - 1, lengths)


@triton.jit
def _conv1d_update_kernel(
    x_ptr,
    hist_ptr,
    w_ptr,
    bias_ptr,
    lens_ptr,
    out_ptr,
    channels,
    sxb,
    shb,
    shc,
    sht,
    sob,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LENS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    keep = 1.0
    if HAS_LENS:  # a row with nothing cached starts from zero history, whatever its slot held
        keep = (tl.load(lens_ptr + b) > 0).to(tl.float32)
    x = tl.load(x_ptr + b * sxb + cs, mask=c_ok, other=0.0)
    acc = tl.load(w_ptr + cs * K + (K - 1), mask=c_ok, other=0.0).to(tl.float32) * x.to(tl.float32)
    hist = hist_ptr + b * shb + cs * shc
    for k in tl.static_range(K - 1):
        h = tl.load(hist + k * sht, mask=c_ok, other=0.0).to(tl.float32) * keep
        acc += tl.load(w_ptr + cs * K + k, mask=c_ok, other=0.0).to(tl.float32) * h
        if k > 0:  # shift the window left by one: tap k moves to k - 1
            tl.store(hist + (k - 1) * sht, h, mask=c_ok)
    tl.store(hist + (K - 2) * sht, x, mask=c_ok)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + b * sob + cs, acc * tl.sigmoid(acc), mask=c_ok)


def causal_conv1d_update(
    x: torch.Tensor,
    history: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row. x [B, C]; history [B, C, K-1] updated in place; cache_lens [B] (rows
    at 0 start from zero history). Returns silu(conv) [B, C] in x's dtype."""
    batch, channels = x.shape
    kernel = weight.shape[-1]
    x = x if x.stride(1) == 1 else x.contiguous()
    assert kernel >= 2, "a one-tap convolution has no history"
    out = torch.empty(batch, channels, dtype=x.dtype, device=x.device)
    w = weight.reshape(channels, kernel).contiguous()
    block_c = 128
    _conv1d_update_kernel[(batch, triton.cdiv(channels, block_c))](
        x,
        history,
        w,
        bias if bias is not None else w,
        cache_lens if cache_lens is not None else w,
        out,
        channels,
        x.stride(0),
        *history.stride(),
        out.stride(0),
        K=kernel,
        HAS_BIAS=bias is not None,
        HAS_LENS=cache_lens is not None,
        BLOCK_C=block_c,
    )
    return out
