"""Nemotron-H on the CPU path, checked against transformers 5.23 on tiny random checkpoints.

Three checkpoints (see nemotron_fixtures): "dense" (M, *, -), "moe" (E with shared expert,
correction bias, grouped top-3) and "latent" (LatentMoE). For each: logits equal transformers'
to 1e-4 in fp32, greedy generation equals `generate(do_sample=False)`, and plait's cached paths
(chunked prefill, one-token decode, batched decode) equal its own full forward.
"""

import json
import math
import shutil

import pytest
import torch
from nemotron_fixtures import (
    CONFIGS,
    decode_step,
    new_pool,
    prefill,
    random_ids,
    reinitialise,
    write_checkpoint,
)
from safetensors.torch import load_file, save_file

from plait.backends.loading.nemotron_h import load_nemotron_h
from plait.backends.models.mamba2 import DtClamp
from plait.backends.models.nemotron_h_config import ATTENTION, MAMBA, MLP, MOE, NemotronHConfig
from plait.backends.models.ssd import ssd_chunk_scan, ssd_step
from plait.backends.models.state import Batch
from plait.errors import CheckpointError

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(kind, directory, transformers model, plait model) for each tiny config."""
    kind = request.param
    directory = tmp_path_factory.mktemp(f"nemotron-{kind}")
    with torch.random.fork_rng():
        hf = write_checkpoint(directory, kind, seed=1234)
    model = load_nemotron_h(directory, torch.float32, "cpu")
    return kind, directory, hf, model


@pytest.fixture(scope="module")
def unclamped(checkpoint):
    """The same checkpoint with dt_clamp="none".

    With the default ("transformers"), a one-token step does not clamp dt while a scan does,
    exactly like transformers, so decode equals full forward only while dt >= time_step_min
    (these random weights do go below it). Without a clamp every path computes the same
    function, which is what the cache tests below check exactly.
    """
    return load_nemotron_h(checkpoint[1], torch.float32, "cpu", dt_clamp="none")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- against transformers --------------------------------------------------------------------


@torch.no_grad()
def test_logits_match_transformers(checkpoint):
    kind, _, hf, model = checkpoint
    ids = random_ids(21, seed=7)  # 21 tokens = 2 full chunks of 8 + a partial one
    ref = hf(ids).logits
    out = model(ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    diff = max_diff(out, ref)
    print(f"{kind}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < ATOL
    assert max_diff(model(ids, last_only=True), ref[:, -1:]) < ATOL


@torch.no_grad()
def test_greedy_generation_matches_transformers(checkpoint):
    _, _, hf, model = checkpoint
    prompt = random_ids(11, seed=8)
    new_tokens = 12
    hf.generation_config.eos_token_id = None  # never stop early
    expected = hf.generate(
        prompt,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )

    pool = new_pool(model)
    logits = prefill(model, pool, 0, prompt)[:, -1]
    token = int(logits[0].argmax())
    generated, step_logits, length = [token], [logits], prompt.shape[1]
    for _ in range(new_tokens - 1):
        logits = decode_step(model, pool, 0, torch.tensor([token]), torch.tensor([length]))
        token, length = int(logits[0].argmax()), length + 1
        generated.append(token)
        step_logits.append(logits)
    assert generated == expected.sequences[0, 11:].tolist()
    # Not just the argmax: every step's logits, transformers' decode path included.
    assert max_diff(torch.cat(step_logits), torch.cat(expected.logits)) < ATOL


# --- plait's cached paths against its own full forward ----------------------------------------


@torch.no_grad()
def test_incremental_decode_matches_full_forward(unclamped):
    model = unclamped
    ids = random_ids(20, seed=9)
    full = model(ids)
    pool = new_pool(model)
    logits = [prefill(model, pool, 0, ids[:, :6])]
    for pos in range(6, 20):
        logits.append(decode_step(model, pool, 0, ids[:, pos], torch.tensor([pos]))[:, None])
    assert max_diff(torch.cat(logits, dim=1), full) < ATOL


@pytest.mark.parametrize(
    ("chunks", "clamp"),
    [
        ([5, 7, 11], "default"),
        ([8, 8, 7], "default"),
        ([5, 7, 11], "none"),
        # A one-token pass is a decode step, which (like transformers) the default does not clamp.
        ([5, 1, 7, 10], "none"),
    ],
)
@torch.no_grad()
def test_chunked_prefill_matches_one_pass(checkpoint, unclamped, chunks, clamp):
    model = checkpoint[3] if clamp == "default" else unclamped
    ids = random_ids(23, seed=10)
    full = model(ids)
    one_pool, chunk_pool = new_pool(model), new_pool(model)
    one = prefill(model, one_pool, 0, ids)
    chunked = prefill(model, chunk_pool, 0, ids, chunks=chunks)
    assert max_diff(one, full) < ATOL
    assert max_diff(chunked, full) < ATOL
    for layer_one, layer_chunked in zip(one_pool.layers, chunk_pool.layers):
        for name in layer_one:  # the state left behind is the same too
            assert max_diff(layer_one[name][0], layer_chunked[name][0]) < 1e-5, name
    # ... and the next token continues identically.
    nxt = torch.tensor([17])
    assert (
        max_diff(
            decode_step(model, one_pool, 0, nxt, torch.tensor([23])),
            decode_step(model, chunk_pool, 0, nxt, torch.tensor([23])),
        )
        < ATOL
    )


@torch.no_grad()
def test_batched_decode_matches_each_alone(checkpoint):
    _, _, _, model = checkpoint
    prompts = [random_ids(n, seed=20 + n) for n in (5, 11, 8)]
    steps = random_ids(6 * 3, seed=30).view(6, 3)  # fixed tokens fed to each row at each step

    alone = []
    for r, prompt in enumerate(prompts):
        pool = new_pool(model)
        prefill(model, pool, 0, prompt)
        rows = []
        for s in range(steps.shape[0]):
            length = torch.tensor([prompt.shape[1] + s])
            rows.append(decode_step(model, pool, 0, steps[s, r : r + 1], length)[0])
        alone.append(torch.stack(rows))

    pool = new_pool(model, slots=3)
    # Leave stale state in slot 1: a row starting at position 0 must ignore it.
    prefill(model, pool, 1, random_ids(9, seed=99))
    for r, prompt in enumerate(prompts):
        prefill(model, pool, r, prompt)
    lens = torch.tensor([p.shape[1] for p in prompts])
    together = []
    for s in range(steps.shape[0]):
        together.append(decode_step(model, pool, 0, steps[s], lens))
        lens = lens + 1
    together = torch.stack(together, dim=1)  # [3, steps, V]
    for r in range(3):
        assert max_diff(together[r], alone[r]) < 1e-5


def assert_same_state(pool_a, slot_a: int, pool_b, slot_b: int, length: int, atol: float) -> None:
    """Every layer's state of one sequence in two pools: Mamba conv/SSM state whole, attention
    keys/values over the sequence's `length` positions (what lies past it is never read)."""
    for specs, layer_a, layer_b in zip(pool_a.layer_specs, pool_a.layers, pool_b.layers):
        for name, spec in specs.items():
            a, b = layer_a[name][slot_a], layer_b[name][slot_b]
            if spec.seq_axis is not None:
                a, b = a.narrow(spec.seq_axis, 0, length), b.narrow(spec.seq_axis, 0, length)
            assert max_diff(a, b) < atol, name


