"""Nemotron 3 Super's multi-token prediction head (`plait.backends.models.nemotron_h_mtp`).

Tiny checkpoints in the released layout (mtp_fixtures) with MTP sublayers "*E" (the released
one), "*-" and "M-" (a Mamba sublayer: stateful like attention, but fixed-size). For each: every
`mtp.*` tensor loads; a full MTP pass equals the same head computed with transformers' blocks;
passes continued from the engine's state pool (one pass, chunks, one token at a time, several
rows) equal the full pass to 1e-5 in fp32; draft steps chain on their own hidden states.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from plait.backends.loading import registry
from plait.backends.loading.nemotron_h import load_nemotron_h
from plait.backends.models.nemotron_h_config import ATTENTION, MAMBA, MLP, MOE, NemotronHConfig
from plait.backends.models.state import Batch
from plait.errors import CheckpointError
from tests.mtp_fixtures import write_mtp_checkpoint
from tests.nemotron_fixtures import new_pool, random_ids, write_checkpoint
from tests.test_nemotron_engine import _byte_tokenizer
from tests.test_nemotron_h import _one_thread  # noqa: F401 (autouse: tiny tensors run faster on one thread)

ATOL = 1e-4  # against transformers' blocks
SAME = 1e-5  # plait's cached paths against its own full pass
PATTERNS = ["*E", "*-", "M-"]


@pytest.fixture(scope="module", params=PATTERNS)
def checkpoint(request, tmp_path_factory):
    """(transformers reference, plait model with dt_clamp="none").

    Without a dt clamp a one-token Mamba step and a scan compute the same function (see
    test_nemotron_h's `unclamped`), which is what the cache tests check exactly."""
    directory = tmp_path_factory.mktemp("mtp")
    with torch.random.fork_rng():
        reference = write_mtp_checkpoint(directory, request.param, seed=11)
    return reference, load_nemotron_h(directory, torch.float32, dt_clamp="none")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def draft_inputs(model, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [1, length+1], main hidden h[t] [1, length, H], next tokens x[t+1] [1, length])."""
    ids = random_ids(length + 1, seed)
    _, hidden = model(ids, return_hidden=True)
    return ids, hidden[:, :-1], ids[:, 1:]


@torch.no_grad()
def cached_mtp(model, pool, slot: int, hidden, next_ids, start: int, sizes: list[int], step: int = 0):
    """Feed the MTP head position by position groups (`sizes`) into `slot`, which already holds
    `start` MTP positions; returns (logits, MTP hidden) of every fed position."""
    logits, hiddens, pos = [], [], 0
    for size in sizes:
        pool.reserve(pool.slots, start + pos + size)
        batch = Batch(pool, slot, torch.tensor([start + pos]))
        out = model.mtp_forward(hidden[:, pos : pos + size], next_ids[:, pos : pos + size], batch, step)
        logits.append(out[0])
        hiddens.append(out[1])
        pos += size
    assert pos == next_ids.shape[1]
    return torch.cat(logits, dim=1), torch.cat(hiddens, dim=1)


# --- loading --------------------------------------------------------------------------------


def test_every_mtp_weight_loads(checkpoint):
    reference, model = checkpoint
    kinds = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}
    assert [block.kind for block in model.mtp.layers] == [kinds[s] for s in reference.pattern]
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in reference.tensors.items():
        expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", name)
        loaded = params[f"{expert[1]}.{expert[3]}"][int(expert[2])] if expert else params[name]
        assert torch.equal(loaded, tensor), name
    # The head shares the main model's embedding and lm_head: it has no copies of its own.
    assert all(name.startswith("layers.") for name, _ in model.mtp.named_parameters())
    # Its state follows the main layers' in the pool.
    specs = model.state_specs(torch.float32)
    assert model.mtp.first_state_layer == len(model.layers)
    assert len(specs) == len(model.layers) + len(reference.pattern)
    assert [set(s) for s in specs[len(model.layers) :]] == [
        {"k", "v"} if s == "*" else {"conv", "ssm"} if s == "M" else set() for s in reference.pattern
    ]


@torch.no_grad()
def test_multimodal_prefix_through_the_registry(tmp_path):
    """`language_model.`-prefixed names load through the registry (projections fused)."""
    reference = write_mtp_checkpoint(tmp_path, "*E", seed=12, prefix="language_model.")
    assert all(k.startswith("language_model.") for k in load_file(tmp_path / "model-mtp.safetensors"))
    _byte_tokenizer(tmp_path)
    model, _, family = registry.load(tmp_path, "cpu", registry.precision(tmp_path, "cpu"))
    assert family == "nemotron_h" and model.mtp.layers[0].mixer.qkv_proj is not None
    ids = random_ids(10, seed=3)
    hidden = reference.hidden(ids)
    expected = reference.forward(hidden, ids)
    for out, ref in zip(model.mtp_forward(hidden, ids), expected):
        assert max_diff(out, ref) < ATOL


def test_checkpoint_without_mtp(tmp_path):
    write_checkpoint(tmp_path, "dense", seed=2)
    model = load_nemotron_h(tmp_path, torch.float32)
    assert model.mtp is None
    assert len(model.state_specs(torch.float32)) == len(model.layers)
    with pytest.raises(ValueError, match="no MTP layers"):
        model.mtp_forward(torch.zeros(1, 1, 64), torch.zeros(1, 1, dtype=torch.long))


def test_mtp_weights_skipped_when_the_config_has_no_mtp_layers(tmp_path):
    write_mtp_checkpoint(tmp_path, "*E", seed=4)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 0}))
    assert load_nemotron_h(tmp_path, torch.float32).mtp is None


def test_missing_mtp_weight_raises(tmp_path):
    write_mtp_checkpoint(tmp_path, "*E", seed=5)
    shard = tmp_path / "model-mtp.safetensors"
    tensors = load_file(shard)
    del tensors["mtp.layers.0.eh_proj.weight"]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=r"missing, e\.g\. mtp\.layers\.0\.eh_proj\.weight"):
        load_nemotron_h(tmp_path, torch.float32)


def test_mtp_config_keys():
    base = {"hybrid_override_pattern": "M*E"}
    assert NemotronHConfig.from_dict(base).mtp_layer_types == []
    by_pattern = NemotronHConfig.from_dict(
        base | {"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E"}
    )
    by_list = NemotronHConfig.from_dict(
        base | {"num_nextn_predict_layers": 1, "mtp_layers_block_type": ["full_attention", "moe"]}
    )
    transformers_default = NemotronHConfig.from_dict(base | {"num_nextn_predict_layers": 1})
    assert by_pattern.mtp_layer_types == by_list.mtp_layer_types == [ATTENTION, MOE]
    assert transformers_default.mtp_layer_types == [ATTENTION, MOE]
    # Without MTP layers the keys are not read (transformers writes its default list everywhere).
    assert NemotronHConfig.from_dict(base | {"mtp_hybrid_override_pattern": "X"}).mtp_layer_types == []
    with pytest.raises(CheckpointError, match=r"unknown symbols \['X'\] in mtp_hybrid_override_pattern"):
        NemotronHConfig.from_dict(base | {"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*X"})
    with pytest.raises(CheckpointError, match="unknown layer types .* in mtp_layers_block_type"):
        NemotronHConfig.from_dict(base | {"num_nextn_predict_layers": 1, "mtp_layers_block_type": ["conv"]})
    with pytest.raises(CheckpointError, match="MTP layer pattern is empty"):
        NemotronHConfig.from_dict(base | {"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": ""})
    with pytest.raises(CheckpointError, match="num_nextn_predict_layers should be a count"):
        NemotronHConfig.from_dict(base | {"num_nextn_predict_layers": -1})


# --- the draft step ---------------------------------------------------------------------------


@torch.no_grad()
def test_full_pass_matches_transformers_blocks(checkpoint):
    reference, model = checkpoint
    ids = random_ids(17, seed=6)
    logits, hidden = model(ids, return_hidden=True)
    assert max_diff(hidden, reference.hidden(ids)) < ATOL  # the main hidden after norm_f
    assert max_diff(logits, model(ids)) == 0.0
    last, all_hidden = model(ids, last_only=True, return_hidden=True)
    assert last.shape[1] == 1 and torch.equal(all_hidden, hidden)

    mtp_logits, mtp_hidden = model.mtp_forward(hidden[:, :-1], ids[:, 1:])
    ref_logits, ref_hidden = reference.forward(reference.hidden(ids)[:, :-1], ids[:, 1:])
    assert mtp_logits.dtype == torch.float32 and mtp_logits.shape == (1, 16, 256)
    assert max_diff(mtp_logits, ref_logits) < ATOL
    assert max_diff(mtp_hidden, ref_hidden) < ATOL


@torch.no_grad()
def test_bfloat16_runs_close_to_fp32(checkpoint):
    reference, model = checkpoint
    ids = random_ids(12, seed=15)
    half = load_nemotron_h(reference.directory, torch.bfloat16, dt_clamp="none")
    _, hidden = half(ids, return_hidden=True)
    assert hidden.dtype == torch.bfloat16
    logits, mtp_hidden = half.mtp_forward(hidden[:, :-1], ids[:, 1:])
    assert logits.dtype == torch.float32 and mtp_hidden.dtype == torch.bfloat16
    expected = model.mtp_forward(model(ids, return_hidden=True)[1][:, :-1], ids[:, 1:])[0]
    assert (logits - expected).abs().mean() < 0.05


@pytest.mark.parametrize("sizes", [[19], [5, 7, 7], [1] * 19, [8, 1, 1, 9]])
@torch.no_grad()
def test_cached_passes_match_the_full_pass(checkpoint, sizes):
    _, model = checkpoint
    _, hidden, next_ids = draft_inputs(model, 19, seed=7)
    full = model.mtp_forward(hidden, next_ids)
    pool = new_pool(model)
    cached = cached_mtp(model, pool, 0, hidden, next_ids, start=0, sizes=sizes)
    for out, ref in zip(cached, full):
        assert max_diff(out, ref) < SAME


@torch.no_grad()
def test_rows_of_a_batch_match_each_row_alone(checkpoint):
    """Two rows at different MTP lengths take one draft step together, over a stale slot."""
    _, model = checkpoint
    rows = [draft_inputs(model, n, seed=20 + n) for n in (9, 14)]
    pool = new_pool(model, slots=2)
    cached_mtp(model, pool, 0, rows[1][1], rows[1][2], start=0, sizes=[14])  # stale for row 0
    for slot, (_, hidden, next_ids) in enumerate(rows):
        cached_mtp(model, pool, slot, hidden[:, :-1], next_ids[:, :-1], start=0, sizes=[hidden.shape[1] - 1])
    lens = torch.tensor([8, 13])
    pool.reserve(2, 14)
    step_hidden = torch.cat([hidden[:, -1:] for _, hidden, _ in rows])
    step_ids = torch.cat([next_ids[:, -1:] for _, _, next_ids in rows])
    logits, mtp_hidden = model.mtp_forward(step_hidden, step_ids, Batch(pool, 0, lens))
    for r, (_, hidden, next_ids) in enumerate(rows):
        full_logits, full_hidden = model.mtp_forward(hidden, next_ids)
        assert max_diff(logits[r], full_logits[0, -1:]) < SAME
        assert max_diff(mtp_hidden[r], full_hidden[0, -1:]) < SAME


@torch.no_grad()
def test_chained_draft_steps_reuse_the_layer(checkpoint):
    """Drafting two tokens after position t: step 0 reads the main hidden h[t], step 1 its own
    MTP hidden and the token step 0 drafted, at the next MTP position, through the same layer."""
    _, model = checkpoint
    _, hidden, next_ids = draft_inputs(model, 12, seed=8)
    assert (
        max_diff(model.mtp_forward(hidden, next_ids, step=1)[0], model.mtp_forward(hidden, next_ids)[0]) == 0
    )

    pool = new_pool(model)
    cached_mtp(model, pool, 0, hidden[:, :-1], next_ids[:, :-1], start=0, sizes=[11])
    logits0, mtp_hidden0 = cached_mtp(model, pool, 0, hidden[:, -1:], next_ids[:, -1:], 11, [1], step=0)
    drafted = logits0.argmax(-1)
    logits1, _ = cached_mtp(model, pool, 0, mtp_hidden0, drafted, 12, [1], step=1)

    chained_hidden = torch.cat([hidden, mtp_hidden0], dim=1)
    chained_ids = torch.cat([next_ids, drafted], dim=1)
    full_logits, _ = model.mtp_forward(chained_hidden, chained_ids)
    assert max_diff(logits0, full_logits[:, -2:-1]) < SAME
    assert max_diff(logits1, full_logits[:, -1:]) < SAME


@torch.no_grad()
def test_two_mtp_layers_take_turns(tmp_path):
    """With num_nextn_predict_layers = 2, draft step s runs layer s % 2 on its own state."""
    reference = write_mtp_checkpoint(tmp_path, "*-", seed=9, depth=2)
    model = load_nemotron_h(tmp_path, torch.float32)
    assert len(model.mtp.layers) == 4
    assert len(model.state_specs(torch.float32)) == len(model.layers) + 4
    ids = random_ids(9, seed=10)
    hidden = reference.hidden(ids)
    for step in range(3):
        for out, ref in zip(model.mtp_forward(hidden, ids, step=step), reference.forward(hidden, ids, step)):
            assert max_diff(out, ref) < ATOL
    assert max_diff(model.mtp_forward(hidden, ids, step=1)[0], model.mtp_forward(hidden, ids)[0]) > 1e-2

    # Step 1 reads and writes its own layers' state (pool layers first_state_layer + 2, + 3).
    pool = new_pool(model)
    full = model.mtp_forward(hidden, ids, step=1)
    cached = cached_mtp(model, pool, 0, hidden, ids, start=0, sizes=[4, 5], step=1)
    assert max_diff(cached[0], full[0]) < SAME
    first = model.mtp.first_state_layer
    assert pool.layers[first]["k"].abs().max() == 0 and pool.layers[first + 2]["k"].abs().max() > 0
