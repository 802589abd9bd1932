"""NVIDIA ModelOpt FP8 / NVFP4 / MIXED_PRECISION checkpoints load as they are.

Tiny checkpoints are written in ModelOpt's layout by the tests' own quantizer (modelopt_fixtures);
plait's logits must equal transformers' on the weights those files encode (dequantized, fp32) to
1e-4, and every quantized matrix must dequantize to exactly those weights. Dense and MoE models,
exclude_modules globs, per-layer and per-expert mixed formats, FP8 KV-cache scales, both places
the quantization config can live; then broken checkpoints, which must fail with a message naming
the tensor or setting at fault; then the FP4 bit layout on hand-made bytes.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from plait.backends.loading import modelopt
from plait.backends.loading.modelopt import (
    E2M1,
    QuantConfig,
    dequantize,
    dequantize_fp8,
    dequantize_nvfp4,
    e2m1_byte_table,
    read_quant_config,
    unpack_e2m1,
)
from plait.backends.loading.nemotron_h import load_nemotron_h
from plait.backends.runtime.engine import Engine
from plait.errors import CheckpointError
from tests.modelopt_fixtures import CONFIG_FILE, FP8, MIXED, NVFP4, QUANT_FILE, write_modelopt
from tests.nemotron_fixtures import random_ids
from tests.test_nemotron_engine import _byte_tokenizer

ATOL = 1e-4
BOTH = (QUANT_FILE, CONFIG_FILE)


def _attention(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")


def _mixed_dense(module: str) -> str | None:
    """Mamba projections and the head NVFP4, MLPs FP8, attention not listed (bf16)."""
    if _attention(module):
        return None
    return NVFP4 if module.endswith(("in_proj", "out_proj")) or module == "lm_head" else FP8


def _mixed_moe(module: str) -> str | None:
    """Routed experts NVFP4 except expert 0 of each layer (FP8); shared experts and Mamba FP8;
    the MLP NVFP4; attention and the head not listed (bf16)."""
    if _attention(module) or module == "lm_head":
        return None
    if ".experts." in module:
        return FP8 if ".experts.0." in module else NVFP4
    return NVFP4 if module.endswith(".mixer.up_proj") or module.endswith(".mixer.down_proj") else FP8


CASES = {
    # name: (kind, algo, formats, exclude_modules, kv scales, where the config is)
    "fp8-dense": (
        "dense",
        FP8,
        lambda m: None if m == "lm_head" or m.startswith("backbone.layers.1.") else FP8,
        ["lm_head", "*.mixer.conv1d", "backbone.layers.1.*"],
        True,
        BOTH,
    ),
    "nvfp4-dense": (
        "dense",
        NVFP4,
        lambda m: None if m == "lm_head" else NVFP4,
        ["lm_head"],
        False,
        (QUANT_FILE,),
    ),
    "fp8-moe": (
        "moe",
        FP8,
        lambda m: None if m == "lm_head" else FP8,
        ["lm_head", "*.mixer.conv1d"],
        True,
        (CONFIG_FILE,),
    ),
    "nvfp4-moe": (
        "moe",
        NVFP4,
        lambda m: None if m == "lm_head" or ".shared_experts." in m else NVFP4,
        ["lm_head", "*.shared_experts.*"],
        True,
        BOTH,
    ),
    "mixed-dense": ("dense", MIXED, _mixed_dense, ["*.mixer.conv1d"], False, BOTH),
    "mixed-moe": ("moe", MIXED, _mixed_moe, [], True, (QUANT_FILE,)),
    # weights as they were (bf16), only the KV cache calibrated: quant_algo null
    "kv-only-dense": ("dense", None, lambda m: None, [], True, BOTH),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (QuantizedCheckpoint, transformers reference model, plait model), each written
    and loaded once for the module, when first asked for."""
    from transformers import NemotronHForCausalLM

    made = {}

    def get(name: str):
        if name not in made:
            kind, algo, formats, exclude, kv_scales, files = CASES[name]
            with torch.random.fork_rng():
                written = write_modelopt(
                    tmp_path_factory.mktemp(name),
                    kind,
                    formats,
                    algo=algo,
                    exclude=exclude,
                    kv_scales=kv_scales,
                    files=files,
                    seed=11,
                )
            hf = NemotronHForCausalLM.from_pretrained(written.reference_dir, dtype=torch.float32).eval()
            made[name] = written, hf, load_nemotron_h(written.directory, torch.float32, "cpu")
        return made[name]

    return get


