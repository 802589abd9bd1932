"""Grammar-constrained decoding: one `TokenConstraint` per request, built on llguidance.

The scheduler drives a constraint through four calls (see `TokenConstraint`):

    forced = c.forced()          # before the first sample: fold into the prompt's prefill
    c.advance(forced)
    while not c.is_finished():
        logits[~c.mask()] = -inf # or apply_masks(logits, constraints) for a whole batch
        t = sample(logits); c.advance([t])
        forced = c.forced()      # what the grammar now allows only one way
        c.advance(forced)        # appended in ONE multi-token forward pass


A grammar is described by a `GrammarSpec` (`plait.backends.grammar.spec`). Compiling is cached
per (spec, tokenizer): the first request builds llguidance's lexer and parser tables, later ones
take a cheap copy (~1 µs). Field budgets are enforced here: see `FieldBudget`; a budget's
end-of-field hint is a logit bias `apply_masks` adds beside the mask (`TokenConstraint.end_hint`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance as llg
import numpy as np
import torch

from plait.backends.grammar.spec import (
    JSON_OPTIONS,
    FieldBudget,
    GrammarError,
    GrammarSpec,
    as_spec,
    lark_string,
)
from plait.backends.grammar.vocab import TextTokenizer, Vocabulary, text_encoder, vocabulary_for
from plait.errors import PlaitError


class GrammarViolationError(PlaitError):
    """A token the grammar does not allow was fed to a constraint (an engine bug, or a
    sampler that ignored the mask)."""


def llguidance_grammar(spec: GrammarSpec) -> str:
    """The grammar in llguidance's serialized form (checked when compiled)."""
    if spec.kind == "lark":
        return llg.LLMatcher.grammar_from_lark(spec.source)
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choices":
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(lark_string(o) for o in spec.source))
    try:
        return llg.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from exc


# ---- per-tokenizer state ----------------------------------------------------------------------


class _TokenizerBridge:
    """What llguidance needs from a tokenizer: the byte vocabulary and a text encoder.

    Passed to `llguidance.TokenizerWrapper`. The encoder tokenizes forced text (markers, JSON
    keys) canonically; it refuses bytes so llguidance hands it `str`.
    """

    def __init__(self, vocab: Vocabulary, tokenizer: TextTokenizer, size: int):
        self.eos_token_id = vocab.eos_ids[0] if vocab.eos_ids else size - 1
        self.bos_token_id = vocab.bos_id
        self.tokens = list(vocab.token_bytes) + [b""] * (size - vocab.size)
        self.special_token_ids = sorted(vocab.special_ids)
        self._encoder = text_encoder(tokenizer)

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("the text encoder takes str")
        return self._encoder.encode(text, add_special_tokens=False).ids


@dataclass
class _Compiled:
    """One tokenizer as llguidance sees it, plus its cache of compiled grammars."""

    vocab: Vocabulary
    ll_tokenizer: llg.LLTokenizer
    bridge: _TokenizerBridge
    size: int
    matchers: OrderedDict[str, llg.LLMatcher] = field(default_factory=OrderedDict)
    #: the token ids an end-of-field hint biases, by what they must continue (see `_hint_ids`)
    hint_ids: dict[tuple[str, bytes], torch.Tensor] = field(default_factory=dict)


