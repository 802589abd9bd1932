"""Whether the Triton kernels can run, and the one switch every layer asks before using them.

The kernels (`plait.backends.kernels.ssd`, `conv1d`, `norm`, `moe`, `attention`) are twins of
the PyTorch code in `plait.backends.models`; the PyTorch code stays the reference and the CPU path. A layer
calls `use_kernels(tensor)`: true for CUDA tensors when triton imports, false otherwise, so a
CPU-only install never needs triton.

Without triton, `modules()` gives the kernel modules stand-ins that keep them importable
(`@triton.jit` returns the function unchanged, `tl.constexpr` exists for annotations); nothing
launches them. The kernels also run on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1` set before the kernel modules are imported): the tests do that, and
`forced()` sends a whole model through the kernels on CPU that way.
"""

import contextlib
import importlib.util
import os
import types

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
"""triton is installed (it is imported only when a kernel module is: CPU users never pay for it)."""

_STAND_INS = (
    types.SimpleNamespace(
        jit=lambda fn=None, **_: fn,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, (n - 1).bit_length()),
    ),
    types.SimpleNamespace(constexpr=object),
)


def modules() -> tuple:
    """(triton, triton.language) for a kernel module, or stand-ins when triton is absent."""
    if not AVAILABLE:
        return _STAND_INS
    import triton
    import triton.language as tl

    return triton, tl


__all__ = ["AVAILABLE", "dot_precision", "forced", "interpreting", "modules", "use_kernels"]

_force = False


def use_kernels(t: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor? CUDA + triton, unless PLAIT_TRITON=0 (or forced)."""
    if not AVAILABLE or os.environ.get("PLAIT_TRITON") == "0":
        return False
    return t.is_cuda or _force


@contextlib.contextmanager
def forced():
    """Use the kernels for CPU tensors too (only meaningful under TRITON_INTERPRET=1)."""
    global _force
    previous, _force = _force, True
    try:
        yield
    finally:
        _force = previous


def interpreting() -> bool:
    """Under Triton's CPU interpreter? Its `tl.dot` on bf16 operands returns garbage (triton
    3.7.1), so kernels widen dot operands to fp32 there: the products of two bf16 numbers are
    exact in fp32, so the result is what the GPU's bf16 dot with fp32 accumulation gives."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: exact fp32 for fp32 models (TF32 would cost ~1e-3 and break
    the GPU-equals-CPU check), the tensor cores' native path for bf16/fp16."""
    return "ieee" if dtype == torch.float32 else "tf32"