def _copy(checkpoints, name: str, tmp_path: Path) -> Path:
    directory = tmp_path / name
    shutil.copytree(checkpoints(name)[0].directory, directory)
    return directory


# --- against transformers --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_logits_match_transformers_on_the_dequantized_weights(checkpoints, name):
    written, hf, model = checkpoints(name)
    algo = CASES[name][1]
    assert set(written.formats.values()) == {MIXED: {FP8, NVFP4}, None: set()}.get(algo, {algo})
    ids = random_ids(21, seed=3)
    ref = hf(ids).logits
    out = model(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < ATOL


def _plait_weight(model, module: str) -> torch.Tensor:
    """A checkpoint module's weight in the loaded plait model (experts are stacked)."""
    parts = module.removeprefix("backbone.").split(".")
    if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
        at = parts.index("experts")
        stacked = model.get_parameter(".".join(parts[: at + 1] + parts[at + 2 :]))
        return stacked[int(parts[at + 1])]
    return model.get_parameter(".".join(parts) + ".weight")


@pytest.mark.parametrize(
    "name, kept",
    [
        ("fp8-dense", "backbone.layers.1.mixer.q_proj"),
        ("nvfp4-moe", "backbone.layers.1.mixer.shared_experts.up_proj"),
        ("mixed-moe", "backbone.layers.2.mixer.q_proj"),
    ],
)
def test_quantized_weights_dequantize_exactly(checkpoints, name, kept):
    written, _, model = checkpoints(name)
    for module in written.formats:
        assert torch.equal(_plait_weight(model, module), written.reference[f"{module}.weight"]), module
    assert kept not in written.formats  # an unquantized layer keeps its bf16 values
    assert torch.equal(_plait_weight(model, kept), written.reference[f"{kept}.weight"])


def test_engine_load_serves_a_modelopt_directory(checkpoints):
    written, hf, _ = checkpoints("mixed-moe")
    _byte_tokenizer(written.directory)
    engine = Engine.load(str(written.directory))
    try:
        ids = random_ids(12, seed=4)[0].tolist()
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert (engine.logits(ids) - ref).abs().max().item() < ATOL
    finally:
        engine.close()


# --- broken checkpoints ----------------------------------------------------------------------


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_unknown_quant_algo_is_refused(checkpoints, tmp_path):
    directory = _copy(checkpoints, "nvfp4-dense", tmp_path)
    _edit_json(directory / QUANT_FILE, lambda d: d["quantization"].update(quant_algo="W4A8_AWQ"))
    with pytest.raises(CheckpointError, match="hf_quant_config.json: quant_algo 'W4A8_AWQ' is not supported"):
        load_nemotron_h(directory, torch.float32)


def test_missing_weight_scale_is_named(checkpoints, tmp_path):
    directory = _copy(checkpoints, "fp8-dense", tmp_path)
    _edit_tensors(directory, lambda t: t.pop("backbone.layers.0.mixer.in_proj.weight_scale"))
    with pytest.raises(
        CheckpointError, match=r"backbone\.layers\.0\.mixer\.in_proj\.weight_scale is missing"
    ):
        load_nemotron_h(directory, torch.float32)


def test_wrong_shaped_packed_weight_is_named(checkpoints, tmp_path):
    directory = _copy(checkpoints, "nvfp4-dense", tmp_path)
    key = "backbone.layers.0.mixer.in_proj.weight"
    _edit_tensors(directory, lambda t: t.update({key: t[key][:, :31].clone()}))
    with pytest.raises(
        CheckpointError,
        match=rf"{key} is stored as U8 \[328, 31\]; .* should be U8 \[328, 32\], two e2m1 codes per byte",
    ):
        load_nemotron_h(directory, torch.float32)


def test_wrong_block_scale_shape_is_named(checkpoints, tmp_path):
    directory = _copy(checkpoints, "nvfp4-dense", tmp_path)
    key = "backbone.layers.0.mixer.out_proj.weight_scale"
    _edit_tensors(directory, lambda t: t.update({key: t[key][:, :4].clone()}))
    with pytest.raises(
        CheckpointError, match=rf"{key} is F8_E4M3 \[64, 4\]; the block scales .* are F8_E4M3 \[64, 8\]"
    ):
        load_nemotron_h(directory, torch.float32)


def test_scale_of_an_excluded_layer_is_refused(checkpoints, tmp_path):
    directory = _copy(checkpoints, "fp8-dense", tmp_path)
    _edit_tensors(
        directory, lambda t: t.update({"backbone.layers.1.mixer.q_proj.weight_scale": torch.tensor(1.0)})
    )
    with pytest.raises(
        CheckpointError,
        match=r"scales that belong to no quantized weight \(1\), e\.g\. .*q_proj\.weight_scale",
    ):
        load_nemotron_h(directory, torch.float32)


def test_quantized_weight_the_config_excludes_is_refused(checkpoints, tmp_path):
    directory = _copy(checkpoints, "fp8-dense", tmp_path)
    _edit_json(directory / QUANT_FILE, lambda d: d["quantization"]["exclude_modules"].append("*.in_proj"))
    with pytest.raises(CheckpointError, match=r"in_proj\.weight is stored as F8_E4M3, a quantized type"):
        load_nemotron_h(directory, torch.float32)


@pytest.mark.parametrize(
    "hf_quant, flat, message",
    [
        (
            {"quant_algo": "FP8", "kv_cache_quant_algo": "NVFP4"},
            None,
            "kv_cache_quant_algo NVFP4 is not supported",
        ),
        ({"quant_algo": "MIXED_PRECISION"}, None, "MIXED_PRECISION needs a non-empty quantized_layers"),
        (
            {"quant_algo": "MIXED_PRECISION", "quantized_layers": {"lm_head": {"quant_algo": "W4A16_AWQ"}}},
            None,
            r"quantized_layers\['lm_head'\] .* plait reads FP8 and NVFP4 layers",
        ),
        ({"quant_algo": "NVFP4", "group_size": 32}, None, "NVFP4 group_size 32 is not supported"),
        ({"quant_algo": "FP8", "exclude_modules": "lm_head"}, None, "exclude_modules should be a list"),
        (None, {"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'; plait reads unquantized"),
        (
            {"quant_algo": "FP8"},
            {"quant_method": "modelopt", "quant_algo": "NVFP4"},
            "hf_quant_config.json says quant_algo FP8, config.json quantization_config says NVFP4",
        ),
    ],
)
def test_bad_quantization_configs_are_refused(tmp_path, hf_quant, flat, message):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({} if flat is None else {"quantization_config": flat}))
    if hf_quant is not None:
        (tmp_path / QUANT_FILE).write_text(json.dumps({"quantization": hf_quant}))
    with pytest.raises(CheckpointError, match=message):
        read_quant_config(tmp_path)


def test_quantization_configs_are_read_from_either_file(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_type": "nemotron_h"}))
    assert read_quant_config(tmp_path) is None
    flat = {"quant_method": "modelopt", "quant_algo": "fp8", "ignore": ["lm_head"], "kv_cache_scheme": "FP8"}
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"quantization_config": flat}))
    assert read_quant_config(tmp_path) == QuantConfig(
        FP8, f"{tmp_path / CONFIG_FILE} quantization_config", ("lm_head",), {}, FP8
    )