_MAX_CACHED_GRAMMARS = 256
_bridges: weakref.WeakKeyDictionary[TextTokenizer, dict[int, _Compiled]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _compiled_for(tokenizer: TextTokenizer, size: int | None) -> _Compiled:
    vocab = vocabulary_for(tokenizer)
    size = max(size or vocab.size, vocab.size)
    with _lock:
        per_size = _bridges.setdefault(tokenizer, {})
        compiled = per_size.get(size)
        if compiled is None:
            bridge = _TokenizerBridge(vocab, tokenizer, size)
            eos = list(vocab.eos_ids) or None
            ll_tok = llg.LLTokenizer(llg.TokenizerWrapper(bridge), n_vocab=size, eos_token=eos)
            compiled = per_size[size] = _Compiled(vocab, ll_tok, bridge, size)
        return compiled


def llguidance_tokenizer(tokenizer: TextTokenizer, vocab_size: int | None = None) -> llg.LLTokenizer:
    """The (cached) llguidance view of a tokenizer, with `vocab_size` ids (the logits' width)."""
    return _compiled_for(tokenizer, vocab_size).ll_tokenizer


def _template_matcher(compiled: _Compiled, spec: GrammarSpec) -> llg.LLMatcher:
    """A fresh matcher for `spec`: a copy of the cached, compiled one."""
    with _lock:
        template = compiled.matchers.get(spec.key)
        if template is not None:
            compiled.matchers.move_to_end(spec.key)
            return template.deep_copy()
    grammar = llguidance_grammar(spec)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, compiled.ll_tokenizer)
    if is_error:
        raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {messages[0].strip()}")
    template = llg.LLMatcher(compiled.ll_tokenizer, grammar, log_level=0)
    if template.is_error():
        raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {template.get_error()}")
    with _lock:
        compiled.matchers[spec.key] = template
        while len(compiled.matchers) > _MAX_CACHED_GRAMMARS:
            compiled.matchers.popitem(last=False)
    return template.deep_copy()


def compile_constraint(
    spec: GrammarSpec | Mapping[str, Any] | Sequence[str] | str,
    tokenizer: TextTokenizer,
    vocab_size: int | None = None,
    max_tokens: int | None = None,
    json_after: str | None = None,
) -> TokenConstraint:
    """A new constraint for one request. `vocab_size` is the logits' width (defaults to the
    tokenizer's); ids past the tokenizer's vocabulary are never allowed. With `max_tokens`
    (the request's limit), a JSON-schema answer gets a `JsonBudget`: it always closes within
    that many tokens. `json_after`: the grammar is a JSON document after that text (a thinking
    block's close), and the budget applies from there.

    Raises `GrammarError` for a grammar, regex, schema or choice list that does not compile.
    """
    spec = as_spec(spec)
    compiled = _compiled_for(tokenizer, vocab_size)
    budget = None
    if max_tokens is not None and (spec.kind == "json_schema" or json_after):
        budget = JsonBudget(max_tokens, after=json_after or "")
    return TokenConstraint(_template_matcher(compiled, spec), compiled, spec, budget)


@dataclass(frozen=True)
class JsonBudget:
    """Token budgets of a JSON-mode answer, so that it always parses within `max_tokens`.

    A number that runs past `number_tokens` tokens (a model can write `1111…` forever) is ended
    and a string past `string_tokens` is closed, as soon as the grammar allows; and once the
    shortest way to finish the document would no longer fit in what is left of `max_tokens`,
    the constraint forces that way: closing strings, arrays and objects, and writing the
    smallest value the schema accepts for each property it still requires.
    """

    max_tokens: int
    number_tokens: int = 24
    string_tokens: int = 256
    #: the JSON document starts after this text (e.g. a thinking block's `</think>`); "" = at once
    after: str = ""


class _JsonScanner:
    """Where a JSON output is, read byte by byte: inside a string or a number, and for how many
    tokens the current one has run."""

    def __init__(self) -> None:
        self.in_string = self.in_number = self._escape = False
        self.value_tokens = 0

    def feed(self, piece: bytes) -> None:
        started = False
        for byte in piece:
            if self.in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:  # the closing quote
                    self.in_string = False
            elif byte == 0x22:
                self.in_string, started = True, True
            elif self.in_number:
                self.in_number = byte in b"0123456789.eE+-"
            elif byte in b"-0123456789":
                self.in_number, started = True, True
        in_value = self.in_string or self.in_number
        self.value_tokens = (1 if started else self.value_tokens + 1) if in_value else 0


#: Texts that end what is open or fill a required value, the shortest first; each also with the
#: separator's space before it (forced spans stop short of a space the next token may carry).
_JSON_CLOSERS = tuple(
    text
    for closer in ('"', "}", "]", ",", "0", "null", "false", '""', "[]", "{}", "1", "true", "{", "[")
    for text in (closer, " " + closer)
)