@torch.no_grad()
def test_padded_multi_row_pass_matches_each_row_alone(checkpoint):
    """Rows of different lengths in one right-padded pass (`Batch.new_tokens`), two of them
    continuing a cached prefix from mid-chunk positions and one starting over a stale slot:
    each row's last logits, the conv/SSM/KV state it leaves, and the decode steps after it
    equal the row computed alone. The padding must neither enter the SSM state nor end the
    conv history; the default dt clamp is on, so a padding dt masked before the clamp would
    show too."""
    model = checkpoint[3]
    prompts = [random_ids(n, seed=40 + n) for n in (19, 11, 16)]
    starts = [0, 5, 3]
    steps = random_ids(4 * 3, seed=50).view(4, 3)

    alone_pools, alone_last = [], []
    for prompt, start in zip(prompts, starts):
        alone_pools.append(new_pool(model))
        chunks = [start, prompt.shape[1] - start] if start else None
        alone_last.append(prefill(model, alone_pools[-1], 0, prompt, chunks=chunks)[0, -1])

    pool = new_pool(model, slots=3)
    prefill(model, pool, 0, random_ids(9, seed=99))  # stale: row 0 starts at position 0 over it
    for slot, (prompt, start) in enumerate(zip(prompts, starts)):
        if start:
            prefill(model, pool, slot, prompt[:, :start])
    chunks = [prompt[0, start:] for prompt, start in zip(prompts, starts)]
    width = max(len(c) for c in chunks)
    padded = torch.stack([torch.cat([c, c[-1:].expand(width - len(c))]) for c in chunks])
    batch = Batch(pool, 0, torch.tensor(starts), torch.tensor([len(c) for c in chunks]))
    last = model(padded, batch, last_only=True)[:, -1]
    lens = torch.tensor([p.shape[1] for p in prompts])
    for r in range(3):
        assert max_diff(last[r], alone_last[r]) < ATOL
        assert_same_state(pool, r, alone_pools[r], 0, int(lens[r]), ATOL)
    for s in range(steps.shape[0]):
        together = decode_step(model, pool, 0, steps[s], lens + s)
        for r, alone in enumerate(alone_pools):
            expected = decode_step(model, alone, 0, steps[s, r : r + 1], lens[r : r + 1] + s)
            assert max_diff(together[r], expected[0]) < ATOL