def test_exclude_modules_win_over_the_per_layer_map():
    config = QuantConfig(
        MIXED,
        "test",
        exclude=("lm_head", "*.mixer.conv1d", "backbone.layers.1*"),
        layers={"backbone.layers.0.mixer.in_proj": NVFP4, "backbone.layers.1.mixer.q_proj": FP8},
    )
    assert config.scheme("backbone.layers.0.mixer.in_proj") == NVFP4
    assert config.scheme("backbone.layers.1.mixer.q_proj") is None  # excluded by the glob
    assert config.scheme("backbone.layers.0.mixer.out_proj") is None  # not listed
    flat = QuantConfig(FP8, "test", exclude=("backbone.layers.1*",))
    assert flat.scheme("backbone.layers.10.mixer.in_proj") is None  # a prefix glob, as ModelOpt writes them
    assert flat.scheme("backbone.layers.2.mixer.in_proj") == FP8


# --- the formats themselves ------------------------------------------------------------------


def test_e2m1_table_and_nibble_order():
    assert E2M1 == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    table = e2m1_byte_table()
    for code, magnitude in enumerate([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]):
        assert table[code].tolist() == [magnitude, 0.0]  # low nibble first, high nibble 0
        assert table[code | 0x8].tolist() == [-magnitude, 0.0]  # bit 3 is the sign
        assert table[code << 4].tolist() == [0.0, magnitude]
    # 0x21: even element 1 (0.5), odd element 2 (1.0); 0xF8: -0, -6; 0x7A: -1, 6; 0x5B: -1.5, 3
    values = unpack_e2m1(torch.tensor([[0x21, 0xF8], [0x7A, 0x5B]], dtype=torch.uint8))
    assert values.tolist() == [[0.5, 1.0, -0.0, -6.0], [-1.0, 6.0, -1.5, 3.0]]
    assert torch.signbit(values[0, 2])


