"""The Triton kernels against the PyTorch path they replace.

With CUDA they are compiled and run on the GPU (and the last tests compare whole-model logits
on the GPU with the CPU path). Without CUDA they run under Triton's interpreter, which needs
TRITON_INTERPRET=1 before triton is first imported (`@triton.jit` and triton's own library
functions read it when they are defined), and some other test of the suite may already have
imported triton. So on CPU, `test_kernels_under_interpreter` reruns this file in a child
pytest with TRITON_INTERPRET=1 set from its start; in the parent process the kernel tests skip
(saying so), and the environment of the rest of the suite is never touched.

Tolerances (absolute, on values of order 1): fp32 conv, norm and decode attention 1e-5, SSD
scan and state update 1e-4 (the kernel takes decays as differences of one cumulative sum, the
reference sums increments), MoE 1e-4 (fp32; the k experts of a token are summed in another
order). bf16 runs compare against the reference in bf16 within two units in the last place
(|d| <= 2^-6 |ref| + 2^-8): the interpreter rounds fp32 -> bf16 toward zero where the GPU and
PyTorch round to nearest, one unit apart at most per rounding. bf16 decode attention is within
2e-2 of fp32 maths (see its test).
"""

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plait.backends.kernels import dispatch
from plait.backends.models.mamba2 import CausalConv1d, GatedGroupRMSNorm
from plait.backends.models.moe import MoEConfig, RoutedExperts, TopKRouter
from plait.backends.models.ssd import ssd_chunk_scan, ssd_step
from plait.backends.models.state import Batch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CHILD = os.environ.get("PLAIT_KERNEL_TESTS_CHILD") == "1"
"""This process is the interpreter run started by `test_kernels_under_interpreter`."""


@pytest.fixture(scope="module")
def k():
    """The kernel modules, where they can run: on the GPU, or in the interpreter child."""
    if not dispatch.AVAILABLE:
        pytest.skip("triton is not installed")
    if not (CUDA or CHILD):
        pytest.skip("on CPU, test_kernels_under_interpreter runs this in a TRITON_INTERPRET=1 child")
    names = ("conv1d", "norm", "ssd", "moe", "attention")
    return type("Kernels", (), {n: importlib.import_module(f"plait.backends.kernels.{n}") for n in names})


@pytest.fixture
def parent_only():
    if CHILD:
        pytest.skip("runs in the parent process")


@pytest.mark.slow
@pytest.mark.skipif(CUDA or CHILD, reason="with CUDA the kernel tests run directly on the GPU")
@pytest.mark.skipif(not dispatch.AVAILABLE, reason="triton is not installed")
def test_kernels_under_interpreter():
    """Every kernel test of this file, on CPU, in a fresh process under TRITON_INTERPRET=1."""
    env = os.environ | {"TRITON_INTERPRET": "1", "PLAIT_KERNEL_TESTS_CHILD": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    print(report)
    assert proc.returncode == 0, report
    ran = re.search(r"(\d+) passed", proc.stdout)
    assert ran and int(ran.group(1)) >= 20, report


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dev(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def max_diff(a, b) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def bf16_close(a, b) -> bool:
    """Within two bf16 units in the last place (see the module docstring)."""
    a, b = a.float().cpu(), b.float().cpu()
    return bool(((a - b).abs() <= b.abs() * 2**-6 + 2**-8).all())


# --- causal conv1d ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 7, 70])
@pytest.mark.parametrize("with_history", [True, False])
def test_conv1d_matches_reference(k, length, with_history):
    g = gen(length)
    channels, kernel = 40, 4
    ref = CausalConv1d(channels, kernel, bias=True)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(channels, 1, kernel, generator=g) * 0.5)
        ref.bias.copy_(torch.randn(channels, generator=g) * 0.1)
    # [B, T, C] memory viewed as [B, C, T], as the mixer passes it
    x = torch.randn(2, length, channels, generator=g).transpose(1, 2)
    history = torch.randn(2, channels, kernel - 1, generator=g) if with_history else None
    expected, expected_hist = ref(x, history)
    xd, hd, wd, bd = dev(x, history, ref.weight.detach(), ref.bias.detach())
    out, new_hist = k.conv1d.causal_conv1d(xd, hd, wd, bd)
    assert max_diff(out, expected) < 1e-5
    assert max_diff(new_hist, expected_hist) < 1e-6


def test_conv1d_update_matches_reference_and_zero_starts(k):
    g = gen(1)
    channels, kernel, rows = 300, 4, 3
    ref = CausalConv1d(channels, kernel, bias=True)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(channels, 1, kernel, generator=g))
        ref.bias.copy_(torch.randn(channels, generator=g))
    history = torch.randn(rows, channels, kernel - 1, generator=g)
    lens = torch.tensor([5, 0, 2])  # row 1 is a new sequence: its slot's stale history must not count
    state = history.clone()
    state[1] = 0
    x = torch.randn(rows, channels, generator=g)
    expected, expected_hist = ref(x[:, :, None], state)
    hd, xd, wd, bd, ld = dev(history.clone(), x, ref.weight.detach(), ref.bias.detach(), lens)
    out = k.conv1d.causal_conv1d_update(xd, hd, wd, bd, ld)
    assert max_diff(out, expected[:, :, 0]) < 1e-5
    assert max_diff(hd, expected_hist) == 0.0


