"""Weight-only int4 / int8 layers: exact where the weights allow it, close on real text otherwise.

The references are dense matmuls with the dequantised weights and the fp32 model; the packed
kernels are PyTorch's CPU ones, so these tests check plait's packing, scales and wiring.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from plait.backends.loading import quant
from plait.backends.loading.nemotron_h import load_nemotron_h
from plait.backends.loading.quant import Int4Linear, Int8Linear, quantize
from plait.backends.models.passes import in_prompt_pass, prompt_pass
from plait.backends.models.state import Batch
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.state_pool import StatePool
from tests.nemotron_fixtures import write_checkpoint


def _q4_1_weight(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight on a Q4_1 grid, as llama.cpp writes it: per 32-block min m and step d, every
    block using both ends of 0..15 (the block's min and max are elements). Returns (w, d)."""
    g = torch.Generator().manual_seed(seed)
    blocks = in_features // 32
    q = torch.randint(0, 16, (out_features, blocks, 32), generator=g)
    q[:, :, 0], q[:, :, 1] = 0, 15
    d = (torch.rand(out_features, blocks, 1, generator=g) * 0.02 + 0.001).bfloat16().float()
    m = (torch.randn(out_features, blocks, 1, generator=g) * 0.05).bfloat16().float()
    return (q * d + m).reshape(out_features, in_features), d


def test_int4_recovers_a_q4_1_grid_exactly():
    weight, step = _q4_1_weight(64, 128, seed=0)
    layer = Int4Linear.from_weight(weight)
    scales = layer.scales_and_zeros[..., 0].float().t().reshape(64, 4, 1)
    assert torch.equal(scales, step)  # the grid's step is found, not approximated
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected = x.float() @ weight.t()
    got = layer(x).float()
    # bf16 output rounding plus bf16 rounding of the zero points (m + 8d): ~1e-2 of |y| ~ 1
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=1e-2)


def test_int4_on_arbitrary_weights_is_within_half_a_step():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 96, generator=g)
    layer = Int4Linear.from_weight(weight, bias=torch.ones(48))
    eye = torch.eye(96).bfloat16()
    dequantised = (layer(eye).float() - 1).t()  # row j of W^T from the basis vectors
    groups = weight.reshape(48, 3, 32)
    half_step = ((groups.amax(-1) - groups.amin(-1)) / 30).repeat_interleave(32, 1)
    assert ((dequantised - weight).abs() <= half_step * 1.05 + 2e-2).all()


def test_int8_per_channel_matches_dense():
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    layer = Int8Linear.from_weight(weight, bias)
    x = torch.randn(3, 7, 64, generator=g)
    expected = F.linear(x, weight, bias)
    got = layer(x).float()
    assert got.shape == (3, 7, 40)
    torch.testing.assert_close(got, expected, atol=0.15, rtol=0.02)


def _passage(data_dir, tokenizer, length: int) -> list[int]:
    with (data_dir / "squad" / "dev.jsonl").open() as f:
        for line in f:
            ids = tokenizer.encode(json.loads(line)["context"])
            if len(ids) >= length:
                return ids[:length]
    raise AssertionError("no SQuAD passage long enough")


def _perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    nll = F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return float(nll.exp())


@pytest.mark.slow
@pytest.mark.parametrize("scheme, min_agreement, max_ppl_ratio", [("int4", 0.90, 1.03), ("int8", 0.88, 1.04)])
def test_quantised_smollm_tracks_fp32_on_real_text(smollm, data_dir, scheme, min_agreement, max_ppl_ratio):
    """On a real SQuAD passage the int4 model (the GGUF's own 4-bit grid, bf16 activations) and
    the int8 one predict what fp32 predicts; thresholds sit under the measured 96 % / 95 %
    (benchmarks/quant_accuracy.py) with room for a single passage's noise."""
    ids = _passage(data_dir, smollm.tokenizer, 160)
    reference = smollm.logits(ids)
    engine = Engine.load("smollm2-135m", quantize=scheme, prefix_cache=False)
    try:
        assert engine.model_id == ("smollm2-135m" if scheme == "int4" else f"smollm2-135m-{scheme}")
        logits = engine.logits(ids)
    finally:
        engine.close()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agreement >= min_agreement
    assert _perplexity(logits, ids) / _perplexity(reference, ids) <= max_ppl_ratio