def test_nvfp4_dequantization_on_hand_made_bytes():
    # one row of 32 elements: group 0 all code 3 (1.5), group 1 all code 0xE (-4)
    packed = torch.tensor([[0x33] * 8 + [0xEE] * 8], dtype=torch.uint8)
    block_scale = torch.tensor([[2.0, 0.5]]).to(torch.float8_e4m3fn)
    w = dequantize_nvfp4(packed, block_scale, torch.tensor(0.25), torch.float32)
    assert w.shape == (1, 32)
    assert w[0, :16].tolist() == [1.5 * 2.0 * 0.25] * 16
    assert w[0, 16:].tolist() == [-4 * 0.5 * 0.25] * 16


def test_fp8_dequantization():
    weight = torch.tensor([[1.5, -2.0], [448.0, 0.0]]).to(torch.float8_e4m3fn)
    w = dequantize_fp8(weight, torch.tensor(0.5), torch.bfloat16)
    assert w.dtype == torch.bfloat16 and w.float().tolist() == [[0.75, -1.0], [224.0, 0.0]]


def test_dequantization_in_row_blocks_equals_the_whole_formula(monkeypatch):
    monkeypatch.setattr(modelopt, "CHUNK_ELEMENTS", 64)  # 2 rows of 32 at a time, 5 blocks
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (9, 16), dtype=torch.uint8, generator=g)
    block_scale = torch.rand(9, 2, generator=g).to(torch.float8_e4m3fn)
    scales = {
        "weight_scale": block_scale,
        "weight_scale_2": torch.tensor(0.3),
        "input_scale": torch.tensor(1.0),
    }
    whole = dequantize_nvfp4(packed, block_scale, torch.tensor(0.3), torch.bfloat16)
    assert torch.equal(dequantize(NVFP4, packed, scales, torch.bfloat16), whole)
    fp8 = torch.randn(9, 32, generator=g).to(torch.float8_e4m3fn)
    whole = dequantize_fp8(fp8, torch.tensor(0.7), torch.float32)
    assert torch.equal(dequantize(FP8, fp8, {"weight_scale": torch.tensor(0.7)}, torch.float32), whole)
