"""Structured-output parameters of OpenAI-style requests, read into one `GrammarSpec`.

Clients ask for constrained output in several dialects; the server accepts all of them and
decodes under the same llguidance grammar:

- OpenAI: `response_format` = `{"type": "json_schema", "json_schema": {"schema": {...}}}` or
  `{"type": "json_object"}` (`{"type": "text"}` means unconstrained);
- vLLM (before 0.10): `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark);
- vLLM (0.10 and later): `structured_outputs` = `{"json" | "regex" | "choice" | "grammar": ...}`;
- plait: `plait_grammar`, a `GrammarSpec` in its JSON form, which also carries token budgets
  for free-text spans (what `ConstrainedAdapter` sends, through plait's remote engine).

A request may use one of them; two are refused rather than silently preferring one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from plait.serve.errors import ApiError

#: Top-level request keys that carry a constraint.
STRUCTURED_KEYS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "plait_grammar",
)


def _bad(message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_structured_output")


def _schema(value: Any, where: str) -> Mapping[str, Any] | bool:
    """A JSON schema given as an object, or as a JSON string (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _bad(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, (Mapping, bool)):
        raise _bad(f"{where} must be a JSON schema object")
    return value


def _from_response_format(fmt: Any):
    from plait.backends.grammar.spec import GrammarSpec

    if not isinstance(fmt, Mapping):
        raise _bad("response_format must be an object")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return GrammarSpec.json_schema({"type": "object"})
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else fmt.get("schema")
        if schema is None:
            raise _bad("response_format json_schema needs json_schema.schema")
        return GrammarSpec.json_schema(_schema(schema, "response_format.json_schema.schema"))
    raise _bad(f"unsupported response_format type {kind!r} (text, json_object or json_schema)")


def _from_choice(choices: Any, where: str):
    from plait.backends.grammar.spec import GrammarSpec

    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise _bad(f"{where} must be a non-empty list of non-empty strings")
    return GrammarSpec.choices(choices)


def _from_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(f"{where} must be a non-empty string")
    return value


def _from_structured_outputs(options: Any):
    from plait.backends.grammar.spec import GrammarSpec

    if not isinstance(options, Mapping):
        raise _bad("structured_outputs must be an object")
    given = [
        k
        for k in ("json", "regex", "choice", "grammar", "json_object")
        if options.get(k) not in (None, False)
    ]
    if len(given) != 1:
        raise _bad("structured_outputs needs exactly one of json, regex, choice, grammar, json_object")
    key = given[0]
    value = options[key]
    if key == "json":
        return GrammarSpec.json_schema(_schema(value, "structured_outputs.json"))
    if key == "regex":
        return GrammarSpec.regex(_from_text(value, "structured_outputs.regex"))
    if key == "choice":
        return _from_choice(value, "structured_outputs.choice")
    if key == "grammar":
        return GrammarSpec.lark(_from_text(value, "structured_outputs.grammar"))
    return GrammarSpec.json_schema({"type": "object"})


def grammar_from_request(body: Mapping[str, Any]):
    """The `GrammarSpec` an OpenAI-style request body asks for, or None for free text.

    Raises `ApiError` (400) for malformed or conflicting parameters; whether the grammar
    compiles is checked when the constraint is built.
    """
    from plait.backends.grammar.spec import GrammarError, GrammarSpec

    present = [k for k in STRUCTURED_KEYS if body.get(k) is not None]
    if (
        "response_format" in present
        and isinstance(body["response_format"], Mapping)
        and body["response_format"].get("type") in (None, "text")
    ):
        present.remove("response_format")
    if not present:
        return None
    if len(present) > 1:
        raise _bad(f"conflicting structured-output parameters: {', '.join(present)} (use one)")
    key = present[0]
    value = body[key]
    try:
        if key == "response_format":
            return _from_response_format(value)
        if key == "guided_json":
            return GrammarSpec.json_schema(_schema(value, "guided_json"))
        if key == "guided_regex":
            return GrammarSpec.regex(_from_text(value, "guided_regex"))
        if key == "guided_choice":
            return _from_choice(value, "guided_choice")
        if key == "guided_grammar":
            return GrammarSpec.lark(_from_text(value, "guided_grammar"))
        if key == "structured_outputs":
            return _from_structured_outputs(value)
        if not isinstance(value, Mapping):
            raise _bad("plait_grammar must be a GrammarSpec object ({kind, source, budgets?})")
        return GrammarSpec.from_json(value)
    except GrammarError as exc:
        raise _bad(f"{key}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(f"{key}: {exc}") from None
