"""The C pass for generated tokens of an int4 Llama (`plait.backends.kernels.cpu_decode`).

Checked against a PyTorch reference of the same numerics written out below (fp64 sums over the
kernel's quantised operands), on a tiny random Llama; then for what the engine relies on: a
token's logits are bitwise the same whatever shares its pass, the model falls back to PyTorch
where the kernel cannot be built, and the packed weights are cached.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from plait.backends.kernels import cpu_decode
from plait.backends.kernels.cpu_decode import LlamaDecodeKernel
from plait.backends.loading import decode_kernel
from plait.backends.loading.decode_kernel import attach_decode_kernel
from plait.backends.loading.quant import quantize
from plait.backends.models.llama import LlamaConfig, LlamaForCausalLM
from plait.backends.models.passes import prompt_pass
from plait.backends.models.state import Batch
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.state_pool import StatePool
from plait.paths import cache_dir

CAN_BUILD = cpu_decode.cpu_supported() and cpu_decode.compiler() is not None
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="no AVX-512 VNNI CPU or no C compiler")


@needs_kernel
def test_the_kernel_builds_where_the_cpu_and_a_compiler_allow():
    """Where it can run, it must build: a failed build would quietly leave every pass on
    PyTorch (and skip nothing here, since the other tests ask the same question)."""
    assert cpu_decode.library(cache_dir("kernels")) is not None


CONFIG = LlamaConfig(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def tiny_int4_llama(tmp_path, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.2 * torch.randn_like(parameter))
    model = model.bfloat16().fuse_projections()
    quantize(model, "int4", keep_dense=True)
    assert attach_decode_kernel(model, tmp_path / "decode.safetensors")
    return model


def _quantised(x: torch.Tensor) -> torch.Tensor:
    """The kernel's activations: int8 per 32-block, scale amax / 127, round to nearest even."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = (blocks * torch.where(amax > 0, 127 / amax, 0)).round().clamp(-127, 127)
    return (q * (amax / 127)).reshape(x.shape)