# --- the dt clamp --------------------------------------------------------------------------


@torch.no_grad()
def test_dt_clamp_modes(tmp_path):
    """With dt far below time_step_min, transformers clamps it in prefill but not in decode.

    plait's default ("transformers") reproduces that exactly, including the mismatch between
    transformers' own incremental decode and its full forward; "none" (vLLM) never clamps, so
    its decode equals its full forward.
    """
    from transformers import NemotronHForCausalLM as HFModel

    write_checkpoint(tmp_path, "dense", seed=5)
    hf = HFModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for layer in hf.model.layers:
        if hasattr(layer.mixer, "dt_bias"):
            layer.mixer.dt_bias.fill_(-9.0)  # softplus(-9) ~ 1.2e-4 < time_step_min = 1e-3
    hf.save_pretrained(tmp_path)
    ids = random_ids(14, seed=11)

    default = load_nemotron_h(tmp_path, torch.float32, "cpu")
    never = load_nemotron_h(tmp_path, torch.float32, "cpu", dt_clamp="none")
    assert default.layers[0].mixer.cfg.dt_clamp == DtClamp(1e-3, math.inf, in_scan=True, in_step=False)
    ref = hf(ids).logits
    assert max_diff(default(ids), ref) < ATOL
    assert max_diff(never(ids), ref) > 1e-3  # the clamp visibly matters here

    # transformers' incremental decode: prefill 10 tokens, then one-token steps.
    out = hf(ids[:, :10], use_cache=True)
    cache, hf_steps = out.past_key_values, []
    for pos in range(10, 14):
        out = hf(ids[:, pos : pos + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        hf_steps.append(out.logits[:, -1])
    hf_steps = torch.stack(hf_steps, dim=1)
    assert max_diff(hf_steps, ref[:, 10:14]) > 1e-3  # transformers is not self-consistent here

    for model, expected in ((default, hf_steps), (never, never(ids)[:, 10:14])):
        pool = new_pool(model)
        prefill(model, pool, 0, ids[:, :10])
        steps = [decode_step(model, pool, 0, ids[:, pos], torch.tensor([pos])) for pos in range(10, 14)]
        assert max_diff(torch.stack(steps, dim=1), expected) < ATOL


def test_dt_clamp_named_modes():
    assert DtClamp.named("none", 1e-3) == DtClamp()
    limit = DtClamp.named("limit", 1e-3, (0.01, math.inf))
    dt = torch.tensor([[0.001, 0.5]])
    assert limit.apply(dt, scan_rows=False).flatten().tolist() == pytest.approx([0.01, 0.5])
    transformers = DtClamp.named("transformers", 1e-3)
    low = torch.tensor([[1e-5], [1e-5]])
    # Per row: a scanned row (its first token) is clamped, a continuing step is not.
    clamped = transformers.apply(low, torch.tensor([True, False]))
    assert clamped.flatten().tolist() == pytest.approx([1e-3, 1e-5])
    with pytest.raises(ValueError):
        DtClamp.named("sometimes", 1e-3)


# --- the SSD scan itself -------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 3, 8])
def test_ssd_chunk_scan_matches_recurrence(start):
    g = torch.Generator().manual_seed(start)
    b, T, h, p, n, groups, chunk = 2, 19, 4, 3, 5, 2, 4
    x = torch.randn(b, T, h, p, generator=g)
    dt = torch.rand(b, T, h, generator=g) * 0.5
    A = -torch.rand(h, generator=g) * 3 - 0.1
    B = torch.randn(b, T, groups, n, generator=g)
    C = torch.randn(b, T, groups, n, generator=g)
    D = torch.randn(h, generator=g)
    init = torch.randn(b, h, p, n, generator=g)

    result = ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, initial_state=init, start=start)

    state, ys, states = init.clone(), [], []
    for t in range(T):
        ys.append(ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D))
        states.append(state.clone())
    assert max_diff(result.y, torch.stack(ys, dim=1)) < 1e-4
    assert max_diff(result.final_state, state) < 1e-4
    # Chunk states sit at absolute multiples of the chunk size (and the end of the pass).
    assert all((start + end) % chunk == 0 for end in result.chunk_ends[:-1])
    assert result.chunk_ends[-1] == T
    assert result.chunk_states.shape == (b, len(result.chunk_ends), h, p, n)
    for c, end in enumerate(result.chunk_ends):
        assert max_diff(result.chunk_states[:, c], states[end - 1]) < 1e-4