# --- gated grouped RMSNorm ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rmsnorm_matches_reference(k, dtype):
    g = gen(2)
    size, groups = 96, 4
    ref = GatedGroupRMSNorm(size, groups, 1e-5)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.2 * torch.randn(size, generator=g))
    ref = ref.to(dtype)
    y = torch.randn(2, 5, size, generator=g)  # fp32, as the scan returns it
    packed = torch.randn(2, 5, size + 30, generator=g).to(dtype)
    gate = packed[..., :size]  # a strided view, like the split of in_proj's output
    expected = ref(y, gate, dtype)
    yd, gd, wd = dev(y, gate, ref.weight.detach())
    out = k.norm.gated_group_rmsnorm(yd, gd, wd, groups, 1e-5, dtype)
    assert out.dtype == expected.dtype == dtype
    assert max_diff(out, expected) < 1e-5 if dtype == torch.float32 else bf16_close(out, expected)


# --- SSD --------------------------------------------------------------------------------------


def ssd_inputs(seed: int, b=2, T=19, h=4, p=8, n=16, groups=2):
    g = gen(seed)
    return dict(
        x=torch.randn(b, T, h, p, generator=g),
        dt=torch.rand(b, T, h, generator=g) * 0.5,
        A=-torch.rand(h, generator=g) * 3 - 0.1,
        B=torch.randn(b, T, groups, n, generator=g),
        C=torch.randn(b, T, groups, n, generator=g),
        D=torch.randn(h, generator=g),
        init=torch.randn(b, h, p, n, generator=g),
    )


@pytest.mark.parametrize(
    ("start", "with_init", "chunk"),
    [
        (0, False, 8),
        (3, True, 8),
        (8, True, 8),
        (13, True, 16),
        (0, True, 32),
    ],
)
def test_ssd_chunk_scan_matches_reference(k, start, with_init, chunk):
    t = ssd_inputs(start + chunk)
    init = t["init"] if with_init else None
    expected = ssd_chunk_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], initial_state=init, start=start
    )
    x, dt, A, B, C, D, init_d = dev(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], init)
    got = k.ssd.ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, initial_state=init_d, start=start)
    assert got.chunk_ends == expected.chunk_ends
    assert max_diff(got.y, expected.y) < 1e-4
    assert max_diff(got.final_state, expected.final_state) < 1e-4
    # the per-chunk states (what the prefix cache checkpoints)
    assert got.chunk_states.shape == expected.chunk_states.shape
    assert max_diff(got.chunk_states, expected.chunk_states) < 1e-4


def test_ssd_chunk_scan_bf16_inputs(k):
    t = ssd_inputs(5, T=33)
    x, B, C = (t[n].bfloat16() for n in ("x", "B", "C"))
    expected = ssd_chunk_scan(x, t["dt"], t["A"], B, C, 16, D=t["D"], initial_state=t["init"])
    got = k.ssd.ssd_chunk_scan(
        *dev(x, t["dt"], t["A"], B, C), 16, D=dev(t["D"])[0], initial_state=dev(t["init"])[0]
    )
    assert got.y.dtype == torch.float32 and got.final_state.dtype == torch.float32
    # Same bf16 inputs, fp32 sums either side; on the GPU the dots of a bf16 model run in TF32
    # (dispatch.dot_precision, 10-bit mantissa): the H200 run measured a max |d| of 5.9e-3 on
    # values up to ~6, so the bound is relative (TF32 lands near 3e-4; the interpreter, exact).
    got_y = got.y.cpu()
    assert ((got_y - expected.y).norm() / expected.y.norm()).item() < 1e-3


