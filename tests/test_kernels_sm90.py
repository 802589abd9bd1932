"""The kernels compiled for the H100/H200 (sm_90) with Triton's real compiler, no GPU needed.

The interpreter tests (test_kernels.py) check what the kernels compute; these check what the
compiler makes of them at the shapes the published models launch (`triton_aot`): every kernel
compiles for sm_90, none spills registers or exceeds the SM's shared memory, and the bf16 GEMMs
lower to Hopper's warpgroup MMA (wgmma). The shapes come from a real engine's passes (prompt,
continuation, decode at the CUDA-graph batch sizes), so a dispatch change that stopped a layer
from reaching its kernel fails here too.

The last tests check that a decode step on the kernels asks the host nothing (no `.item()`,
no boolean-mask indexing...): CUDA-graph capture needs that, and it can be proven on CPU.
"""

import pytest
import torch

from plait.backends.kernels import dispatch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dispatch.AVAILABLE, reason="triton is not installed"),
    pytest.mark.skipif(dispatch.interpreting(), reason="needs the compiler, not TRITON_INTERPRET"),
]

MAMBA_KERNELS = {
    "_conv1d_kernel",
    "_chunk_state_kernel",
    "_state_pass_kernel",
    "_chunk_output_kernel",
    "_gated_rmsnorm_kernel",
    "_conv1d_update_kernel",
    "_state_update_kernel",
}
ATTENTION_KERNELS = {"_attention_split_kernel", "_attention_merge_kernel"}
DOT_KERNELS = {"_chunk_state_kernel", "_chunk_output_kernel", "_grouped_gemm"}


@pytest.mark.parametrize(
    ("model", "dtype", "overrides"),
    [
        ("nano-9b-v2", torch.bfloat16, {}),
        ("nano-30b-a3b", torch.bfloat16, {}),
        ("nano-9b-v2", torch.float32, {}),
        # fp32 experts at full count would take 5 GB of host memory; 16 keep every launch path
        ("nano-30b-a3b", torch.float32, {"n_routed_experts": 16}),
    ],
    ids=["9b-bf16", "30b-bf16", "9b-fp32", "30b-fp32"],
)
def test_every_kernel_builds_for_sm90_without_spills(model, dtype, overrides):
    from plait.backends.models.nemotron_h_presets import one_layer_per_kind, preset
    from plait.backends.runtime.triton_aot import model_builds

    pattern = one_layer_per_kind(model)
    builds = model_builds(preset(model, pattern=pattern) | overrides, dtype, arch=90)

    expected = MAMBA_KERNELS | ATTENTION_KERNELS | ({"_grouped_gemm"} if "E" in pattern else set())
    assert {b.kernel for b in builds} == expected
    problems = {(b.kernel, tuple(b.constants.items())): b.problems(90) for b in builds if b.problems(90)}
    assert not problems
    if dtype == torch.bfloat16:
        # BLOCK_M=16 expert blocks (decode) are below wgmma's 64 rows and use mma.sync
        wide = [b for b in builds if b.kernel in DOT_KERNELS and b.constants.get("BLOCK_M", 64) >= 64]
        assert wide and all(b.tensor_cores == "wgmma" for b in wide), [
            (b.kernel, b.tensor_cores) for b in wide
        ]


def test_compile_only_puts_triton_back():
    """Launches outside the block are real launches again (and CPU tensors take the PyTorch path)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from plait.backends.kernels import norm as norm_kernels
    from plait.backends.runtime.triton_aot import compile_only

    launch, active = JITFunction.run, driver._active
    y = torch.randn(3, 64)
    with compile_only(90) as builds:
        assert dispatch.use_kernels(y)
        norm_kernels.gated_group_rmsnorm(y, y, torch.ones(64), 2, 1e-5, torch.float32)
    assert [b.kernel for b in builds] == ["_gated_rmsnorm_kernel"]
    assert builds[0].registers > 0 and builds[0].num_warps > 0
    assert JITFunction.run is launch and driver._active is active
    assert not dispatch.use_kernels(y)


@pytest.mark.parametrize("model", ["nano-9b-v2", "nano-30b-a3b"])
@torch.no_grad()
def test_decode_step_on_kernels_asks_the_host_nothing(model):
    """The step DecodeGraphs captures, at 1 and 3 rows (padded to buckets 1 and 4), with a
    row whose cache is empty: no op in it waits for the device. The PyTorch path (CPU) does
    wait (Mamba clears fresh rows with a boolean mask), which shows the check sees syncs."""
    from plait.backends.models.nemotron_h_presets import preset
    from plait.backends.runtime.cuda_graphs import DecodeGraphs, HostSyncs
    from plait.backends.runtime.triton_aot import compile_only, run_engine_passes, zero_model

    net = zero_model(preset(model, tiny=True), torch.bfloat16)
    with compile_only(90):
        pool = run_engine_passes(net, prompt=40, decode_batches=(4,))
        graphs = DecodeGraphs(net, pool, capture=False)
        with HostSyncs() as syncs:
            assert (
                graphs.run(torch.zeros(1, 1, dtype=torch.long), 0, torch.tensor([45]), live_slots=1)
                is not None
            )
            assert (
                graphs.run(torch.zeros(3, 1, dtype=torch.long), 0, torch.tensor([45, 0, 9]), live_slots=3)
                is not None
            )
    assert syncs.found == []
    with HostSyncs() as syncs:
        graphs.run(torch.zeros(3, 1, dtype=torch.long), 0, torch.tensor([45, 0, 9]), live_slots=3)
    assert syncs.found


def test_host_syncs_sees_what_waits():
    from plait.backends.runtime.cuda_graphs import HostSyncs

    t = torch.arange(6)
    with HostSyncs() as syncs:
        t[t > 2] = 0
        int(t[0])
        t.repeat_interleave(t)
        t[torch.tensor([1, 2])] = 3  # integer indices: no sync
        t.repeat_interleave(2)
    assert syncs.found == [
        "aten.index_put_.default",
        "aten._local_scalar_dense.default",
        "aten.repeat_interleave.Tensor",
    ]