# --- config parsing ------------------------------------------------------------------------


def test_config_pattern_and_block_type_list_agree():
    expected = [MAMBA, ATTENTION, MLP, MOE]
    by_pattern = NemotronHConfig.from_dict({"hybrid_override_pattern": "M*-E"})
    by_list = NemotronHConfig.from_dict(
        {"layers_block_type": ["linear_attention", "full_attention", "mlp", "moe"]}
    )
    by_legacy_list = NemotronHConfig.from_dict({"layers_block_type": ["mamba", "attention", "mlp", "moe"]})
    assert by_pattern.layer_types == by_list.layer_types == by_legacy_list.layer_types == expected
    assert by_list.hybrid_override_pattern == "M*-E"
    assert by_list.num_hidden_layers == 4
    with pytest.raises(CheckpointError, match="unknown symbols"):
        NemotronHConfig.from_dict({"hybrid_override_pattern": "M*X"})
    with pytest.raises(CheckpointError, match="unknown layer types"):
        NemotronHConfig.from_dict({"layers_block_type": ["mamba", "conv"]})
    with pytest.raises(CheckpointError, match="neither"):
        NemotronHConfig.from_dict({"hidden_size": 64})


def test_config_infinity_and_legacy_keys(tmp_path):
    text = """{"hybrid_override_pattern": "M*M-", "time_step_limit": [0.0, Infinity],
               "mamba_dt_min": 0.002, "mamba_n_groups": 4, "mamba_chunk_size": 256,
               "mamba_d_conv": 3, "num_hidden_layers": 4}"""
    (tmp_path / "config.json").write_text(text)
    cfg = NemotronHConfig.from_json_file(tmp_path / "config.json")
    assert cfg.time_step_limit == (0.0, math.inf)
    assert (cfg.time_step_min, cfg.n_groups, cfg.chunk_size, cfg.conv_kernel) == (0.002, 4, 256, 3)
    assert cfg.mamba().dt_clamp.low == 0.002
    # transformers 5 writes infinity as {"__float__": "Infinity"}; strings work too.
    for spelled in ({"__float__": "Infinity"}, "Infinity", "inf"):
        cfg = NemotronHConfig.from_dict({"hybrid_override_pattern": "M", "time_step_limit": [0.0, spelled]})
        assert cfg.time_step_limit[1] == math.inf
    limit = NemotronHConfig.from_dict({"hybrid_override_pattern": "M"}, dt_clamp="limit")
    assert limit.mamba().dt_clamp.in_step


def test_config_written_by_transformers(checkpoint):
    kind, directory, hf, _ = checkpoint
    raw = json.loads((directory / "config.json").read_text())
    assert "layers_block_type" in raw and "hybrid_override_pattern" not in raw
    cfg = NemotronHConfig.from_json_file(directory / "config.json")
    assert cfg.hybrid_override_pattern == CONFIGS[kind]["hybrid_override_pattern"]
    assert cfg.time_step_limit == (0.0, math.inf)
    assert cfg.moe_latent_size == hf.config.moe_latent_size