def test_selective_state_update_matches_reference(k):
    t = ssd_inputs(7, T=1, b=3)
    lens = torch.tensor([4, 0, 9])  # row 1 starts a sequence: zero state, whatever its slot holds
    state_ref = t["init"].clone()
    state_ref[1] = 0
    y_ref = ssd_step(state_ref, t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], t["D"])
    state = dev(t["init"].clone())[0]
    x, dt, A, B, C, D, ld = dev(t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], t["D"], lens)
    y = k.ssd.selective_state_update(state, x, dt, A, B, C, D, cache_lens=ld)
    assert max_diff(y, y_ref) < 1e-5
    assert max_diff(state, state_ref) < 1e-5


def test_selective_state_update_continues_the_scan(k):
    """Scan 10 tokens, then 3 kernel steps == the reference scan over all 13."""
    t = ssd_inputs(8, T=13)
    args = [t[n] for n in ("x", "dt", "A", "B", "C")]
    full = ssd_chunk_scan(*args, 8, D=t["D"])
    x, dt, A, B, C, D = dev(*args, t["D"])
    state = k.ssd.ssd_chunk_scan(x[:, :10], dt[:, :10], A, B[:, :10], C[:, :10], 8, D=D).final_state
    ys = [
        k.ssd.selective_state_update(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D) for i in range(10, 13)
    ]
    assert max_diff(torch.stack(ys, dim=1), full.y[:, 10:]) < 1e-4
    assert max_diff(state, full.final_state) < 1e-4


# --- MoE --------------------------------------------------------------------------------------


def moe_parts(seed, tokens, experts=8, top_k=3, n_group=4, topk_group=2, dim=40, inner=24):
    cfg = MoEConfig(
        hidden_size=dim,
        num_experts=experts,
        top_k=top_k,
        intermediate_size=inner,
        shared_intermediate_size=0,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
    )
    g = gen(seed)
    router, routed = TopKRouter(cfg), RoutedExperts(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, dim, generator=g) / math.sqrt(dim))
        router.e_score_correction_bias.copy_(0.3 * torch.randn(experts, generator=g))
        routed.up_proj.copy_(torch.randn(experts, inner, dim, generator=g) / math.sqrt(dim))
        routed.down_proj.copy_(torch.randn(experts, dim, inner, generator=g) / math.sqrt(inner))
    return router, routed, torch.randn(tokens, dim, generator=g)


@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_fused_moe_matches_reference(k, tokens):
    router, routed, x = moe_parts(tokens, tokens)
    weights, indices = router(x)  # grouped top-3 with the correction bias steering the choice
    expected = routed(x, weights, indices)
    got = k.moe.fused_experts(*dev(x, routed.up_proj.detach(), routed.down_proj.detach(), weights, indices))
    assert max_diff(got, expected) < 1e-4


def test_fused_moe_bf16(k):
    router, routed, x = moe_parts(3, 20)
    routed = routed.to(torch.bfloat16)
    weights, indices = router(x)
    xb = x.bfloat16()
    expected = routed(xb, weights, indices)
    got = k.moe.fused_experts(*dev(xb, routed.up_proj.detach(), routed.down_proj.detach(), weights, indices))
    assert got.dtype == torch.bfloat16
    assert max_diff(got, expected) < 3e-2 * max(1.0, expected.float().abs().max().item())