@pytest.mark.slow
def test_int4_engine_serves_concurrent_requests():
    engine = Engine.load("smollm2-135m", quantize="int4")
    try:
        question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        assert "Paris" in engine.chat(question, max_tokens=24).text
        prompts = [f"List {n} fruits, one per line:\n" for n in range(2, 7)]
        solo = [engine.generate(p, max_tokens=12).token_ids for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: engine.generate(p, max_tokens=12).token_ids, prompts))
        assert all(len(t) == 12 for t in together)
        assert [t[0] for t in together] == [t[0] for t in solo]  # the same prefill, alone or not
        # later tokens may flip where two candidates tie to bf16 precision: compare logits instead
        model = engine.model
        ids = [engine.tokenizer.encode(p) for p in prompts]
        pool = StatePool(model.state_specs(torch.bfloat16), torch.device("cpu"), 64, None)
        pool.reserve(len(ids), 64)
        with torch.inference_mode():
            for slot, row in enumerate(ids):
                model(torch.tensor([row]), Batch(pool, slot, torch.tensor([0])))
            lens = torch.tensor([len(row) for row in ids])
            nxt = torch.tensor([[row[-1]] for row in ids])
            batched = model(nxt, Batch(pool, 0, lens))[:, -1]
            alone = torch.cat(
                [model(nxt[i : i + 1], Batch(pool, i, lens[i : i + 1]))[:, -1] for i in range(len(ids))]
            )
        assert (batched - alone).abs().max() <= 0.02 * alone.abs().max()
    finally:
        engine.close()


@pytest.mark.parametrize("scheme, max_relative_error", [("int4", 0.25), ("int8", 0.05)])
def test_hybrid_model_quantises_with_its_fp32_state_parameters_intact(tmp_path, scheme, max_relative_error):
    """A tiny Mamba/attention/MLP checkpoint with random Gaussian weights: the worst case for a
    4-bit grid (measured relative logit error vs fp32: int4 0.17, int8 0.024, bf16 0.013)."""
    write_checkpoint(tmp_path, "dense", seed=3)
    reference = load_nemotron_h(tmp_path, torch.float32)
    model = quantize(load_nemotron_h(tmp_path, torch.bfloat16), scheme, keep_dense=False)  # packed only
    mixer = next(layer.mixer for layer in model.layers if hasattr(layer.mixer, "A_log"))
    assert mixer.A_log.dtype == torch.float32  # the SSM's fp32 parameters are not cast
    kinds = {type(m) for m in model.modules()}
    assert (Int4Linear in kinds) == (scheme == "int4") and Int8Linear in kinds  # int8: head, odd shapes
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        expected, got = reference(ids)[0], model(ids)[0]
    assert ((got - expected).norm() / expected.norm()).item() <= max_relative_error


def test_unknown_scheme_and_gpu_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown quantisation 'int3'"):
        Engine.load("smollm2-135m", quantize="int3")
    with pytest.raises(ValueError, match="CPU path"):
        Engine.load("smollm2-135m", quantize="int4", device="cuda")


def test_quantize_replaces_every_linear_layer():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 48)).bfloat16()
    quantize(model, "int4", head_name="2")
    assert isinstance(model[0], Int4Linear) and isinstance(model[2], Int8Linear)
    assert model(torch.randn(2, 64).bfloat16()).shape == (2, 48)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_prompt_passes_run_the_kept_bf16_weight_and_other_passes_the_packed_one(scheme):
    """With `keep_dense`, a pass under `prompt_pass` is the bf16 matmul with the weight the
    layer was made from (bit for bit), on this thread only; any other pass, however wide,
    runs the packed kernel, as a layer without the copy does."""
    weight, bias = torch.randn(64, 96).bfloat16(), torch.randn(64).bfloat16()
    layer_type = Int4Linear if scheme == "int4" else Int8Linear
    kept = layer_type.from_weight(weight, bias, keep_dense=True)
    packed = layer_type.from_weight(weight, bias)
    assert packed.dense is None and kept.dense is not None
    x = torch.randn(1, 24, 96).bfloat16()
    with prompt_pass():
        assert torch.equal(kept(x), F.linear(x, weight, bias))
        assert torch.equal(packed(x), packed(x.clone()))  # no copy kept: packed anyway
        with ThreadPoolExecutor(1) as other_thread:
            assert torch.equal(other_thread.submit(kept, x).result(), packed(x))
    assert torch.equal(kept(x), packed(x))
    assert not torch.equal(kept(x), F.linear(x, weight, bias))  # the 4/8-bit grid differs


def test_quantize_keeps_dense_weights_only_under_the_size_limit(monkeypatch):
    def quantised() -> torch.nn.Module:
        layers = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 48))
        return quantize(layers.bfloat16(), "int4")

    assert all(layer.dense is not None for layer in quantised())
    monkeypatch.setattr(quant, "DENSE_COPY_LIMIT_BYTES", 2 * (64 * 32 + 32 * 48) - 1)  # one byte short
    assert all(layer.dense is None for layer in quantised())


