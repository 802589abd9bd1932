"""Token id -> bytes: GPT-2 byte-level BPE (the embedded SmolLM2) and SentencePiece with byte
fallback. Decoding ids must give exactly the concatenation of their bytes."""

from __future__ import annotations

import string

import llguidance as llg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from plait.backends.grammar.constraint import compile_constraint, llguidance_tokenizer
from plait.backends.grammar.spec import GrammarSpec
from plait.backends.grammar.vocab import _byte_level_alphabet, build_vocabulary, text_encoder, vocabulary_for
from plait.backends.loading.tokenizer import Tokenizer
from tests.constrained_fixtures import smollm2_tokenizer

GPT2 = smollm2_tokenizer()
TEXTS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


def test_byte_level_alphabet_is_a_bijection_on_bytes():
    table = _byte_level_alphabet()
    assert sorted(table.values()) == list(range(256)) and len(table) == 256
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")


def test_gpt2_vocabulary_kind_and_special_tokens():
    vocab = vocabulary_for(GPT2)
    assert vocab.kind == "byte_level" and vocab.size == GPT2.vocab_size == 49152
    assert vocab.eos_ids == (2,) and {0, 1, 2} <= vocab.special_ids
    assert vocab.token_bytes[198] == b"\n" and vocab.decode_bytes([2]) == b""


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=TEXTS)
def test_gpt2_decode_equals_concatenated_token_bytes(text):
    ids = GPT2.encode(text)
    got = vocabulary_for(GPT2).decode_bytes(ids)
    assert got.decode("utf-8", errors="replace") == GPT2.decode(ids)
    # SmolLM2 has no token for a few bytes (e.g. 0xF1, 0xF2: U+40000..U+BFFFF); any text made
    # of the others round-trips byte for byte
    if GPT2.decode(ids) == text:
        assert got == text.encode("utf-8")


def test_gpt2_bytes_agree_with_llguidances_own_reading_of_tokenizer_json():
    vocab = vocabulary_for(GPT2)
    reference = llg.LLTokenizer(GPT2.backend.to_str(), eos_token=2)
    mismatched = [
        i
        for i in range(vocab.size)
        if i not in vocab.special_ids and reference.decode_bytes([i]) != vocab.token_bytes[i]
    ]
    assert mismatched == []


def test_special_tokens_are_not_text():
    # the text "<|im_end|>" never matches the control token, and a grammar can name it
    literal = compile_constraint(GrammarSpec.lark('start: "<|im_end|>"'), GPT2)
    assert not literal.mask()[2]
    named = compile_constraint(GrammarSpec.lark("start: <|im_end|>"), GPT2)
    assert named.mask()[2] and named.mask().sum() == 1
    assert llguidance_tokenizer(GPT2).is_special_token(2)


# ---- SentencePiece (Llama-style: "▁" for spaces, <0xNN> byte fallback) ------------------------


def sentencepiece_tokenizer() -> Tokenizer:
    pieces = [
        "<unk>",
        "<s>",
        "</s>",
        *(f"<0x{b:02X}>" for b in range(256)),
        "▁",
        *string.ascii_lowercase,
        "▁t",
        "▁th",
        "▁the",
        "he",
        "ll",
        "llo",
        "▁he",
        "▁hello",
        "é",
    ]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [
        ("▁", "t"),
        ("▁t", "h"),
        ("▁th", "e"),
        ("h", "e"),
        ("l", "l"),
        ("ll", "o"),
        ("▁", "he"),
        ("▁he", "llo"),
    ]
    backend = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, None, "<s>", "</s>")


SP = sentencepiece_tokenizer()


def test_sentencepiece_kind_and_pieces():
    vocab = build_vocabulary(SP)
    assert vocab.kind == "sentencepiece" and vocab.eos_ids == (2,) and vocab.bos_id == 1
    assert (
        vocab.token_bytes[3 + 0x0A] == b"\n" and vocab.token_bytes[SP.backend.token_to_id("▁the")] == b" the"
    )
    assert {1, 2} <= vocab.special_ids


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=TEXTS)
def test_sentencepiece_decode_equals_concatenated_token_bytes(text):
    ids = SP.encode(text)
    vocab = build_vocabulary(SP)
    # the dummy prefix "▁" is one leading space, which the decoder strips again
    assert vocab.decode_bytes(ids) == (b" " + text.encode("utf-8") if text else b"")
    assert SP.decode(ids).encode("utf-8") == text.encode("utf-8")


def test_sentencepiece_forced_text_gets_no_dummy_prefix():
    encoder = text_encoder(SP)
    vocab = build_vocabulary(SP)
    assert vocab.decode_bytes(encoder.encode("hello the", add_special_tokens=False).ids) == b"hello the"


def test_sentencepiece_constraint_round_trip():
    constraint = compile_constraint(["hello", "the é"], SP)
    forced = constraint.forced()
    assert forced == [] and constraint.mask()[SP.backend.token_to_id("h")]
    constraint.advance(text_encoder(SP).encode("the é", add_special_tokens=False).ids)
    assert constraint.is_finished()


@pytest.mark.parametrize(
    "decoder, kind",
    [
        ({"type": "ByteLevel"}, "byte_level"),
        ({"type": "Metaspace", "replacement": "▁"}, "sentencepiece"),
        (
            {
                "type": "Sequence",
                "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"},
                ],
            },
            "sentencepiece",
        ),
        ({"type": "WordPiece"}, "plain"),
    ],
)
def test_kind_detection(decoder, kind):
    from plait.backends.grammar.vocab import detect_kind

    assert detect_kind({"decoder": decoder, "model": {}}) == kind
