"""Token id -> bytes, the vocabulary as a grammar engine sees it.

A grammar constrains *bytes*; a model samples *token ids*. To compute which ids may come next,
llguidance needs the exact bytes every token contributes to the output. Tokenizer vocabularies
do not store those bytes directly:

* GPT-2 byte-level BPE stores each byte as a printable stand-in character (`Ġ` for a space,
  `Ċ` for a newline, ...), so a token string must be mapped back through that table.
* SentencePiece stores a space as `▁` and, with byte fallback, raw bytes as `<0xNN>` pieces.
* Special (control) tokens such as `<|im_end|>` are not text at all: they must never match a
  grammar's literal text, only an explicit `<|im_end|>` reference or the EOS position.

`Vocabulary` holds the result; `vocabulary_for(tokenizer)` builds it once per tokenizer.
Nothing here depends on llguidance, so the mapping is testable on its own: decoding a sequence
of ids must give exactly the concatenation of their bytes.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Literal, Protocol

from tokenizers import Tokenizer as HFTokenizer

from plait.errors import CheckpointError

VocabKind = Literal["byte_level", "sentencepiece", "plain"]


class TextTokenizer(Protocol):
    """What the grammar machinery reads from a tokenizer (`plait.backends.loading.tokenizer`'s
    `Tokenizer` is one): the `tokenizers` backend, and which ids are special or stop."""

    backend: HFTokenizer
    bos_token: str | None
    special_token_ids: frozenset[int]
    stop_token_ids: frozenset[int]


_SP_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable-characters table.

    Byte-level BPE keeps bytes that are already printable (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) as
    the character with that code point, and moves every other byte to code points 256, 257, ...
    in increasing byte order, so that no vocabulary entry contains whitespace or control
    characters. Returns character -> byte.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept = set(printable)
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()


def byte_level_token_bytes(token: str) -> bytes:
    """Bytes of one byte-level BPE token string (raises KeyError on a foreign character)."""
    return bytes(_BYTE_LEVEL[ch] for ch in token)


def sentencepiece_token_bytes(piece: str) -> bytes:
    """Bytes of one SentencePiece piece: `<0xNN>` is that raw byte, `▁` is a space."""
    m = _SP_BYTE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace(_SP_SPACE, " ").encode("utf-8")


def _decoder_types(decoder: dict | None) -> set[str]:
    """Every decoder type in a tokenizer.json `decoder` (flattening Sequence decoders)."""
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        out: set[str] = set()
        for sub in decoder.get("decoders", []):
            out |= _decoder_types(sub)
        return out
    types = {decoder["type"]}
    if decoder["type"] == "Replace" and decoder.get("pattern", {}).get("String") == _SP_SPACE:
        types.add("Metaspace")  # Llama-style decoders spell Metaspace as Replace("▁", " ")
    return types


def detect_kind(spec: dict) -> VocabKind:
    """Which byte mapping a tokenizer.json uses, read from its decoder (the authority on how
    ids become text) and, failing that, from its pre-tokenizer."""
    types = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"Metaspace", "ByteFallback"} or spec.get("model", {}).get("byte_fallback"):
        return "sentencepiece"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return "byte_level"
    if pre.get("type") == "Metaspace":
        return "sentencepiece"
    return "plain"


@dataclass(frozen=True)
class Vocabulary:
    """The bytes of every token id, plus what is not text.

    `token_bytes[i]` is what token `i` appends to the output. Special tokens keep their text
    (for debugging) but are listed in `special_ids`, and the grammar engine treats them as
    non-text. `eos_ids` are the ids that end a generation (the checkpoint's stop tokens).
    """

    token_bytes: tuple[bytes, ...]
    special_ids: frozenset[int]
    eos_ids: tuple[int, ...]
    bos_id: int | None
    kind: VocabKind

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Concatenated bytes of non-special tokens: what a grammar sees for `ids`."""
        return b"".join(self.token_bytes[i] for i in ids if i not in self.special_ids)


def build_vocabulary(tokenizer: TextTokenizer) -> Vocabulary:
    """Map every id of `tokenizer` to its bytes. Raises `CheckpointError` when a token cannot be
    mapped (a byte-level vocabulary with a character outside the byte alphabet)."""
    backend: HFTokenizer = tokenizer.backend
    spec = json.loads(backend.to_str())
    kind = detect_kind(spec)
    size = backend.get_vocab_size(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    out: list[bytes] = []
    for i in range(size):
        token = backend.id_to_token(i)
        if token is None:  # a hole in the id space: a token that can never be produced
            out.append(b"")
            continue
        if i in added:
            # Added tokens are stored as their literal text, never in the byte alphabet.
            out.append(added[i].content.encode("utf-8"))
            continue
        if kind == "byte_level":
            try:
                out.append(byte_level_token_bytes(token))
            except KeyError as exc:
                raise CheckpointError(f"token {i} ({token!r}) is not in the byte-level alphabet") from exc
        elif kind == "sentencepiece":
            out.append(sentencepiece_token_bytes(token))
        else:
            out.append(token.encode("utf-8"))
    special = frozenset(tokenizer.special_token_ids) | frozenset(i for i, tok in added.items() if tok.special)
    eos = tuple(sorted(tokenizer.stop_token_ids))
    bos = backend.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    return Vocabulary(tuple(out), special, eos, bos, kind)


def text_encoder(tokenizer: TextTokenizer) -> HFTokenizer:
    """A copy of the tokenizer that encodes *text only*, for tokenizing forced grammar bytes.

    Two things differ from encoding a prompt: special-token strings in forced text are plain
    text (a grammar literal `<|im_end|>` is not the control token), and a SentencePiece
    "dummy prefix" space must not be prepended, because forced text continues a sequence
    rather than starting one.
    """
    spec = json.loads(tokenizer.backend.to_str())

    def no_prepend(node: dict | None) -> dict | None:
        if not node:
            return node
        if node.get("type") == "Sequence":
            key = "pretokenizers" if "pretokenizers" in node else "normalizers"
            node[key] = [n for n in (no_prepend(sub) for sub in node.get(key, [])) if n is not None]
            return node
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)
        if node.get("type") == "Prepend":
            return None
        return node

    spec["normalizer"] = no_prepend(spec.get("normalizer"))
    spec["pre_tokenizer"] = no_prepend(spec.get("pre_tokenizer"))
    copy = HFTokenizer.from_str(json.dumps(spec))
    copy.encode_special_tokens = True
    return copy


_CACHE: weakref.WeakKeyDictionary[TextTokenizer, Vocabulary] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def vocabulary_for(tokenizer: TextTokenizer) -> Vocabulary:
    """The (cached) vocabulary of a tokenizer: built once, ~0.1 s for 50k tokens."""
    with _LOCK:
        vocab = _CACHE.get(tokenizer)
    if vocab is None:
        vocab = build_vocabulary(tokenizer)
        with _LOCK:
            vocab = _CACHE.setdefault(tokenizer, vocab)
    return vocab