@pytest.mark.slow
def test_each_precision_has_its_own_model_string():
    import plait

    lm = plait.LM("smollm2-135m", quantize="int4", cache=False, max_tokens=16, temperature=0.0)
    assert lm.model == plait.LM("smollm2-135m").model  # int4 is the embedded model's default on CPU
    assert plait.LM("smollm2-135m", dtype="fp32").model == f"{lm.model}-fp32"
    assert plait.LM("smollm2-135m", quantize="int8").model == f"{lm.model}-int8"
    question = {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
    assert "Paris" in lm(messages=[question])[0]


@pytest.mark.slow
def test_default_precision_drafts_verify_to_the_plain_tokens(data_dir):
    """At the embedded model's default precision (int4, prompts on the kept bf16 weights),
    prompt-lookup drafts verified in passes of up to 9 positions give the tokens plain decoding
    gives: generated tokens always run the same 4-bit code (the C decode pass on AVX-512 VNNI,
    else the packed kernel), whatever the width of their pass."""
    rows = [json.loads(line) for line in (data_dir / "squad" / "dev.jsonl").open()][:40:10]
    chats = [
        [{"role": "user", "content": f"{r['context'][:600]}\n\nCopy the sentence answering: {r['question']}"}]
        for r in rows
    ]
    plain = Engine.load("smollm2-135m", prefix_cache=False)
    drafting = Engine.load("smollm2-135m", prefix_cache=False, speculative="ngram", draft_tokens=8)
    drafting.scheduler.weigh_drafts = False  # draft whatever the lookup finds, however fast the machine
    try:
        assert plain.model_id == drafting.model_id == "smollm2-135m"
        assert isinstance(plain.model.lm_head, Int8Linear) and plain.model.lm_head.dense is not None
        expected = [plain.chat(c, max_tokens=32).token_ids for c in chats]
        assert [drafting.chat(c, max_tokens=32).token_ids for c in chats] == expected
        assert sum(len(t) for t in expected) > 64
        assert drafting.stats().accepted_tokens > 0
    finally:
        plain.close()
        drafting.close()


class _PassRecorder:
    """Wraps the scheduler's model: per pass, (tokens per row, whether `prompt_pass` was open)."""

    def __init__(self, model):
        self.model, self.passes = model, []

    def __call__(self, ids, batch=None, **kwargs):
        self.passes.append((ids.shape[1], in_prompt_pass()))
        return self.model(ids, batch, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.slow
def test_the_scheduler_opens_prompt_passes_for_prompt_tokens_only():
    """Every prompt token (chunks of 40, then a last one alone) is computed under
    `prompt_pass`, and no generated token is: not the drafts verified in multi-token passes."""
    engine = Engine.load("smollm2-135m", prefix_cache=False, prefill_chunk=40, speculative="ngram")
    engine.scheduler.weigh_drafts = False
    recorder = engine.scheduler.model = _PassRecorder(engine.scheduler.model)
    try:
        prompt = engine.tokenizer.encode("red green blue " * 40)[:81]
        result = engine.generate(prompt, max_tokens=24)
    finally:
        engine.close()
    prompt_passes = [tokens for tokens, prompt_open in recorder.passes if prompt_open]
    assert prompt_passes == [40, 40, 1]
    assert recorder.passes[: len(prompt_passes)] == [(t, True) for t in prompt_passes]
    assert len(result.token_ids) == 24 and any(t > 1 for t, _ in recorder.passes[3:])  # drafts verified


def test_packed_weights_are_cached_and_a_damaged_cache_is_rewritten(tmp_path, monkeypatch):
    """A second quantisation reads the packed tensors from the cache instead of packing (the
    same buffers bit for bit); a cache that cannot be read is packed and written again."""

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 48)).bfloat16()

    cache = tmp_path / "packed.safetensors"
    first = quantize(model(), "int4", head_name="1", cache=cache)
    assert cache.exists()
    monkeypatch.setattr(Int4Linear, "pack", staticmethod(lambda *a: pytest.fail("packed again")))
    monkeypatch.setattr(Int8Linear, "pack", staticmethod(lambda *a: pytest.fail("packed again")))
    second = quantize(model(), "int4", head_name="1", cache=cache)
    for a, b in zip(first.buffers(), second.buffers()):
        assert torch.equal(a, b)
    # out of the file's mapping: the packed kernels' vector loads need aligned weights
    assert all(t.data_ptr() % 64 == 0 for layer in second for t in layer.buffers())
    rows = torch.randn(8, 64).bfloat16()
    assert torch.equal(second(rows), first(rows))
    monkeypatch.undo()
    cache.write_bytes(b"not safetensors")
    third = quantize(model(), "int4", head_name="1", cache=cache)
    assert torch.equal(third[0].packed, first[0].packed) and len(cache.read_bytes()) > 100
