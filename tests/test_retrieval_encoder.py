"""The plain-PyTorch BERT/ColBERT encoder against transformers.BertModel on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from plait.retrievers.bert import load_bert
from plait.retrievers.encoder import ColBERTEncoder, EncoderSettings, minilm_dir
from plait.retrievers.errors import EncoderLoadError
from tests.retrieval_fixtures import make_colbert_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))

TEXTS = [
    "Hello, world! This is a test.",
    "white matter development in newborns",
    "Insulin (a hormone) lowers blood glucose; diabetes.",
]


@pytest.fixture(scope="module")
def reference() -> transformers.BertModel:
    return transformers.BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def encoder() -> ColBERTEncoder:
    return ColBERTEncoder.load()


def _hf_hidden(model, ids: list[list[int]]) -> list[np.ndarray]:
    width = max(map(len, ids))
    x = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        h = model(input_ids=x, attention_mask=mask).last_hidden_state
    return [h[i, : len(row)].numpy() for i, row in enumerate(ids)]


def test_bert_hidden_states_match_transformers(reference, encoder):
    """Padded batch: our last hidden states equal transformers' on every real token (fp32)."""
    ids = [
        [encoder.cls_id] + encoder.tokenizer.encode(t, add_special_tokens=False).ids + [encoder.sep_id]
        for t in TEXTS
    ]
    expected = _hf_hidden(reference, ids)
    width = max(map(len, ids))
    x = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.inference_mode():
        ours = encoder.model(x, mask)
    for i, row in enumerate(ids):
        np.testing.assert_allclose(ours[i, : len(row)].numpy(), expected[i], atol=1e-4, rtol=1e-4)


def test_document_embeddings_are_normalised_hf_tokens_without_punctuation(reference, encoder):
    docs = encoder.encode_documents(TEXTS, batch_size=2)
    for text, got in zip(TEXTS, docs):
        ids = (
            [encoder.cls_id] + encoder.tokenizer.encode(text, add_special_tokens=False).ids + [encoder.sep_id]
        )
        hidden = _hf_hidden(reference, [ids])[0]
        keep = ~np.isin(ids, encoder.skip_ids)
        assert (keep.sum() < len(ids)) == any(c in text for c in ",.!;()")
        want = hidden[keep] / np.linalg.norm(hidden[keep], axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_query_markers_and_mask_augmentation(reference, encoder):
    """With ColBERT's settings: [CLS] [unused0] ... [SEP] [MASK]*, masks not attended to."""
    enc = encoder.with_settings(
        EncoderSettings(query_maxlen=16, query_marker="[unused0]", augment_queries=True)
    )
    ids, n_real = enc.query_ids("white matter")
    assert ids[:2] == [enc.cls_id, enc.tokenizer.token_to_id("[unused0]")]
    assert len(ids) == 16 and ids[n_real:] == [enc.mask_id] * (16 - n_real)
    q = enc.encode_queries(["white matter"])[0]
    assert q.shape == (16, 384)
    x = torch.tensor([ids])
    mask = torch.zeros_like(x)
    mask[0, :n_real] = 1
    with torch.no_grad():
        h = reference(input_ids=x, attention_mask=mask).last_hidden_state[0].numpy()
    np.testing.assert_allclose(q, h / np.linalg.norm(h, axis=1, keepdims=True), atol=1e-4)
    # Long queries are truncated to query_maxlen, never longer.
    assert enc.encode_queries(["word " * 100])[0].shape == (16, 384)


@pytest.mark.parametrize("use_bin", [False, True])
def test_colbert_checkpoint_directory_loads(tmp_path, use_bin):
    """A colbert-ai style checkpoint (bert.* + linear, artifact.metadata) gives
    normalize(BertModel(x) @ linear.T) with ColBERT's markers and query length."""
    ckpt = make_colbert_checkpoint(tmp_path / "ckpt", minilm_dir(), dim=16, use_bin=use_bin)
    enc = ColBERTEncoder.load(ckpt)
    assert enc.dim == 16 and enc.settings.query_maxlen == 12 and enc.settings.doc_marker == "[unused1]"
    assert enc.settings.augment_queries
    # Reference: transformers' BertModel with the same weights (loaded from our state dict).
    cfg = transformers.BertConfig.from_pretrained(str(ckpt))
    ref = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    if use_bin:
        state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(ckpt / "model.safetensors"))
    ref.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("bert.")}, strict=False)
    linear = state["linear.weight"].numpy()

    doc = "The Eiffel Tower, in Paris."
    got = enc.encode_documents([doc])[0]
    ids = (
        [enc.cls_id, enc.tokenizer.token_to_id("[unused1]")]
        + enc.tokenizer.encode(doc, add_special_tokens=False).ids
        + [enc.sep_id]
    )
    h = _hf_hidden(ref, [ids])[0] @ linear.T
    keep = ~np.isin(ids, enc.skip_ids)
    np.testing.assert_allclose(got, (h / np.linalg.norm(h, axis=1, keepdims=True))[keep], atol=1e-4)
    assert enc.encode_queries(["eiffel tower"])[0].shape == (12, 16)


def test_bad_checkpoint_is_a_typed_error(tmp_path):
    with pytest.raises(EncoderLoadError):
        ColBERTEncoder.load(tmp_path)  # no config.json
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(EncoderLoadError):
        load_bert(tmp_path)
