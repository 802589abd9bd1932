"""The kernels compiled for the H100/H200 (sm_90) with Triton's real compiler, no GPU needed.

The interpreter tests (test_kernels.py) check what the kernels compute; these check what the
compiler makes of them at the shapes the published models launch (`triton_aot`): every kernel
compiles for sm_90, none spills registers or exceeds the SM's shared memory, and the bf16 GEMMs
lower to Hopper's warpgroup MMA (wgmma). The shapes come from a real engine's passes (prompt,
continuation, decode at the CUDA-graph batch sizes), so a dispatch change that stopped a layer
from reaching its kernel fails here too.
"""

import pytest
import torch

from plait.backends import runtime_triton

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not runtime_triton.AVAILABLE, reason="triton is not installed"),
    pytest.mark.skipif(runtime_triton.interpreting(), reason="needs the compiler, not TRITON_INTERPRET"),
]

MAMBA_KERNELS = {"_conv1d_kernel", "_chunk_state_kernel", "_state_pass_kernel", "_chunk_output_kernel",
                 "_gated_rmsnorm_kernel", "_conv1d_update_kernel", "_state_update_kernel"}
ATTENTION_KERNELS = {"_attention_split_kernel", "_attention_merge_kernel"}
DOT_KERNELS = {"_chunk_state_kernel", "_chunk_output_kernel", "_grouped_gemm"}


@pytest.mark.parametrize(("model", "dtype", "overrides"), [
    ("nano-9b-v2", torch.bfloat16, {}),
    ("nano-30b-a3b", torch.bfloat16, {}),
    ("nano-9b-v2", torch.float32, {}),
    # fp32 experts at full count would take 5 GB of host memory; 16 keep every launch path
    ("nano-30b-a3b", torch.float32, {"n_routed_experts": 16}),
], ids=["9b-bf16", "30b-bf16", "9b-fp32", "30b-fp32"])
def test_every_kernel_builds_for_sm90_without_spills(model, dtype, overrides):
    from plait.backends.nemotron_presets import PUBLISHED, preset
    from plait.backends.triton_aot import model_builds

    pattern = "".join(dict.fromkeys(PUBLISHED[model]["hybrid_override_pattern"]))  # each layer kind once
    builds = model_builds(preset(model, pattern=pattern) | overrides, dtype, arch=90)

    expected = MAMBA_KERNELS | ATTENTION_KERNELS | ({"_grouped_gemm"} if "E" in pattern else set())
    assert {b.kernel for b in builds} == expected
    problems = {(b.kernel, tuple(b.constants.items())): b.problems(90) for b in builds if b.problems(90)}
    assert not problems
    if dtype == torch.bfloat16:
        # BLOCK_M=16 expert blocks (decode) are below wgmma's 64 rows and use mma.sync
        wide = [b for b in builds if b.kernel in DOT_KERNELS and b.constants.get("BLOCK_M", 64) >= 64]
        assert wide and all(b.tensor_cores == "wgmma" for b in wide), [(b.kernel, b.tensor_cores) for b in wide]


def test_compile_only_puts_triton_back():
    """Launches outside the block are real launches again (and CPU tensors take the PyTorch path)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from plait.backends import norm_triton
    from plait.backends.triton_aot import compile_only

    launch, active = JITFunction.run, driver._active
    y = torch.randn(3, 64)
    with compile_only(90) as builds:
        assert runtime_triton.use_kernels(y)
        norm_triton.gated_group_rmsnorm(y, y, torch.ones(64), 2, 1e-5, torch.float32)
    assert [b.kernel for b in builds] == ["_gated_rmsnorm_kernel"]
    assert builds[0].registers > 0 and builds[0].num_warps > 0
    assert JITFunction.run is launch and driver._active is active
    assert not runtime_triton.use_kernels(y)
