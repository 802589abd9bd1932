"""The end-of-field hint (`FieldBudget.hint_from`): past a fraction of a free-text span's budget,
the tokens that write the span's close get a logit bias that grows to `hint_bias` at the
budget, so a sampled model ends the span itself before the budget cuts it. Greedy text that
ends before the hint starts is untouched, and speculative verification chooses each token
from the same hinted logits as plain decoding."""

import json

import dspy
import pytest
import torch

from plait.backends.grammar.constraint import apply_masks, compile_constraint
from plait.backends.grammar.spec import FieldBudget, GrammarError, GrammarSpec
from plait.backends.runtime.engine import Engine
from plait.modules.signature_grammar import JSON_UNWIND, TEXT_CLOSE, GrammarOptions, chat_grammar
from tests.constrained_fixtures import smollm2_tokenizer

TOKENIZER = smollm2_tokenizer()
CLOSE = TEXT_CLOSE  # "\n\n[[": a blank line, then the next field's marker


def text_spec(max_tokens: int, hint_from: float, hint_bias: float = 4.0, grace: int = 4) -> GrammarSpec:
    """Free text from the first output token on (as after a chat field's marker), closed by
    `\\n\\n[[` and a fixed word."""
    text = r"/[^\s\[](?:[^\[]|\[[^\[])*\[?\n\n\[\[/"
    budget = FieldBudget("", max_tokens, CLOSE, grace=grace, hint_from=hint_from, hint_bias=hint_bias)
    return GrammarSpec.lark(f'start: TEXT " done"\nTEXT: {text}\n', [budget])


def token(text: str) -> int:
    (only,) = TOKENIZER.encode(text)
    return only


# ---- the hint itself -----------------------------------------------------------------------------


def test_bias_starts_at_the_hint_fraction_grows_and_names_the_closing_tokens():
    constraint = compile_constraint(text_spec(20, hint_from=0.5, hint_bias=4.0), TOKENIZER)
    word, newline, blank, brackets = token(" the"), token("\n"), token("\n\n"), token("[[")
    constraint.advance([token("A")])
    biases = []
    for _ in range(19):
        hint = constraint.end_hint()
        biases.append(0.0 if hint is None else hint[1])
        if hint is not None:
            assert set(hint[0].tolist()) == {newline, blank}  # the close's start, nothing else
        constraint.advance([word])
    assert biases[:9] == [0.0] * 9  # 1..9 tokens spent: before half of the budget
    assert 0 < biases[9] < biases[10] < biases[-1] < 4.0  # then it grows
    ids, bias = constraint.end_hint()  # 20 spent: the budget, waiting for a newline (grace)
    assert bias == 4.0
    assert {newline, blank, token(" \n")} <= set(ids.tolist())  # the boundary ends it now too
    assert brackets not in set(ids.tolist())

    logits = torch.zeros(1, constraint.vocab_size)
    assert not apply_masks(logits, [constraint])
    assert logits[0, blank] == 4.0 and logits[0, word] == 0.0
    assert torch.equal(torch.isinf(logits[0]), ~constraint.mask())  # the bias leaves the mask alone

    begun = compile_constraint(text_spec(20, hint_from=0.5), TOKENIZER)
    begun.advance([token("A"), *[word] * 12, blank])  # inside the hint, the close has begun
    ids = set(begun.end_hint()[0].tolist())
    assert brackets in ids and not ids & {newline, blank}  # only what finishes it now
    assert token("[") not in ids  # half of `[[` reads as text, not as a close


def test_no_hint_unless_asked_and_the_json_form_carries_it():
    constraint = compile_constraint(text_spec(4, hint_from=0.0), TOKENIZER)
    constraint.advance([token("A")] * 5)
    assert constraint.end_hint() is None

    hinted = FieldBudget("<a>", 100, "</a>", hint_from=0.75, hint_bias=3.0)
    assert FieldBudget.from_json(json.loads(json.dumps(hinted.to_json()))) == hinted
    assert "hint_from" not in FieldBudget("<a>", 100, "</a>").to_json()  # old JSON stays as it was
    for bad in ({"hint_from": 1.5}, {"hint_from": -0.1}, {"hint_bias": -1.0}):
        with pytest.raises(GrammarError, match="hint"):
            FieldBudget("<a>", 100, "</a>", **bad)


def test_grammar_options_hint_text_fields_only():
    signature = dspy.Signature("question -> reasoning: str, answer: str, score: float")
    budgets = {b.open: b for b in chat_grammar(signature).budgets}
    assert budgets["[[ ## reasoning ## ]]\n"].hint_from == GrammarOptions.hint_from > 0
    assert budgets["[[ ## answer ## ]]\n"].hint_from == GrammarOptions.hint_from
    score = budgets["[[ ## score ## ]]\n"]
    assert score.unwind == JSON_UNWIND and score.hint_from == 0  # a JSON value ends its own way
    off = chat_grammar(signature, GrammarOptions(hint_from=0.0)).budgets
    assert all(b.hint_from == 0 for b in off)


