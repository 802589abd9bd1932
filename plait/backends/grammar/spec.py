"""The grammar a request is decoded under, as a plain wire type: no torch, no llguidance.

A `GrammarSpec` says what to constrain a generation to (Lark, regex, JSON schema or a list of
choices, plus optional per-span token budgets). Specs are plain JSON so they can travel inside
a DSPy request (`grammar_spec_from_request`), an HTTP body or a remote server's
structured-output parameters; callers that only build, send or read specs (adapters, the
server, the remote client) import this module alone. `plait.backends.grammar.constraint`
compiles a spec into the token masks the engine applies.

Token budgets (`FieldBudget`) bound free-text spans without the engine knowing about them:
after a span opens (e.g. `[[ ## reasoning ## ]]\n`), tokens are counted; once the budget is
spent the constraint waits for a boundary (a newline) for up to `grace` more tokens, then
returns the span's `close` text (e.g. `\n\n[[`) from `forced()`, followed by whatever the
grammar forces after it. The engine just sees a forced span. A budget may also hint at its end
before forcing it (`FieldBudget.hint_from`): the engine adds the constraint's `end_hint()` to
the logits, a bias toward the tokens that write the close.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from plait.errors import PlaitError

GrammarKind = Literal["lark", "regex", "json_schema", "choices"]

#: Where the grammar travels in a DSPy request: `Config.extensions["plait_grammar"]` for a
#: canonical Request, or `metadata={"plait_grammar": ...}` for an ordinary `lm(...)` call
#: (lm15 forwards `metadata` verbatim into `Config.extensions["metadata"]`).
EXTENSION_KEY = "plait_grammar"

#: JSON formatting that matches `json.dumps` (what DSPy shows the model in demos and
#: instructions), with no free whitespace: every separator becomes a forced span.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(PlaitError):
    """A grammar, regex, JSON schema or choice list that cannot be compiled."""


# ---- specs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldBudget:
    """A token budget for a free-text span that starts with `open` and ends with `close`.

    `max_tokens` tokens after `open`, the constraint waits up to `grace` tokens for one that
    contains `boundary` (so a sentence is not cut mid-line), then forces `close`. An empty
    `open` opens the span at the start of the output (a thinking budget whose `<think>` is
    already in the prompt, closed by `</think>`).

    Before `close`, the `unwind` texts are tried in order, as many as the grammar accepts (e.g.
    `"`, `]`, `}` end the open string, array, object), then `close`: a runaway number or string
    still ends, and a close that would also be text inside the open value (a JSON string) is
    written only once the value has ended.

    `scope="output"` counts `max_tokens` from the output's first token instead of from `open`:
    the span is closed by that point of the output wherever it opened (a tool call that must end
    within the request's `max_tokens`, after text or a thinking block of any length).

    `hint_from` (a fraction of `max_tokens`; 0 = off) starts an end-of-field hint: from that
    point the tokens that begin or continue `close` get a logit bias that grows linearly to
    `hint_bias` at the budget (and, once it is spent, so do the tokens that contain `boundary`,
    which end the span there too). A sampled model then tends to end the span itself, at a
    sentence of its choosing, instead of running to the budget and being cut; a span that ends
    before `hint_from` is decoded exactly as without the hint.
    """

    open: str
    max_tokens: int
    close: str
    grace: int = 0
    boundary: str = "\n"
    unwind: tuple[str, ...] = ()
    scope: Literal["span", "output"] = "span"
    hint_from: float = 0.0
    hint_bias: float = 6.0

    def __post_init__(self) -> None:
        if not self.close:
            raise GrammarError("a field budget needs a non-empty close text")
        if self.max_tokens < 0 or self.grace < 0:
            raise GrammarError("field budget token counts must be >= 0")
        if self.scope not in ("span", "output"):
            raise GrammarError(f"a field budget's scope is 'span' or 'output', not {self.scope!r}")
        if not 0 <= self.hint_from <= 1 or not self.hint_bias >= 0:  # also refuses NaN
            raise GrammarError("a field budget's hint_from is a fraction in [0, 1] and its hint_bias >= 0")

    def to_json(self) -> dict[str, Any]:
        out = {
            "open": self.open,
            "max_tokens": self.max_tokens,
            "close": self.close,
            "grace": self.grace,
            "boundary": self.boundary,
        }
        if self.unwind:
            out["unwind"] = list(self.unwind)
        if self.scope != "span":
            out["scope"] = self.scope
        if self.hint_from:
            out["hint_from"] = self.hint_from
            out["hint_bias"] = self.hint_bias
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FieldBudget:
        try:
            return cls(
                str(data["open"]),
                int(data["max_tokens"]),
                str(data["close"]),
                int(data.get("grace", 0)),
                str(data.get("boundary", "\n")),
                tuple(str(u) for u in data.get("unwind", ())),
                data.get("scope", "span"),
                float(data.get("hint_from", 0.0)),
                float(data.get("hint_bias", cls.hint_bias)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GrammarError(f"bad field budget {data!r}: {exc}") from exc


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain a generation to. Build with `lark`, `regex`, `json_schema`, `choices`.

    `source` is the Lark text or regex (str), the schema (dict), or the choices (tuple).
    """

    kind: GrammarKind
    source: Any
    budgets: tuple[FieldBudget, ...] = ()
    key: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False))

    @classmethod
    def lark(cls, text: str, budgets: Sequence[FieldBudget] = ()) -> GrammarSpec:
        return cls("lark", str(text), tuple(budgets))

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls("regex", str(pattern))

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool) -> GrammarSpec:
        if not isinstance(schema, (Mapping, bool)):
            raise GrammarError(f"a JSON schema is an object, not {type(schema).__name__}")
        return cls("json_schema", schema if isinstance(schema, bool) else dict(schema))

    @classmethod
    def choices(cls, options: Sequence[str]) -> GrammarSpec:
        options = tuple(options)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("choices must be a non-empty list of non-empty strings")
        return cls("choices", options)

    # ---- JSON form (what travels inside a request) --------------------------------------------
    def to_json(self) -> dict[str, Any]:
        source = list(self.source) if self.kind == "choices" else self.source
        out: dict[str, Any] = {"kind": self.kind, "source": source}
        if self.budgets:
            out["budgets"] = [b.to_json() for b in self.budgets]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GrammarSpec:
        kind = data.get("kind")
        budgets = tuple(FieldBudget.from_json(b) for b in data.get("budgets") or ())
        if kind == "lark":
            return cls.lark(data["source"], budgets)
        if kind == "regex":
            return cls("regex", str(data["source"]), budgets)
        if kind == "json_schema":
            return cls("json_schema", data["source"], budgets)
        if kind == "choices":
            spec = cls.choices(data["source"])
            return cls("choices", spec.source, budgets)
        raise GrammarError(f"unknown grammar kind {kind!r} (expected lark, regex, json_schema or choices)")


