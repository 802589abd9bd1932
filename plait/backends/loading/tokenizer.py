"""Tokenizer and chat template, read from the checkpoint itself (GGUF metadata or an HF folder).

Stop tokens come from the checkpoint: the end-of-sequence token plus the chat template's
end-of-turn token, so generation ends where the model was trained to end a turn.
"""

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from plait.errors import CheckpointError

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def _raise_template_error(message: str) -> None:
    raise CheckpointError(f"chat template error: {message}")


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """`tojson` as Hugging Face renders chat templates (what the model was trained on): plain
    `json.dumps`, keys in their order, no HTML escaping (jinja's own filter sorts keys and
    writes `<` as `\\u003c`, which would change how tools and tool calls read)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool = False,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos = add_bos
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        stops = {
            t for t in (eos_token, *_END_OF_TURN) if t is not None and backend.token_to_id(t) is not None
        }
        if chat_template is not None:
            stops = {t for t in stops if t == eos_token or t in chat_template}
        self.stop_token_ids: frozenset[int] = frozenset(backend.token_to_id(t) for t in stops)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        self._template = None
        if chat_template is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.filters["tojson"] = _tojson
            self._template = env.from_string(chat_template)

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_token is not None:
            ids = [self.backend.token_to_id(self.bos_token), *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs
    ) -> str:
        """Render messages with the checkpoint's own template (a sandboxed jinja2)."""
        if self._template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + (
                "assistant: " if add_generation_prompt else ""
            )
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **template_kwargs,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as exc:  # e.g. a kwarg of the wrong type
            raise CheckpointError(f"chat template error: {type(exc).__name__}: {exc}") from None

    # ---- builders -------------------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        """Build a byte-level BPE tokenizer from GGUF `tokenizer.ggml.*` metadata."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)"
            )
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        control = [AddedToken(tok, special=True, normalized=False) for tok, t in zip(tokens, types) if t == 3]
        backend.add_special_tokens(control)

        def token(key: str) -> str | None:
            idx = fields.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[idx] if idx is not None and idx < len(tokens) else None

        return cls(
            backend,
            fields.get("tokenizer.chat_template"),
            token("bos"),
            token("eos"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer":
        """tokenizer.json + tokenizer_config.json (chat template, bos/eos) of an HF checkpoint."""
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise CheckpointError(f"{path} has no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise CheckpointError(f"cannot read {tok_file}: {exc}") from exc
        config: dict = {}
        if (path / "tokenizer_config.json").exists():
            config = json.loads((path / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        return cls(
            backend,
            template,
            token("bos_token"),
            token("eos_token"),
            add_bos=bool(config.get("add_bos_token", False)),
        )
