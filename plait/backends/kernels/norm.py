"""Gated grouped RMSNorm in Triton (reference: `mamba2.GatedGroupRMSNorm`).

One program normalises one group of one token: h = y * silu(gate), h / rms(h) over the group's
channels, then the weight. Doing it in one pass keeps the fp32 y from the scan, the gate and
the output each read or written once, instead of the half-dozen temporaries of the PyTorch
version. Rounding follows the reference: the normalised value is rounded to the model dtype
before the weight multiplies it.
"""

import torch

from plait.backends.kernels.dispatch import modules

__all__ = ["gated_group_rmsnorm"]

triton, tl = modules()


@triton.jit
def _gated_rmsnorm_kernel(y_ptr, gate_ptr, w_ptr, out_ptr, group_size, eps, sy, sg, so, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < group_size
    y = tl.load(y_ptr + row * sy + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
    h = y * g * tl.sigmoid(g)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group_size + eps)
    normed = (h * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so + cols, normed * w, mask=ok)


def gated_group_rmsnorm(
    y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, groups: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """y, gate [..., C] -> weight * rmsnorm_per_group(y * silu(gate)) [..., C].

    The result's dtype is the reference's: `dtype` promoted with the weight's (both are the
    model dtype in the mixer; a mixed pair is not supported here).
    """
    size = y.shape[-1]
    if torch.promote_types(weight.dtype, dtype) != dtype:
        raise ValueError(f"gated_group_rmsnorm: weight {weight.dtype} with output {dtype} is not supported")
    y2, g2 = y.reshape(-1, size), gate.reshape(-1, size)
    y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    out = torch.empty(y2.shape, dtype=dtype, device=y.device)
    group_size = size // groups
    _gated_rmsnorm_kernel[(y2.shape[0], groups)](
        y2,
        g2,
        weight,
        out,
        group_size,
        eps,
        y2.stride(0),
        g2.stride(0),
        out.stride(0),
        BLOCK=triton.next_power_of_2(group_size),
    )
    return out.view(y.shape)