# ---- on the embedded model -----------------------------------------------------------------------

CONTEXT = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin is home to "
    "many species of plants and animals, and to many peoples who live by its rivers."
)
QUESTIONS = [
    "Why is the rainforest important?",
    "What lives in the basin?",
    "Where is the Amazon?",
    "Who lives in the rainforest?",
]
SIGNATURE = dspy.Signature("context, question -> answer")


def prompts(engine: Engine, questions: list[str]) -> list[str]:
    """ChatAdapter's prompts: the model has seen the `[[ ## field ## ]]` format it must close."""
    adapter = dspy.ChatAdapter()
    inputs = [{"context": CONTEXT, "question": q} for q in questions]
    return [engine.chat_prompt(adapter.format(SIGNATURE, [], i)) for i in inputs]


def answer_spec(text_tokens: int, hint_from: float) -> GrammarSpec:
    return chat_grammar(SIGNATURE, GrammarOptions(text_tokens=text_tokens, hint_from=hint_from))


def answer_tokens(result) -> int:
    """Tokens of the answer, up to the one that completes its close."""
    ids = result.token_ids
    return next(n for n in range(1, len(ids) + 1) if CLOSE in TOKENIZER.decode(ids[:n]))


def run(engine: Engine, spec: GrammarSpec, prompts: list[str], **sampling) -> list:
    """Submit every prompt at once (one batch); each result with its constraint's budget closes."""
    constraints = [compile_constraint(spec, engine.tokenizer, engine.info.vocab_size) for _ in prompts]
    requests = [
        engine.submit(p, constraint=c, max_tokens=120, seed=i, **sampling)
        for i, (p, c) in enumerate(zip(prompts, constraints))
    ]
    return [(r.wait(), c.budget_closes) for r, c in zip(requests, constraints)]


def test_sampled_answers_end_sooner_and_are_cut_less_with_the_hint(smollm):
    """Seeded sampled rows (temperature 0.7) with a 32-token answer budget: the model copies the
    context, two sentences that run past the budget; hinted from a quarter of it, more answers
    end after the first sentence instead of being cut, and they are shorter on average."""
    rows = prompts(smollm, QUESTIONS * 3)
    found = {}
    for hint_from in (0.0, 0.25):
        out = run(smollm, answer_spec(32, hint_from), rows, temperature=0.7)
        found[hint_from] = (sum(answer_tokens(r) for r, _ in out), sum(cut for _, cut in out))
    (plain_tokens, plain_cut), (hinted_tokens, hinted_cut) = found[0.0], found[0.25]
    assert hinted_cut <= plain_cut - len(rows) // 3, found
    assert hinted_tokens < plain_tokens, found


def test_greedy_answers_that_end_before_the_hint_are_unchanged(smollm):
    """Greedy answers that end well inside their budget decode exactly as without the hint;
    the same rows with a budget the hint reaches do not."""
    rows = prompts(smollm, QUESTIONS)
    far = run(smollm, answer_spec(200, GrammarOptions.hint_from), rows)
    assert all(cut == 0 and answer_tokens(r) < 0.5 * 200 for r, cut in far)
    assert [r.token_ids for r, _ in far] == [r.token_ids for r, _ in run(smollm, answer_spec(200, 0.0), rows)]
    near = [r.token_ids for r, _ in run(smollm, answer_spec(12, 0.25), rows)]
    assert near != [r.token_ids for r, _ in run(smollm, answer_spec(12, 0.0), rows)]


@pytest.fixture(scope="module")
def smollm_speculative():
    engine = Engine.load("smollm2-135m", dtype="fp32", speculative="ngram", draft_tokens=6)  # as `smollm`
    engine.scheduler.weigh_drafts = False  # draft whenever prompt lookup has a guess
    yield engine
    engine.close()


def test_speculative_verification_applies_the_hint_as_plain_decoding_does(smollm, smollm_speculative):
    """Prompt lookup drafts the context the model copies; every drafted position is judged on
    the hinted logits, so the kept tokens are plain decoding's, which the hint changed."""
    rows = prompts(smollm, QUESTIONS[:2])
    spec = answer_spec(12, 0.25)
    plain = [r.token_ids for r, _ in run(smollm, spec, rows)]
    unhinted = [r.token_ids for r, _ in run(smollm, answer_spec(12, 0.0), rows)]
    before = smollm_speculative.stats()
    fast = [r.token_ids for r, _ in run(smollm_speculative, spec, rows)]
    assert fast == plain != unhinted
    assert smollm_speculative.stats().since(before).accepted_tokens > 0