def lark_string(text: str) -> str:
    """A Lark string literal matching exactly `text` (JSON escapes are Lark escapes)."""
    return json.dumps(text)


def as_spec(spec: GrammarSpec | Mapping[str, Any] | Sequence[str] | str) -> GrammarSpec:
    """Coerce what a caller may pass: a `GrammarSpec`; its JSON form; a JSON schema (dict);
    choices (list of str); Lark text (str). A regex must be explicit: `GrammarSpec.regex`."""
    if isinstance(spec, GrammarSpec):
        return spec
    if isinstance(spec, str):
        return GrammarSpec.lark(spec)
    if isinstance(spec, Mapping):
        if "kind" in spec and "source" in spec:
            return GrammarSpec.from_json(spec)
        return GrammarSpec.json_schema(spec)
    if isinstance(spec, Sequence):
        return GrammarSpec.choices(spec)
    raise GrammarError(f"cannot make a grammar from {type(spec).__name__}")


def attached_grammar(request: Any) -> GrammarSpec | None:
    """The grammar attached to a `dspy.lm15.Request` by plait (what `ConstrainedAdapter`
    sends), or None: `config.extensions["plait_grammar"]`, else
    `config.extensions["metadata"]["plait_grammar"]` (where `lm(..., metadata=...)` lands)."""
    extensions = request.config.extensions or {}
    raw = extensions.get(EXTENSION_KEY)
    metadata = extensions.get("metadata")
    if raw is None and isinstance(metadata, Mapping):
        raw = metadata.get(EXTENSION_KEY)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise GrammarError(f"{EXTENSION_KEY} must be a GrammarSpec JSON object, not {type(raw).__name__}")
    return GrammarSpec.from_json(raw)


def grammar_spec_from_request(request: Any) -> GrammarSpec | None:
    """The grammar a `dspy.lm15.Request` asks for, or None: the `attached_grammar`, else its
    `config.response_format` (JSON mode: a `json_schema` or `json_object` format)."""
    spec = attached_grammar(request)
    if spec is not None:
        return spec
    fmt = request.config.response_format
    if fmt:
        if fmt.get("type") == "json_schema":
            return GrammarSpec.json_schema(fmt.get("schema") or {})
        if fmt.get("type") == "json_object":
            return GrammarSpec.json_schema({"type": "object"})
    return None


def json_rule(schema: Mapping[str, Any] | bool) -> str:
    """A Lark rule body that generates JSON following `schema` (llguidance's `%json`)."""
    return "%json " + json.dumps(schema, ensure_ascii=False)


_START = re.compile(r"^start\s*:", re.MULTILINE)


def lark_rules(spec: GrammarSpec, name: str) -> list[str]:
    """`spec` as Lark rules whose start rule is called `name`, to embed in a larger grammar
    (what follows a thinking block, the plain answer beside tool calls). Its budgets are not
    included: the caller carries `spec.budgets` over."""
    if spec.kind == "lark":
        if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", spec.source):
            raise GrammarError(f"a grammar embedded as {name!r} must not use that rule name itself")
        return [_START.sub(f"{name}:", spec.source, count=1)]
    if spec.kind == "json_schema":
        schema = spec.source if isinstance(spec.source, bool) else {**spec.source, "x-guidance": JSON_OPTIONS}
        return [f"{name}: {json_rule(schema)}"]
    if spec.kind == "regex":
        return [f"{name}: /{spec.source}/"]
    return [f"{name}: " + " | ".join(lark_string(o) for o in spec.source)]
