"""SmolLM2 from its GGUF file: plait's model against transformers' GGUF loading of the same file."""

import pytest
import torch

PROMPT = [{"role": "user", "content": "Name three primary colors and explain why they are primary."}]


@pytest.fixture(scope="module")
def reference(smollm_gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm_gguf_path
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tokenizer, model.eval()


def test_tokenizer_and_chat_template_match_transformers(smollm, reference):
    hf_tok, _ = reference
    text = smollm.chat_prompt(PROMPT)
    assert text == hf_tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    for sample in [text, "Hello world 12345", "  spaces\tand\nnewlines ünïcödé 🙂", "<|im_start|>user"]:
        assert smollm.tokenizer.encode(sample) == hf_tok.encode(sample, add_special_tokens=False)
    ids = smollm.tokenizer.encode(text)
    assert smollm.tokenizer.decode(ids, skip_special=False) == hf_tok.decode(ids)
    assert smollm.tokenizer.stop_token_ids == {hf_tok.eos_token_id}


def test_logits_match_transformers(smollm, reference):
    _hf_tok, hf_model = reference
    ids = smollm.tokenizer.encode(smollm.chat_prompt(PROMPT))
    ours = smollm.logits(ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_generation_matches_transformers(smollm, reference):
    _hf_tok, hf_model = reference
    ids = smollm.tokenizer.encode(smollm.chat_prompt(PROMPT))
    ours = smollm.generate(ids, max_tokens=24).token_ids
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    theirs = [t for t in out[0, len(ids) :].tolist() if t not in smollm.tokenizer.stop_token_ids]
    assert ours == theirs


def test_a_cached_load_reads_no_gguf_metadata(smollm, smollm_gguf_path, monkeypatch):
    """The config and tokenizer come from the JSON cache written by the first load (the smollm
    fixture's), equal to a parse of the file; a damaged cache is read from the file again."""
    import gguf

    from plait.backends.loading import gguf as loader

    cached = next(loader.cache_dir("gguf").glob(f"{smollm_gguf_path.stem}-*.json"))
    from_file = loader._fields(loader._read(smollm_gguf_path))

    def no_parse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed")

    monkeypatch.setattr(gguf, "GGUFReader", no_parse)
    model, tokenizer = loader.load_gguf(smollm_gguf_path)
    assert tokenizer.encode("Hello, plait!") == smollm.tokenizer.encode("Hello, plait!")
    fields, _, reader = loader._metadata(smollm_gguf_path, cached)
    assert reader is None
    assert fields["tokenizer.ggml.tokens"] == from_file["tokenizer.ggml.tokens"]
    assert model.config == smollm.model.config
    monkeypatch.undo()
    text = cached.read_text()
    try:
        cached.write_text(text[: len(text) // 2])  # cut short: not JSON
        fields, names, _ = loader._metadata(smollm_gguf_path, cached)
        assert fields["tokenizer.ggml.tokens"] == from_file["tokenizer.ggml.tokens"] and names
        assert cached.read_text() == text  # written again
    finally:
        cached.write_text(text)