def _q4_linear(x: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """W times the quantised x: sum(w s a) = d * s * sum(q a) + m * s * sum(a)."""
    n, half = packed["nibbles"].shape
    pairs = packed["nibbles"].reshape(n, half // 32, 1, 32)
    q = torch.cat([pairs & 15, pairs >> 4], dim=2).reshape(n, -1, 32).double()
    steps = (q * packed["scales"].double()[..., None]).reshape(n, 2 * half)
    quantised = _quantised(x).double()
    sums = quantised.reshape(*x.shape[:-1], -1, 32).sum(-1)
    return (quantised @ steps.t() + sums @ packed["mins"].double().t()).float()


def reference_layer(model, layer: int, x, cache_lens, keys, values) -> torch.Tensor:
    """One layer of the kernel's pass in PyTorch: x [B, T, H] -> [B, T, H]; writes K/V (bf16)."""
    tensors, cfg = model.decode_kernel.tensors, model.config
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rows, steps, _ = x.shape
    positions = cache_lens[:, None] + torch.arange(steps)

    def norm(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight

    def rotate(v):  # v [B, T, heads, hd]
        cos, sin = tensors["cos"][positions][:, :, None], tensors["sin"][positions][:, :, None]
        a, b = v[..., : hd // 2], v[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def matrix(name):
        return {part: tensors[f"{layer}.{name}.{part}"] for part in ("nibbles", "scales", "mins")}

    qkv = _q4_linear(norm(x, tensors[f"{layer}.attn_norm"]), matrix("qkv"))
    q, k, v = qkv.view(rows, steps, heads + 2 * kv_heads, hd).split([heads, kv_heads, kv_heads], 2)
    q, k = rotate(q), rotate(k)
    for r in range(rows):
        keys[r, :, positions[r]] = k[r].transpose(0, 1).bfloat16()
        values[r, :, positions[r]] = v[r].transpose(0, 1).bfloat16()
    out = torch.empty(rows, steps, heads, hd)
    for r in range(rows):
        for t in range(steps):
            end = int(positions[r, t]) + 1
            k_seen = keys[r, :, :end].float().repeat_interleave(heads // kv_heads, 0)
            v_seen = values[r, :, :end].float().repeat_interleave(heads // kv_heads, 0)
            scores = (q[r, t][:, None] * k_seen).sum(-1) / hd**0.5  # [heads, end]
            out[r, t] = (scores.softmax(-1)[..., None] * v_seen).sum(1)
    x = x + _q4_linear(out.reshape(rows, steps, -1), matrix("o"))
    gate, up = _q4_linear(norm(x, tensors[f"{layer}.mlp_norm"]), matrix("gate_up")).chunk(2, -1)
    return x + _q4_linear(F.silu(gate) * up, matrix("down"))


def reference_head(model, hidden: torch.Tensor) -> torch.Tensor:
    tensors = model.decode_kernel.tensors
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    normed = _quantised(normed * tensors["final_norm"]).double()
    q = tensors["head"].double() - 128  # stored offset, as VNNI's unsigned operand
    weight = (q.reshape(q.shape[0], -1, 32) * tensors["head_scales"].double()[..., None]).reshape(q.shape)
    return (normed @ weight.t()).float()


def _pool(model, slots: int = 3) -> StatePool:
    return StatePool(model.state_specs(torch.bfloat16), slots=slots, capacity=64, max_length=64)


def _one_layer(model, layer: int) -> LlamaDecodeKernel:
    """A kernel over one of the model's layers (its tensors under layer 0's names)."""
    kernel, prefix = model.decode_kernel, f"{layer}."
    renamed = {f"0.{name[len(prefix) :]}": t for name, t in kernel.tensors.items() if name.startswith(prefix)}
    return LlamaDecodeKernel(
        kernel.lib, dataclasses.replace(kernel.shape, layers=1), kernel.tensors | renamed
    )


def _random_cache(model, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K/V slots holding random bf16 values (what earlier tokens left there)."""
    shape = (3, CONFIG.num_key_value_heads, 64, CONFIG.head_dim)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16()


@needs_kernel
def test_each_layer_matches_the_pytorch_reference_of_its_numerics(tmp_path):
    """Rows at different cached lengths, three new tokens each (a verify pass's shape), one
    layer at a time: hidden states and the K/V written agree with the reference. (Across layers
    the two drift apart as any two fp32 orderings of a quantised model do: a 1e-6 change of a
    layer's input flips an int8 rounding somewhere. The next test checks the chaining.)"""
    model = tiny_int4_llama(tmp_path)
    ids = torch.randint(0, 96, (3, 3), generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([9, 4, 1])
    x = model.embed_tokens(ids).float()
    for layer in range(CONFIG.num_hidden_layers):
        keys, values = _random_cache(model, layer)
        expected_keys, expected_values = keys.clone(), values.clone()
        with torch.inference_mode():
            got = _one_layer(model, layer).layers(x.clone(), lens, [keys], [values], 0)
            expected = reference_layer(model, layer, x, lens, expected_keys, expected_values)
        assert (got - x).abs().max() > 1  # the layer changed its input: the bound means something
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-3)  # |x| ~ 30: an int8 flip or two
        # bf16 K/V: equal, or one rounding step apart where the fp32 sums differ in the last bit
        torch.testing.assert_close(keys.float(), expected_keys.float(), atol=0, rtol=2**-7)
        torch.testing.assert_close(values.float(), expected_values.float(), atol=0, rtol=2**-7)
        x = expected
    hidden = torch.randn(4, CONFIG.hidden_size, generator=torch.Generator().manual_seed(5)) * 10
    torch.testing.assert_close(
        model.decode_kernel.head(hidden), reference_head(model, hidden), atol=1e-4, rtol=1e-5
    )


@needs_kernel
def test_the_whole_pass_is_its_layers_one_after_another(tmp_path):
    """The model's pass (embeddings, every layer, the rows' last positions, the head) is bit for
    bit the one-layer passes chained, each layer writing its own slots of the pool."""
    model = tiny_int4_llama(tmp_path)
    ids = torch.randint(0, 96, (2, 2), generator=torch.Generator().manual_seed(6))
    lens = torch.tensor([5, 2])
    pool, g = _pool(model), torch.Generator().manual_seed(7)
    for layer in pool.layers:
        (
            layer["k"].copy_(torch.randn(layer["k"].shape, generator=g)),
            layer["v"].copy_(torch.randn(layer["v"].shape, generator=g)),
        )
    caches = [(layer["k"].clone(), layer["v"].clone()) for layer in pool.layers]
    with torch.inference_mode():
        logits = model(ids, Batch(pool, 0, lens, logit_count=2), last_only=True)
        x = model.embed_tokens(ids).float()
        for layer, (keys, values) in enumerate(caches):
            x = _one_layer(model, layer).layers(x, lens, [keys], [values], 0)
    assert torch.equal(logits, model.decode_kernel.head(x.reshape(4, -1)).view(2, 2, -1))
    for layer, (keys, values) in zip(pool.layers, caches):
        assert torch.equal(layer["k"], keys) and torch.equal(layer["v"], values)


@needs_kernel
def test_a_token_has_the_same_logits_alone_batched_or_verified(tmp_path):
    """Bit for bit: decoding token 3 alone, in a batch beside other rows, or as the last of a
    three-token verify pass gives the same logits (so speculative decoding keeps plain tokens)."""
    model = tiny_int4_llama(tmp_path)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))

    def run(pool_rows, slot, chunks):
        pool = _pool(model)
        with torch.inference_mode():
            with prompt_pass():
                model(ids[:, :5], Batch(pool, slot, torch.tensor([0])), last_only=True)
                for r in pool_rows:
                    if r != slot:
                        model(ids[:, :3], Batch(pool, r, torch.tensor([0])), last_only=True)
            out, length = None, 5
            for chunk in chunks:
                batch_ids = ids[:, length : length + chunk].repeat(len(pool_rows), 1)
                lens = torch.tensor([length if r == slot else 3 for r in pool_rows])
                out = model(batch_ids, Batch(pool, pool_rows[0], lens, logit_count=chunk), last_only=True)
                length += chunk
        return out[pool_rows.index(slot), -1]

    alone = run([0], 0, [1, 1, 1])
    assert torch.equal(run([0, 1, 2], 1, [1, 1, 1]), alone)
    assert torch.equal(run([0], 0, [3]), alone)
    assert torch.equal(run([0, 1], 0, [2, 1]), alone)


def _attention_reference(q, keys, values, cache_lens) -> torch.Tensor:
    """softmax(q K^T / sqrt(d)) V in fp64, each row's token t over keys 0 .. cache_lens + t."""
    rows, heads, steps, hd = q.shape
    group = heads // keys.shape[1]
    out = torch.empty(rows, heads, steps, hd, dtype=torch.float64)
    for r in range(rows):
        for t in range(steps):
            end = int(cache_lens[r]) + t + 1
            k = keys[r, :, :end].double().repeat_interleave(group, 0)
            v = values[r, :, :end].double().repeat_interleave(group, 0)
            scores = (k @ q[r, :, t].double()[:, :, None])[..., 0] / hd**0.5
            out[r, :, t] = (scores.softmax(-1)[:, None, :] @ v)[:, 0]
    return out


@needs_kernel
def test_prompt_attention_is_softmax_attention_summed_the_same_way_for_any_split(tmp_path):
    """The prompt passes' attention (`plait_prompt_attention`) against fp64 attention, then bit
    for bit: a token's output is the same computed with its whole prompt, as a later chunk, in
    a batch beside a longer row (padded), or one token at a time, with 1 or 2 threads."""
    kernel = tiny_int4_llama(tmp_path).decode_kernel
    g = torch.Generator().manual_seed(6)
    heads, kv_heads, hd, length = 4, 2, 32, 40
    q = torch.randn(1, heads, length, hd, generator=g)
    keys = torch.zeros(2, kv_heads, 64, hd, dtype=torch.bfloat16)
    values = torch.zeros_like(keys)
    keys[:, :, :length] = torch.randn(kv_heads, length, hd, generator=g).bfloat16()
    values[:, :, :length] = torch.randn(kv_heads, length, hd, generator=g).bfloat16()
    whole = kernel.prompt_attention(q, keys[:1], values[:1], torch.tensor([0]))
    torch.testing.assert_close(
        whole, _attention_reference(q, keys, values, torch.tensor([0])).float(), atol=1e-5, rtol=1e-5
    )
    for start in (1, 17, 33, 39):
        chunk = kernel.prompt_attention(q[:, :, start:], keys[:1], values[:1], torch.tensor([start]))
        assert torch.equal(chunk, whole[:, :, start:]), start
    padded = torch.zeros(2, heads, 30, hd)
    padded[0, :, :23], padded[1] = q[0, :, 17:], q[0, :, 10:]
    batched = kernel.prompt_attention(padded, keys, values, torch.tensor([17, 10]))
    assert torch.equal(batched[0, :, :23], whole[0, :, 17:]) and torch.equal(batched[1], whole[0, :, 10:])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(kernel.prompt_attention(q, keys[:1], values[:1], torch.tensor([0])), whole)
    finally:
        torch.set_num_threads(threads)
    in_bf16 = kernel.prompt_attention(q.bfloat16(), keys[:1], values[:1], torch.tensor([0]))
    assert in_bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="past the cache"):
        kernel.prompt_attention(q, keys[:1], values[:1], torch.tensor([30]))


@needs_kernel
def test_a_prompt_token_has_the_same_logits_however_its_prompt_is_split(tmp_path):
    """Bit for bit, a prompt's last token in bf16 prompt passes: the whole prompt in one pass,
    its prefix restored and the rest computed (the prefix cache), one token after the others,
    or in a padded batch beside a longer prompt. PyTorch's SDPA and one-row matmul gave each
    of these other last bits."""
    model = tiny_int4_llama(tmp_path)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(7))

    def last_logits(chunks, beside: bool = False) -> torch.Tensor:
        pool, length = _pool(model), 0
        with torch.inference_mode(), prompt_pass():
            if beside:  # row 0: a 36-token prompt's first chunk; row 1: ours, 10 tokens behind
                model(ids[:1, :10], Batch(pool, 1, torch.tensor([0])), last_only=True)
                model(ids[1:, :26], Batch(pool, 0, torch.tensor([0])), last_only=True)
                both = torch.stack([ids[1, 26:36], torch.cat([ids[0, 10:20], ids[0, :0]])])
                batch = Batch(pool, 0, torch.tensor([26, 10]), new_tokens=torch.tensor([10, 10]))
                return model(both, batch, last_only=True)[1, -1]
            for chunk in chunks:
                batch = Batch(pool, 0, torch.tensor([length]))
                out = model(ids[:1, length : length + chunk], batch, last_only=True)
                length += chunk
        return out[0, -1]

    whole = last_logits([20])
    assert torch.equal(last_logits([16, 4]), whole)
    assert torch.equal(last_logits([19, 1]), whole)
    assert torch.equal(last_logits([8, 8, 3, 1]), whole)
    assert torch.equal(last_logits([], beside=True), whole)


@needs_kernel
def test_packed_matrices_are_cached(tmp_path, monkeypatch):
    first = tiny_int4_llama(tmp_path)
    monkeypatch.setattr(cpu_decode, "pack_q4", lambda weight: pytest.fail("packed again"))
    monkeypatch.setattr(cpu_decode, "pack_q8", lambda weight: pytest.fail("packed again"))
    second = tiny_int4_llama(tmp_path)
    for name, tensor in first.decode_kernel.tensors.items():
        assert torch.equal(tensor, second.decode_kernel.tensors[name]), name
    monkeypatch.undo()
    (tmp_path / "decode.safetensors").write_bytes(b"damaged")
    third = tiny_int4_llama(tmp_path)
    assert torch.equal(
        third.decode_kernel.tensors["0.qkv.nibbles"], first.decode_kernel.tensors["0.qkv.nibbles"]
    )


def test_pack_q4_recovers_a_q4_1_grid():
    g = torch.Generator().manual_seed(4)
    q = torch.randint(0, 16, (8, 4, 32), generator=g)
    q[:, :, 0], q[:, :, 1] = 0, 15
    step = (torch.rand(8, 4, 1, generator=g) * 0.02 + 0.001).half().float()  # GGUF keeps d and m in fp16
    low = (torch.randn(8, 4, 1, generator=g) * 0.05).half().float()
    weight = (q * step + low).reshape(8, 128)
    packed = cpu_decode.pack_q4(weight)
    assert torch.equal(packed["scales"].float(), step[..., 0]) and torch.equal(
        packed["mins"].float(), low[..., 0]
    )
    torch.testing.assert_close(cpu_decode.unpack_q4(packed), weight, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiples of 64"):
        cpu_decode.pack_q4(torch.randn(8, 96))


def test_pack_q8_recovers_a_q8_0_grid():
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (8, 4, 32), generator=g)
    q[:, :, 0] = 127
    step = (torch.rand(8, 4, 1, generator=g) * 0.01 + 0.001).half().float()  # Q8_0's d is fp16
    packed = cpu_decode.pack_q8((q * step).reshape(8, 128))
    assert torch.equal(packed["head"].to(torch.int16) - 128, q.reshape(8, 128).to(torch.int16))
    assert torch.equal(packed["head_scales"].float(), step[..., 0])


def test_without_a_compiler_the_model_keeps_its_pytorch_path(tmp_path, monkeypatch):
    """A machine where the kernel cannot be built loads the same model, on PyTorch."""
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(decode_kernel, "cache_dir", lambda *parts: tmp_path)  # no built library
    cpu_decode.reset()
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(CONFIG).bfloat16().fuse_projections()
        torch.nn.init.normal_(model.embed_tokens.weight)
        quantize(model, "int4", keep_dense=True)
        assert not attach_decode_kernel(model, tmp_path / "decode.safetensors")
        assert model.decode_kernel is None
        pool = _pool(model)
        assert model(torch.tensor([[1, 2]]), Batch(pool, 0, torch.tensor([0])), last_only=True).shape == (
            1,
            1,
            96,
        )
    finally:
        cpu_decode.reset()


@needs_kernel
@pytest.mark.slow
def test_the_embedded_model_decodes_on_the_kernel_and_tracks_fp32(smollm, data_dir):
    """The default load runs generated tokens on the kernel; teacher-forced through it (one
    generated pass over a SQuAD passage), the int4 model predicts what fp32 predicts (measured
    in benchmarks/quant_accuracy.py; the bound leaves room for one passage's noise)."""
    with (data_dir / "squad" / "dev.jsonl").open() as f:
        text = json.loads(f.readline())["context"]
    ids = smollm.tokenizer.encode(text)[:128]
    reference = smollm.logits(ids)
    engine = Engine.load("smollm2-135m", prefix_cache=False)
    try:
        model = engine.model
        assert model.decode_kernel is not None
        pool = StatePool(model.state_specs(torch.bfloat16), slots=1, capacity=len(ids), max_length=2048)
        with torch.inference_mode():
            batch = Batch(pool, 0, torch.tensor([0]), logit_count=len(ids))
            logits = model(torch.tensor([ids]), batch, last_only=True)[0]
        result = engine.generate("The capital of France is", max_tokens=8, temperature=0)
    finally:
        engine.close()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agreement >= 0.88
    assert "Paris" in result.text


@needs_kernel
@pytest.mark.slow
def test_the_default_engine_answers_the_same_alone_batched_or_from_the_prefix_cache(data_dir):
    """The user-facing promise at the embedded model's default (int4) precision: a greedy answer
    does not depend on what else the engine runs or on what its prefix cache holds. HotPotQA
    prompts, each alone on an empty cache, all at once, and after their prompts were prefilled
    into the cache (the last tokens then run as a short pass, often of one token). Before the
    fixed-order prompt attention and the one-row matmul rule, 3 of these 8 changed."""
    rows = [json.loads(line) for line in (data_dir / "hotpotqa" / "dev.jsonl").open()][:8]
    engine = Engine.load("smollm2-135m")
    try:
        prompts = [
            engine.chat_prompt([{"role": "user", "content": _passages(row) + "\n" + row["question"]}])
            for row in rows
        ]
        settings = {"max_tokens": 32, "temperature": 0.0}
        alone = []
        for prompt in prompts:
            engine.clear_prefix_cache()
            alone.append(engine.generate(prompt, **settings).token_ids)
        engine.clear_prefix_cache()
        together = [r.wait().token_ids for r in [engine.submit(p, **settings) for p in prompts]]
        engine.clear_prefix_cache()
        for prompt in prompts:
            engine.prefill(prompt).wait()
        restored = [engine.generate(p, **settings).token_ids for p in prompts]
    finally:
        engine.close()
    assert together == alone
    assert restored == alone


def _passages(row: dict) -> str:
    return " ".join("".join(sentences) for _, sentences in row["context"][:2])[:1500]