def test_expert_blocks_layout(k):
    """Every pair appears once, in a block of its own expert; padding rows are marked."""
    indices = torch.tensor([[0, 3], [3, 5], [0, 3]])
    rows, block_expert = k.moe.expert_blocks(indices, num_experts=6, block_m=4)
    flat = indices.reshape(-1)
    pairs = flat.numel()
    real = rows[rows < pairs]
    assert sorted(real.tolist()) == list(range(pairs))
    for i, pair in enumerate(rows.tolist()):
        if pair < pairs:
            assert int(block_expert[i // 4]) == int(flat[pair])
    used = block_expert[block_expert >= 0].tolist()
    assert used == sorted(used) and set(used) == {0, 3, 5}


# --- decode attention ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "head_dim", "capacity", "lens"),
    [
        (3, 8, 2, 32, 300, [0, 77, 299]),  # 5 splits; a row with only its new key; a full row
        (1, 5, 1, 24, 64, [40]),  # a GQA group of 5 padded to 16 query rows; head_dim not a power of 2
        (2, 4, 4, 16, 1000, [999, 3]),  # 16 splits, 15 of them empty for row 1
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa(k, batch, heads, kv_heads, head_dim, capacity, lens, dtype):
    """Row r attends to keys 0..lens[r] of its cache and nothing after them (the tail holds
    noise); fp32 within 1e-5, bf16 within 2e-2 of fp32 maths (the kernel rounds the softmax
    weights to bf16 before the value product, as flash attention does)."""
    g = gen(11)
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    k_cache = torch.randn(batch, kv_heads, capacity, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(batch, kv_heads, capacity, head_dim, generator=g).to(dtype)
    cache_lens = torch.tensor(lens)
    got = k.attention.decode_attention(*dev(q, k_cache, v_cache, cache_lens)).cpu()
    assert got.dtype == dtype and got.shape == q.shape
    mask = (torch.arange(capacity)[None, :] <= cache_lens[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        q[:, :, None].float(), k_cache.float(), v_cache.float(), attn_mask=mask, enable_gqa=True
    )[:, :, 0]
    assert max_diff(got, expected) < (1e-5 if dtype == torch.float32 else 2e-2)


# --- the whole model: kernels (forced onto CPU under the interpreter) vs the PyTorch path ------


@pytest.fixture(scope="module", params=["dense", "moe"])
def tiny(request, tmp_path_factory):
    from nemotron_fixtures import write_checkpoint

    from plait.backends.loading.nemotron_h import load_nemotron_h

    directory = tmp_path_factory.mktemp(f"kernels-{request.param}")
    with torch.random.fork_rng():
        write_checkpoint(directory, request.param, seed=21)
    return directory, load_nemotron_h(directory, torch.float32, "cpu")


def device_pool(model, slots: int, capacity: int = 64):
    from plait.backends.runtime.state_pool import StatePool

    device = model.embeddings.weight.device
    return StatePool(
        model.state_specs(model.embeddings.weight.dtype),
        device=device,
        slots=slots,
        capacity=capacity,
        max_length=model.context_length,
    )


@torch.no_grad()
def feed(
    model,
    pool,
    first_slot: int,
    ids: torch.Tensor,
    cache_lens: list[int],
    new_tokens: list[int] | None = None,
) -> torch.Tensor:
    """One pass of ids [B, T] for slots first_slot.. holding cache_lens tokens, on the model's
    device; `new_tokens`: real tokens per row of a right-padded pass."""
    device = model.embeddings.weight.device
    pool.reserve(pool.slots, max(cache_lens) + ids.shape[1])
    real = torch.tensor(new_tokens) if new_tokens is not None else None
    batch = Batch(pool, first_slot, torch.tensor(cache_lens, device=device), real)
    return model(ids.to(device), batch)


@torch.no_grad()
def run_cached(model, ids, batched_tokens):
    """Prefill two rows in passes of 5 and 8 tokens (the second pass starts mid-chunk), leave
    stale state in slot 2, then decode steps for rows 0..2 where row 2 starts from nothing,
    then one right-padded pass of 11, 4 and 7 tokens for rows 0..2 (the conv history and SSM
    state must end at each row's last real token) and a last decode step.
    -> (logits of every pass, the pool)."""
    pool = device_pool(model, slots=4)
    out = [
        feed(model, pool, 0, ids[:, :5], [0]),
        feed(model, pool, 0, ids[:, 5:13], [5]),
        feed(model, pool, 1, ids[:, 3:12], [0]),
        feed(model, pool, 2, ids[:, 1:7], [0]),
    ]  # stale: row 2's decode says cache_len 0
    lens = [13, 9, 0]
    for step in batched_tokens:
        out.append(feed(model, pool, 0, step[:, None], lens))
        lens = [n + 1 for n in lens]
    real = [11, 4, 7]
    out.append(feed(model, pool, 0, ids[:, 2:13].expand(3, -1), lens, real))
    lens = [n + r for n, r in zip(lens, real)]
    out.append(feed(model, pool, 0, batched_tokens[0][:, None], lens))
    return out, pool


def test_whole_model_on_kernels_matches_pytorch_path(k, tiny):
    """Every Mamba/MoE layer of the tiny checkpoints through the kernels (interpreted on CPU):
    full forward, chunked prefill from mid-chunk positions, batched decode with a fresh row,
    a padded multi-row pass."""
    if CUDA:
        pytest.skip("on a GPU, test_gpu_logits_equal_cpu_path runs the whole model on the kernels")
    _, model = tiny
    from nemotron_fixtures import random_ids

    ids = random_ids(21, seed=3)
    steps = random_ids(9, seed=4).view(3, 3)
    with torch.no_grad():
        ref_full = model(ids)
    ref_cached, ref_pool = run_cached(model, ids, steps)
    with dispatch.forced(), torch.no_grad():
        full = model(ids)
        cached, pool = run_cached(model, ids, steps)
    assert max_diff(full, ref_full) < 1e-4
    for got, expected in zip(cached, ref_cached):
        assert max_diff(got, expected) < 1e-4
    for got_layer, ref_layer in zip(pool.layers, ref_pool.layers):
        for name in got_layer:
            assert max_diff(got_layer[name][:3], ref_layer[name][:3]) < 1e-4, name


# --- decode buckets (CUDA graphs' padding, checked eagerly on CPU) -------------------------


def test_bucket_for(parent_only):
    from plait.backends.runtime.cuda_graphs import BUCKETS, bucket_for

    assert [bucket_for(n) for n in (1, 2, 3, 8, 9, 256)] == [1, 2, 4, 8, 16, 256]
    assert bucket_for(1, BUCKETS[1:]) == 2  # no one-row bucket without the attention kernel
    assert bucket_for(257) is None


@torch.no_grad()
def test_padded_decode_leaves_real_rows_unchanged(parent_only, tiny):
    """3 rows padded to a bucket of 4: the padding row decodes a throwaway token in the free
    slot 3 (which holds stale state); rows 0..2 get exactly the unpadded logits and state."""
    from nemotron_fixtures import random_ids

    from plait.backends.runtime.cuda_graphs import DecodeGraphs

    _, model = tiny
    pools = [device_pool(model, slots=4, capacity=32) for _ in range(2)]
    for pool in pools:
        for slot, (n, seed) in enumerate([(7, 1), (11, 2), (4, 3), (9, 4)]):
            feed(model, pool, slot, random_ids(n, seed=seed), [0])
    eager_pool, padded_pool = pools
    graphs = DecodeGraphs(model, padded_pool, capture=False)
    lens = [7, 11, 4]
    for step in random_ids(9, seed=5).view(3, 3):
        expected = feed(model, eager_pool, 0, step[:, None], lens)
        got = graphs.run(step[:, None], 0, torch.tensor(lens), live_slots=3)
        assert got.shape == (3, 1, model.vocab_size)
        assert max_diff(got, expected) < 1e-5
        lens = [n + 1 for n in lens]
    for padded_layer, eager_layer in zip(padded_pool.layers, eager_pool.layers):
        for name in padded_layer:
            assert max_diff(padded_layer[name][:3], eager_layer[name][:3]) < 1e-5, name
    # Padding must never land on a live sequence: rows 0..1 with slot 2 still live -> eager.
    assert graphs.run(torch.tensor([[5], [6]]), 0, torch.tensor([10, 14]), live_slots=3) is None
    assert (
        graphs.run(torch.ones(300, 1, dtype=torch.long), 0, torch.ones(300, dtype=torch.long), live_slots=300)
        is None
    )


# --- on a GPU only ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (device runs): GPU logits vs the CPU path")


@needs_cuda
@torch.no_grad()
def test_gpu_logits_equal_cpu_path(k, tiny):
    """fp32 on both sides (the kernels' dots use IEEE fp32 for fp32 models)."""
    from nemotron_fixtures import random_ids

    from plait.backends.loading.nemotron_h import load_nemotron_h

    directory, cpu_model = tiny
    gpu_model = load_nemotron_h(directory, torch.float32, "cuda")
    ids = random_ids(21, seed=3)
    steps = random_ids(9, seed=4).view(3, 3)
    assert max_diff(gpu_model(ids.cuda()), cpu_model(ids)) < 1e-4
    cpu_out, _ = run_cached(cpu_model, ids, steps)
    gpu_out, _ = run_cached(gpu_model, ids.cuda(), steps.cuda())
    for got, expected in zip(gpu_out, cpu_out):
        assert max_diff(got, expected) < 1e-4


@needs_cuda
@torch.no_grad()
def test_cuda_graph_decode_equals_eager(k, tiny):
    from nemotron_fixtures import random_ids

    from plait.backends.loading.nemotron_h import load_nemotron_h
    from plait.backends.runtime.cuda_graphs import DecodeGraphs

    model = load_nemotron_h(tiny[0], torch.float32, "cuda")
    pools = [device_pool(model, slots=4, capacity=32) for _ in range(2)]
    for pool in pools:
        for slot, (n, seed) in enumerate([(7, 1), (11, 2), (4, 3)]):
            feed(model, pool, slot, random_ids(n, seed=seed), [0])
    graphs = DecodeGraphs(model, pools[1])
    lens = [7, 11, 4]
    for step in random_ids(12, seed=5).view(4, 3):
        expected = feed(model, pools[0], 0, step[:, None], lens)
        got = graphs.run(step[:, None].cuda(), 0, torch.tensor(lens, device="cuda"), live_slots=3)
        assert got is not None and not graphs.failed
        assert max_diff(got, expected) < 1e-4
        lens = [n + 1 for n in lens]
    assert list(graphs.graphs) == [(0, 4)]