#: The finishing path is looked for only this close to the token limit.
_JSON_HORIZON = 96

#: The document is finished its shortest way while that still leaves this many tokens of room:
#: the check runs after each token, and one token can lengthen the shortest ending by several
#: (it opens an object with required keys; seen: 2 -> 7 tokens with 3 left, which overran
#: `max_tokens` by 4 when the ending was forced only once it filled what was left).
_JSON_SLACK = 8


# ---- the constraint ---------------------------------------------------------------------------


@dataclass
class _OpenSpan:
    budget: FieldBudget
    start: int  # offset in the output where the span's content begins
    spent: int = 0  # tokens consumed inside the span
    overtime: int = 0  # tokens consumed after the budget ran out
    at_boundary: bool = False


class TokenConstraint:
    """The grammar state of one request. Not thread-safe: the scheduler thread owns it."""

    def __init__(
        self,
        matcher: llg.LLMatcher,
        compiled: _Compiled,
        spec: GrammarSpec,
        json_budget: JsonBudget | None = None,
    ):
        self._matcher = matcher
        self._compiled = compiled
        self.spec = spec
        self.vocab_size = compiled.size
        self._words = np.zeros((compiled.size + 31) // 32, dtype=np.int32)
        self._output = bytearray()
        self._scan_from = 0
        self._span: _OpenSpan | None = None
        self._closes: dict[str, list[int]] = {}
        self._longest_marker = max(
            (len(m.encode()) for b in spec.budgets for m in (b.open, b.close)), default=0
        )
        self._ending: FieldBudget | None = None  # the output-scoped budget whose span opened
        at_start = [b for b in spec.budgets if not b.open]
        if at_start:
            self._span = _OpenSpan(at_start[0], 0)
            self._ending = at_start[0] if at_start[0].scope == "output" else None
        self.budget_closes = 0  # spans that ended after their budget ran out
        self.proposed_budget_close = False  # whether the last forced() span is a budget's close
        self.json_budget = json_budget
        self._json = _JsonScanner() if json_budget is not None else None
        self._json_from: int | None = 0 if json_budget is not None and not json_budget.after else None
        self._consumed = 0  # tokens consumed so far

    # ---- the engine's four calls ------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        """bool [vocab_size]: the tokens allowed next. Stop ids only where the grammar may end."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self._check()
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def forced(self) -> list[int]:
        """Tokens the grammar now allows only one way (jump-forward), or []; side-effect free.

        When a budgeted span has run out, this is the span's close text plus what follows it;
        once an output-scoped budget is spent, the stop token too, as soon as the grammar allows
        the output to end (so nothing new starts after the budget's close).
        """
        self.proposed_budget_close = False
        if self._matcher.is_stopped():
            return []
        taken = self._budget_close() or self._json_close()
        self.proposed_budget_close = bool(taken)
        if self._ending is None:
            after = self._matcher.compute_ff_tokens()
            self._matcher.rollback(len(taken))
            return taken + after
        # an output-scoped budget: after its close and what the grammar forces, a spent budget
        # also settles the next choice (an optional part, another call) the shortest way
        out = taken
        for _ in range(_MAX_UNWIND):
            after = self._matcher.compute_ff_tokens()
            self._matcher.consume_tokens(after)
            more = self._budget_close()
            out += after + more
            if not more:
                break
        out += self._end_of_output(self._consumed + len(out))
        self._matcher.rollback(len(out))
        return out

    def advance(self, token_ids: Sequence[int]) -> None:
        """Consume sampled or forced tokens. Raises `GrammarViolationError` on a rejected one."""
        for token in token_ids:
            if not self._matcher.consume_token(int(token)):
                shown = self._compiled.ll_tokenizer.dbg_tokens([int(token)])
                raise GrammarViolationError(
                    f"token {token} {shown} is not allowed by the grammar after "
                    f"{bytes(self._output[-40:])!r}: {self._matcher.get_error()}"
                )
            self._track(int(token))

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids` the grammar would accept from here, in order (nothing is
        consumed): a speculative draft is cut where the grammar forbids it."""
        return self._matcher.validate_tokens([int(t) for t in token_ids])

    def is_finished(self) -> bool:
        """The grammar is complete (or a stop token was consumed): end the request."""
        return self._matcher.is_stopped()

    def end_hint(self) -> tuple[torch.Tensor, float] | None:
        """The end-of-field hint on the next token, or None: the ids of the tokens that end the
        open span (they write `close`, or the rest of it when the output already ends with its
        start; once the budget is spent, also those containing `boundary`) and the logit bias
        they get now, growing linearly from `FieldBudget.hint_from` of the budget to `hint_bias`
        at it. The caller adds it where the mask allows them (`apply_masks` does)."""
        span = self._span
        if span is None or not span.budget.hint_from:
            return None
        budget, spent = span.budget, self._spent(span)
        start = budget.hint_from * budget.max_tokens
        if spent < start:
            return None
        bias = budget.hint_bias * min(1.0, (spent - start + 1) / (budget.max_tokens - start + 1))
        close = budget.close
        tail = bytes(self._output[max(span.start, len(self._output) - len(close.encode())) :])
        begun = max(k for k in range(len(close)) if tail.endswith(close[:k].encode()))
        boundary = budget.boundary.encode() if spent >= budget.max_tokens else b""
        return _hint_ids(self._compiled, close[begun:], boundary), bias

    # ---- extras ---------------------------------------------------------------------------------
    def is_accepting(self) -> bool:
        """The output so far is a complete match (a stop token would be allowed now)."""
        return self._matcher.is_accepting()

    @property
    def output(self) -> bytes:
        """The bytes consumed so far (special tokens excluded)."""
        return bytes(self._output)

    def fill_bitmask_into(self, words: np.ndarray) -> None:
        """Write the next-token bitmask (int32 words, bit i of word i//32) into `words`."""
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        self._check()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarViolationError(f"the grammar reached an error state: {self._matcher.get_error()}")

    # ---- budgets --------------------------------------------------------------------------------
    def _track(self, token: int) -> None:
        """Account one consumed token for the budgeted spans."""
        self._consumed += 1
        if not self.spec.budgets and self._json is None:
            return
        vocab = self._compiled.vocab
        piece = b"" if token in vocab.special_ids or token >= vocab.size else vocab.token_bytes[token]
        self._output += piece
        if self._json is not None:
            self._feed_json(piece)
            if not self.spec.budgets:
                return
        # Only the new bytes (plus an overlap for a marker split across tokens) need scanning.
        recent = len(self._output) - len(piece) - self._longest_marker
        span = self._span
        if span is not None:
            span.spent += 1
            if self._spent(span) > span.budget.max_tokens:
                span.overtime += 1
            span.at_boundary = span.budget.boundary.encode() in piece
            at = self._output.find(span.budget.close.encode(), max(span.start, recent))
            if at == -1:
                return
            self.budget_closes += self._spent(span) > span.budget.max_tokens
            self._span, self._scan_from = None, at
        best: tuple[int, FieldBudget] | None = None
        for budget in self.spec.budgets:
            if not budget.open:
                continue
            at = self._output.find(budget.open.encode(), max(self._scan_from, recent))
            if at != -1 and (best is None or at < best[0]):
                best = (at, budget)
        if best is not None:
            start = best[0] + len(best[1].open.encode())
            self._span = _OpenSpan(best[1], start)
            self._scan_from = start
            if best[1].scope == "output":
                self._ending = best[1]

    def _feed_json(self, piece: bytes) -> None:
        """Feed the JSON scanner; before the document starts (`JsonBudget.after` not yet
        seen), look for its start instead."""
        if self._json_from is not None:
            self._json.feed(piece)
            return
        marker = self.json_budget.after.encode()
        at = self._output.find(marker, max(0, len(self._output) - len(piece) - len(marker)))
        if at != -1:
            self._json_from = at + len(marker)
            self._json.feed(bytes(self._output[self._json_from :]))

    def _spent(self, span: _OpenSpan) -> int:
        """Tokens counted against the span's budget: since it opened, or since the output
        began (`FieldBudget.scope`)."""
        return self._consumed if span.budget.scope == "output" else span.spent

    def _budget_close(self) -> list[int]:
        """When the open span's budget is spent: its close (after unwinding what must end
        first), consumed into the matcher; the caller rolls it back. [] when not due."""
        span = self._span
        if span is None or self._spent(span) < span.budget.max_tokens:
            return []
        if not span.at_boundary and span.overtime < span.budget.grace and span.spent > 0:
            return []
        budget = span.budget
        taken: list[int] = []
        # The grammar may refuse everything here (mid UTF-8 character, mid number exponent):
        # then sample on and try again after the next token.
        for _ in range(_MAX_UNWIND):
            step = next(
                (
                    t
                    for t in (self._text_tokens(x) for x in (*budget.unwind, budget.close))
                    if self._matcher.validate_tokens(t) == len(t)
                ),
                None,
            )
            if step is None:
                break
            self._matcher.consume_tokens(step)
            taken += step
            if step == self._text_tokens(budget.close):
                break
        return taken

    def _end_of_output(self, consumed: int) -> list[int]:
        """The stop token, consumed, when the output-scoped budget that opened is spent at
        `consumed` tokens and the grammar allows the output to end here; else []."""
        eos = self._compiled.vocab.eos_ids[:1]
        if consumed < self._ending.max_tokens or not eos or not self._matcher.is_accepting():
            return []
        if self._matcher.validate_tokens(eos) != 1:
            return []
        self._matcher.consume_tokens(eos)
        return list(eos)

    def _json_close(self) -> list[int]:
        """Under a `JsonBudget`: the tokens that end an overlong value, or finish the whole
        document when its shortest ending would otherwise not fit; consumed into the matcher
        (the caller rolls them back). [] when nothing is due."""
        budget, scanner = self.json_budget, self._json
        if budget is None or self._json_from is None:
            return []
        left = budget.max_tokens - self._consumed
        if left <= _JSON_HORIZON:
            ending = self._shortest_ending()
            complete = self._matcher.is_accepting() or self._matcher.is_stopped()
            if complete and len(ending) + _JSON_SLACK >= left:
                return ending
            self._matcher.rollback(len(ending))  # still room, or no way to finish found
        ends: tuple[str, ...] = ()
        if scanner.in_string and scanner.value_tokens >= budget.string_tokens:
            ends = ('"',)
        elif scanner.in_number and scanner.value_tokens >= budget.number_tokens:
            ends = ("}", "]", ",")
        tokens = self._first_accepted(ends)
        if tokens:
            self._matcher.consume_tokens(tokens)
        return tokens

    def _shortest_ending(self) -> list[int]:
        """Consume, greedily, what the grammar forces and the shortest closer it accepts, until
        the document is complete (or nothing fits: then the model samples on)."""
        taken: list[int] = []
        for _ in range(_MAX_ENDING):
            if self._matcher.is_accepting() or self._matcher.is_stopped():
                break
            step = self._matcher.compute_ff_tokens() or self._first_accepted(_JSON_CLOSERS)
            if not step:
                break
            self._matcher.consume_tokens(step)
            taken += step
        return taken

    def _first_accepted(self, texts: Sequence[str]) -> list[int]:
        """The tokens of the first of `texts` the grammar accepts here ([] when none)."""
        for text in texts:
            tokens = self._text_tokens(text)
            if self._matcher.validate_tokens(tokens) == len(tokens):
                return tokens
        return []

    def _text_tokens(self, text: str) -> list[int]:
        tokens = self._closes.get(text)
        if tokens is None:
            tokens = self._closes[text] = self._compiled.bridge(text)
        return tokens


_MAX_UNWIND = 32
_MAX_ENDING = 256


def _hint_ids(compiled: _Compiled, rest: str, boundary: bytes) -> torch.Tensor:
    """The ids of the (non-special) tokens that write `rest` (what is left of a close) whole or
    on, or a leading run of its canonical tokens (`\n`, `\n\n` of `\n\n[[`), or that contain
    `boundary` (b"": none). A piece that splits a canonical token (a lone `[` of `[[`) is left
    out: it reads as text, and the model writes on from it instead of closing. Computed once
    per tokenizer and key: a scan of the vocabulary."""
    key = (rest, boundary)
    with _lock:
        ids = compiled.hint_ids.get(key)
    if ids is not None:
        return ids
    vocab = compiled.vocab
    whole = rest.encode()
    canonical = [vocab.token_bytes[t] for t in compiled.bridge(rest)]
    runs = {b"".join(canonical[:j]) for j in range(1, len(canonical) + 1)}

    def ends(piece: bytes) -> bool:
        return piece in runs or piece.startswith(whole) or bool(boundary and boundary in piece)

    found = [i for i, b in enumerate(vocab.token_bytes) if b and i not in vocab.special_ids and ends(b)]
    ids = torch.tensor(found, dtype=torch.long)
    with _lock:
        compiled.hint_ids[key] = ids
    return ids


# ---- batches ----------------------------------------------------------------------------------

_SHIFTS = torch.arange(32, dtype=torch.int32)
_executor: llg.LLExecutor | None = None


def apply_masks(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None]) -> dict[int, PlaitError]:
    """In place: `logits[i, t] = -inf` wherever `constraints[i]` disallows token t, and each
    constraint's end-of-field hint added to the tokens it names (`TokenConstraint.end_hint`).

    Sampling and speculative verification both choose from logits prepared here, so a hinted
    row's tokens are the same either way.

    One call for a whole decode batch: the masks are computed in parallel by llguidance
    (outside the GIL) into one bitmask, expanded on the logits' device. Rows whose constraint
    is None are left alone; columns past a constraint's vocabulary are disallowed. Any other
    object with the engine's four calls (a wrapper, a test double) is masked through `mask()`.

    A constraint that fails (its grammar reached an error state) fails its own row only: the
    row allows nothing, and its error is returned by row index for the caller to report.
    """
    global _executor
    failed: dict[int, PlaitError] = {}
    vocab = logits.shape[-1]
    rows = [(i, c) for i, c in enumerate(constraints) if isinstance(c, TokenConstraint)]
    for i, c in enumerate(constraints):
        if c is not None and not isinstance(c, TokenConstraint):
            try:
                mask = c.mask().to(logits.device)[:vocab]
            except PlaitError as exc:
                failed[i] = exc
                continue
            logits[i, : mask.shape[0]] = logits[i, : mask.shape[0]].masked_fill(~mask, float("-inf"))
            logits[i, mask.shape[0] :] = float("-inf")
    if rows:
        width = max(c.vocab_size for _, c in rows)
        words = np.zeros((len(rows), (width + 31) // 32), dtype=np.int32)
        if len(rows) > 1:
            if _executor is None:
                _executor = llg.LLExecutor(num_threads=2)
            _executor.unsafe_compute_mask_ptr(
                [(c._matcher, k) for k, (_, c) in enumerate(rows)],
                words.ctypes.data,
                words.shape[1] * 4,
                words.shape[0],
            )
        for k, (i, c) in enumerate(rows):
            try:
                if len(rows) == 1:
                    c.fill_bitmask_into(words[k])
                else:
                    c._check()
            except PlaitError as exc:
                failed[i] = exc
        packed = torch.from_numpy(words).to(logits.device)
        bits = ((packed.unsqueeze(-1) >> _SHIFTS.to(logits.device)) & 1).bool().reshape(len(rows), -1)
        if bits.shape[1] < vocab:
            bits = torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]), value=False)
        index = torch.tensor([i for i, _ in rows], device=logits.device)
        logits[index] = logits[index].masked_fill(~bits[:, :vocab], float("-inf"))
        for i, c in rows:
            hint = None if i in failed else c.end_hint()
            if hint is not None:  # disallowed tokens stay at -inf
                logits[i, hint[0].to(logits.device)] += hint[1]
    for i in failed:
        logits[i] = float("-inf")
    return failed