# --- loading -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nemotron-dense-errors")
    with torch.random.fork_rng():
        write_checkpoint(directory, "dense", seed=3)
    return directory


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_corrupt_checkpoints_raise(dense_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_nemotron_h(tmp_path / "nowhere", torch.float32)

    no_config = _copy(dense_dir, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_nemotron_h(no_config, torch.float32)

    bad_json = _copy(dense_dir, tmp_path / "bad-json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_nemotron_h(bad_json, torch.float32)

    no_weights = _copy(dense_dir, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_nemotron_h(no_weights, torch.float32)

    corrupt = _copy(dense_dir, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_nemotron_h(corrupt, torch.float32)


def test_unknown_missing_and_misshapen_weights_raise(dense_dir, tmp_path):
    weights = load_file(dense_dir / "model.safetensors")

    def variant(name, change):
        directory = _copy(dense_dir, tmp_path / name)
        tensors = dict(weights)
        change(tensors)
        save_file(tensors, directory / "model.safetensors")
        return directory

    extra = variant("extra", lambda t: t.__setitem__("backbone.layers.0.mixer.surprise", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="layers.0.mixer.surprise"):
        load_nemotron_h(extra, torch.float32)

    missing = variant("missing", lambda t: t.pop("backbone.layers.0.mixer.A_log"))
    with pytest.raises(CheckpointError, match="missing, e.g. layers.0.mixer.A_log"):
        load_nemotron_h(missing, torch.float32)

    shape = variant("shape", lambda t: t.__setitem__("backbone.norm_f.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match="norm_f.weight has shape"):
        load_nemotron_h(shape, torch.float32)

    # Multi-token-prediction heads are skipped on purpose, not reported.
    mtp = variant("mtp", lambda t: t.__setitem__("mtp.layers.0.norm.weight", torch.ones(64)))
    load_nemotron_h(mtp, torch.float32)


@torch.no_grad()
def test_sharded_checkpoint(tmp_path):
    hf = write_checkpoint(tmp_path / "one", "moe", seed=4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    assert index.exists()
    model = load_nemotron_h(tmp_path / "sharded", torch.float32)
    ids = random_ids(9, seed=12)
    assert max_diff(model(ids), hf(ids).logits) < ATOL

    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="missing: " + shards[-1].name):
        load_nemotron_h(tmp_path / "sharded", torch.float32)


@torch.no_grad()
def test_transformers_internal_names_and_tied_embeddings(tmp_path):
    """`model.`-prefixed names with fused [E, out, in] experts (transformers' in-memory layout)
    load too. With tie_word_embeddings, a checkpoint's own lm_head wins (transformers 5.23
    never ties Nemotron-H); without one, the head is the embedding matrix."""
    hf = write_checkpoint(tmp_path / "saved", "moe", seed=6, tie_word_embeddings=True)
    ids = random_ids(10, seed=14)
    ref = hf(ids).logits
    internal = tmp_path / "internal"
    internal.mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", internal / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mixer.experts.up_proj" in state
    save_file(state, internal / "model.safetensors")
    for directory in (tmp_path / "saved", internal):
        model = load_nemotron_h(directory, torch.float32)
        assert model.lm_head.weight is not model.embeddings.weight
        assert max_diff(model(ids), ref) < ATOL

    del state["lm_head.weight"]
    save_file(state, internal / "model.safetensors")
    model = load_nemotron_h(internal, torch.float32)
    assert model.lm_head.weight is model.embeddings.weight
    hf.lm_head.weight.copy_(hf.model.embeddings.weight)
    assert max_diff(model(ids), hf(ids).logits) < ATOL


@torch.no_grad()
def test_bfloat16_load_runs_close_to_fp32(checkpoint):
    _, directory, _, model = checkpoint
    half = load_nemotron_h(directory, torch.bfloat16, "cpu")
    assert half.embeddings.weight.dtype == torch.bfloat16
    assert half.layers[0].mixer.A_log.dtype == torch.float32  # fp32 math inputs stay fp32
    assert half.state_specs(torch.bfloat16)[0]["ssm"].dtype == torch.float32
    ids = random_ids(12, seed=13)
    full = half(ids)
    assert full.dtype == torch.float32
    assert (full - model(ids)).abs().mean() < 0.05
    assert half.state_specs(torch.bfloat16)[0]["conv"].dtype == torch.bfloat16
    pool = new_pool(half)
    prefill(half, pool, 0, ids[:, :8])
    step = decode_step(half, pool, 0, ids[:, 8], torch.tensor([8]))
    assert (step - full[:, 8]).abs().mean() < 0.05


def test_reinitialise_is_seeded():
    """The fixtures' re-initialisation is deterministic, so a failure reproduces."""
    from nemotron_fixtures import hf_config
    from transformers import NemotronHForCausalLM as HFModel

    a, b = HFModel(hf_config("latent")), HFModel(hf_config("latent"))
    reinitialise(a, 1)
    reinitialise(b, 1)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
