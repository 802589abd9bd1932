"""Tiny Nemotron checkpoints that speak the two Nemotron chat dialects, with our own templates.

The templates are written for these tests in the *formats* NVIDIA's models use (not their
text):

* `nano_v2` (NVIDIA-Nemotron-Nano-9B-v2 style): turns `<SPECIAL_10>System`, `<SPECIAL_11>User`,
  `<SPECIAL_11>Assistant`, `<SPECIAL_12>` ends a turn; `/think` or `/no_think` in a system or
  user message switches thinking (the last flag wins); the generation prompt ends with
  `<think>\n` (on) or `<think></think>` (off). Tools are listed as
  `<AVAILABLE_TOOLS>[...]</AVAILABLE_TOOLS>`, calls are `<TOOLCALL>[{"name", "arguments"}]</TOOLCALL>`
  and results go back as `<TOOL_RESPONSE>[...]</TOOL_RESPONSE>`.
* `nemotron3` (Nemotron 3 Nano/Super style, ChatML): `<|im_start|>role ... <|im_end|>`;
  template kwargs `enable_thinking` (default true) and `truncate_history_thinking` (default
  true: earlier turns' `reasoning_content` is dropped); a message's `reasoning_content` is
  rendered inside `<think>...</think>`. Tool calls are Qwen3-Coder XML
  (`<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>`),
  results `<tool_response>...</tool_response>`.

The vocabulary is the 256 byte-level tokens plus the dialect's added tokens, so any text
encodes and the markers are single tokens, as in the real tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tests.nemotron_fixtures import write_checkpoint

#: Added tokens per dialect as (text, special). Turn markers are special (never text);
#: thinking and tool tags are ordinary added tokens that decode into the output text.
ADDED_TOKENS: dict[str, list[tuple[str, bool]]] = {
    "nano_v2": [
        ("<SPECIAL_10>", True),
        ("<SPECIAL_11>", True),
        ("<SPECIAL_12>", True),
        ("<think>", False),
        ("</think>", False),
        ("<AVAILABLE_TOOLS>", False),
        ("</AVAILABLE_TOOLS>", False),
        ("<TOOLCALL>", False),
        ("</TOOLCALL>", False),
        ("<TOOL_RESPONSE>", False),
        ("</TOOL_RESPONSE>", False),
    ],
    "nemotron3": [
        ("<|im_start|>", True),
        ("<|im_end|>", True),
        ("<think>", False),
        ("</think>", False),
        ("<tool_call>", False),
        ("</tool_call>", False),
        ("<tool_response>", False),
        ("</tool_response>", False),
    ],
}

EOS_TOKEN = {"nano_v2": "<SPECIAL_12>", "nemotron3": "<|im_end|>"}

#: The model's vocabulary: 256 bytes + up to 32 added tokens.
VOCAB_SIZE = 288

NANO_V2_TEMPLATE = """\
{%- set ns = namespace(think=true) -%}
{%- for m in messages if m.role in ['system', 'user'] and m.content is string -%}
{%- set on = m.content.rfind('/think') -%}
{%- set off = m.content.rfind('/no_think') -%}
{%- if off >= 0 and off >= on -%}{%- set ns.think = false -%}
{%- elif on >= 0 -%}{%- set ns.think = true -%}{%- endif -%}
{%- endfor -%}
{%- macro clean(text) -%}{{ text | replace('/no_think', '') | replace('/think', '') | trim }}{%- endmacro -%}
{%- set system = messages[0].content if messages and messages[0].role == 'system' else '' -%}
<SPECIAL_10>System
{{ clean(system) }}
{%- if tools %}
<AVAILABLE_TOOLS>{{ tools | tojson }}</AVAILABLE_TOOLS>
{%- endif %}

{% for m in messages if m.role != 'system' -%}
{%- if m.role == 'user' -%}
<SPECIAL_11>User
{{ clean(m.content) }}
{% elif m.role == 'assistant' -%}
<SPECIAL_11>Assistant
{% if m.content %}{{ m.content }}{% endif -%}
{%- if m.tool_calls -%}
<TOOLCALL>[{% for c in m.tool_calls %}{{ {'name': c.function.name,
'arguments': c.function.arguments} | tojson }}{{ ', ' if not loop.last }}{% endfor %}]</TOOLCALL>
{%- endif -%}
<SPECIAL_12>
{% elif m.role == 'tool' -%}
<SPECIAL_11>User
<TOOL_RESPONSE>[{{ m.content }}]</TOOL_RESPONSE>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<SPECIAL_11>Assistant
{% if ns.think %}<think>
{% else %}<think></think>{% endif -%}
{%- endif -%}
"""

NEMOTRON3_TEMPLATE = """\
{%- set think = enable_thinking if enable_thinking is defined else true -%}
{%- set truncate = truncate_history_thinking if truncate_history_thinking is defined else true -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- set system = messages[0].content if messages and messages[0].role == 'system' else '' -%}
{%- if system or tools -%}
<|im_start|>system
{{ system }}
{%- if tools %}

# Tools
<tools>
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}
</tools>
Call a tool as <tool_call>
<function=NAME>
<parameter=KEY>
VALUE
</parameter>
</function>
</tool_call>
{%- endif %}<|im_end|>
{% endif -%}
{%- for m in messages if m.role != 'system' -%}
{%- if m.role == 'user' -%}
<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' -%}
<|im_start|>assistant
{% if m.reasoning_content and (not truncate or loop.index0 > ns.last_user) -%}
<think>
{{ m.reasoning_content }}
</think>
{% endif -%}
{%- if m.content %}{{ m.content }}{% endif -%}
{%- for c in m.tool_calls or [] %}
<tool_call>
<function={{ c.function.name }}>
{% for key, value in c.function.arguments.items() -%}
<parameter={{ key }}>
{{ value if value is string else value | tojson }}
</parameter>
{% endfor -%}
</function>
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if think %}<think>
{% else %}<think></think>{% endif -%}
{%- endif -%}
"""

TEMPLATES = {"nano_v2": NANO_V2_TEMPLATE, "nemotron3": NEMOTRON3_TEMPLATE}


def write_chat_tokenizer(directory: Path, dialect: str) -> None:
    """tokenizer.json (bytes + the dialect's added tokens) and tokenizer_config.json (template,
    eos) for `dialect` ("nano_v2" or "nemotron3")."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS[dialect]])
    assert tok.get_vocab_size(with_added_tokens=True) <= VOCAB_SIZE
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": EOS_TOKEN[dialect], "chat_template": TEMPLATES[dialect]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def write_chat_checkpoint(directory: Path, dialect: str, kind: str = "dense", seed: int = 3):
    """A tiny random Nemotron-H (`kind`: dense or moe) that speaks `dialect`; returns the HF model."""
    # byte-level prompts are long: a DSPy prompt is ~1,000 tokens
    model = write_checkpoint(directory, kind, seed=seed, vocab_size=VOCAB_SIZE, max_position_embeddings=4096)
    write_chat_tokenizer(directory, dialect)
    return model
