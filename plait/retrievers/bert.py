"""A small BERT encoder in plain PyTorch (embeddings, N post-LN encoder layers, GELU).

Why not `transformers.BertModel`: transformers is a test-only dependency of plait, and the
retrieval stack only needs the encoder's last hidden states. This module reads a Hugging Face
`config.json` and a state dict (safetensors or a torch `pytorch_model.bin`) whose keys follow
BERT's names, optionally prefixed with `bert.` as colbert-ai checkpoints write them.
Tests compare its outputs with `transformers.BertModel` on the same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plait.retrievers.errors import EncoderLoadError


@dataclass(frozen=True)
class BertConfig:
    """The subset of a Hugging Face BERT `config.json` that determines the forward pass."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise EncoderLoadError(f"cannot read encoder config {path}: {exc}") from exc
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise EncoderLoadError(
                f"{path}: position_embedding_type={raw['position_embedding_type']!r} is not supported "
                "(only absolute position embeddings)"
            )
        if raw.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise EncoderLoadError(f"{path}: hidden_act={raw['hidden_act']!r} is not supported")
        try:
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=str(raw.get("hidden_act", "gelu")),
                pad_token_id=int(raw.get("pad_token_id") or 0),
            )
        except KeyError as exc:
            raise EncoderLoadError(f"{path}: missing BERT config field {exc}") from exc


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# BERT's "gelu" is the exact erf form; "gelu_new" / "gelu_pytorch_tanh" the tanh approximation.
_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu}


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment inputs: token type 0 everywhere, as ColBERT and sentence-transformers use.
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(x)


class Packing:
    """Which positions of a padded (batch, seq) input hold tokens, for running a batch packed.

    Every layer but attention works token by token, so it runs on the tokens alone, (tokens,
    hidden), not on the padding around them: a batch of SciFact queries is ~30% padding.
    Attention alone sees the padded layout, for one fused kernel over the whole batch."""

    def __init__(self, present: torch.Tensor):
        self.batch, self.seq = present.shape
        self.index = present.flatten().nonzero().squeeze(1)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (tokens, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (batch, seq, ...), zeros where no token is."""
        out = x.new_zeros((self.batch * self.seq, *x.shape[1:]))
        return out.index_copy_(0, self.index, x).view(self.batch, self.seq, *x.shape[1:])


class BertLayer(nn.Module):
    """One post-LayerNorm transformer layer; attribute names mirror BERT's checkpoint keys."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(h, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, packing: Packing) -> torch.Tensor:
        """`x`: (tokens, hidden), packed by `packing`; `key_mask`: (batch, 1, 1, seq)."""

        def heads(t: torch.Tensor) -> torch.Tensor:  # (tokens, hidden) -> (batch, heads, seq, head_dim)
            shape = (packing.batch, packing.seq, self.num_heads, self.head_dim)
            return packing.unpack(t).view(shape).transpose(1, 2)

        attn = F.scaled_dot_product_attention(
            heads(self.query(x)),
            heads(self.key(x)),
            heads(self.value(x)),
            attn_mask=key_mask,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        attn = packing.pack(attn.transpose(1, 2)).flatten(1)
        x = self.attn_norm(x + self.attn_out(attn))
        return self.out_norm(x + self.output(self.act(self.intermediate(x))))


class BertModel(nn.Module):
    """Returns the last hidden states, shape (batch, seq, hidden); no pooler."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`attention_mask` (batch, seq): the keys attended to; `present`: the positions that
        hold a token (default: the attended ones; ColBERT's query [MASK]s are present but not
        attended). Positions without a token come out as zeros."""
        packing = Packing(attention_mask.bool() if present is None else present)
        # (batch, 1, 1, seq) boolean: which keys each position may attend to.
        key_mask = attention_mask.bool()[:, None, None, :]
        x = packing.pack(self.embeddings(input_ids))
        for layer in self.layers:
            x = layer(x, key_mask, packing)
        return packing.unpack(x)


# Checkpoint key (after the optional "bert." prefix) -> our parameter name, per layer.
_LAYER_KEYS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "out_norm",
}


def map_bert_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict to this module's parameter names.

    Keys outside the encoder (pooler, position_ids buffers, a ColBERT `linear`) are dropped;
    the caller picks those up itself.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")  # very old checkpoints
        if key.startswith("embeddings.") and not key.endswith("position_ids"):
            out[key] = value
        elif key.startswith("encoder.layer."):
            rest = key[len("encoder.layer.") :]
            index, _, name = rest.partition(".")
            module, _, param = name.rpartition(".")
            if module in _LAYER_KEYS:
                out[f"layers.{index}.{_LAYER_KEYS[module]}.{param}"] = value
    return out


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read model.safetensors if present, else pytorch_model.bin (with `weights_only=True`)."""
    safetensors_path = directory / "model.safetensors"
    bin_path = directory / "pytorch_model.bin"
    if safetensors_path.exists():
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path))
        except Exception as exc:  # safetensors raises its own error types
            raise EncoderLoadError(f"cannot read {safetensors_path}: {exc}") from exc
    if bin_path.exists():
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EncoderLoadError(f"cannot read {bin_path}: {exc}") from exc
    raise EncoderLoadError(f"{directory}: no model.safetensors or pytorch_model.bin")


def load_bert(directory: Path, state: dict[str, torch.Tensor] | None = None) -> BertModel:
    """Build a `BertModel` from a checkpoint directory; every encoder weight must be present."""
    directory = Path(directory)
    cfg = BertConfig.from_file(directory / "config.json")
    state = load_state_dict(directory) if state is None else state
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""
    mapped = map_bert_state_dict(state, prefix)
    model = BertModel(cfg)
    expected = set(model.state_dict())
    missing = sorted(expected - set(mapped))
    if missing:
        raise EncoderLoadError(
            f"{directory}: checkpoint lacks {len(missing)} BERT weights (first: {missing[0]}); "
            "is this a BERT-family checkpoint?"
        )
    try:
        model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
    except RuntimeError as exc:
        raise EncoderLoadError(f"{directory}: weights do not match config.json: {exc}") from exc
    return model.eval()
