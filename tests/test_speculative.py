"""Speculative decoding is exact: the same tokens as plain decoding, on SmolLM2 and on the tiny
hybrids (dense, MoE, LatentMoE), with the prefix cache on, under grammars, and in a batch
beside rows that are not drafting; sampled rows keep the model's distribution.

Prompt lookup (the real drafter) rarely guesses right on a random tiny model, so the hybrid
tests also use an oracle drafter that proposes the plain run's own continuation with every
fifth token wrong: every pass then keeps part of its draft and rejects the rest, which is
where Mamba state must be rolled back exactly.
"""

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from plait.backends.clients.local import shared_engine
from plait.backends.grammar.constraint import compile_constraint
from plait.backends.runtime.drafting import MAX_BACKOFF_STEPS, DraftLength, PromptLookup
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.sampling import SamplingParams, probabilities, verify_draft
from tests.chat_fixtures import write_chat_checkpoint
from tests.mtp_fixtures import write_mtp_checkpoint
from tests.test_nemotron_engine import _byte_tokenizer

PROMPTS = [
    f"a plait of three strands, {i}: " * 5 + "the cat sat on the mat. the cat sat on the" for i in range(5)
]
"""Long enough (~190 byte tokens) for the hybrids' 64-token prefix-cache blocks."""


class OracleDrafter:
    """Proposes the reference continuation, with every `every`-th token replaced."""

    def __init__(self, reference: list[int], vocab: int, every: int = 5):
        self.reference, self.vocab, self.every = reference, vocab, every

    def propose(self, output_ids: list[int], count: int) -> list[int]:
        start = len(output_ids)
        draft = self.reference[start : start + count]
        return [
            (t + 1) % self.vocab if (start + j) % self.every == self.every - 1 else t
            for j, t in enumerate(draft)
        ]


class PassesCostTheirFixedPart:
    """A cost model where a pass's fixed part dwarfs its positions (a GPU's view): every step
    with drafts runs as one pass, plain decode rows padded along (`draft_plan` "merged")."""

    def record(self, positions: int, seconds: float) -> None:
        pass

    def line(self) -> tuple[float, float]:
        return 1.0, 1e-4


def exact_drafting(engine: Engine) -> Engine:
    """Draft whatever the drafter proposes (no timing-based choices: the counts the tests
    assert do not depend on how fast this machine is)."""
    engine.scheduler.weigh_drafts = False
    return engine


def run_all(engine: Engine, prompts: list, **kwargs) -> list:
    """Submit every prompt at once (one batch) and wait for all."""
    requests = [engine.submit(p, **kwargs) for p in prompts]
    return [r.wait() for r in requests]


# ---- the pieces ---------------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup([5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6])
    assert lookup.propose([], 3) == [1, 2, 5]  # the latest earlier (5, 6), not the first
    assert lookup.propose([1], 4) == [2, 5, 6, 1]  # (5, 6, 1) ... continues through the output
    assert lookup.propose([1, 42, 43], 3) == []  # nothing like (42, 43) came before


def test_draft_length_grows_shrinks_and_backs_off():
    length = DraftLength(limit=4, current=2)
    length.record(drafted=2, accepted=2)
    assert length.wanted() == 3
    length.record(drafted=3, accepted=1)
    assert length.wanted() == 2
    waits = []
    for _ in range(8):  # nothing accepted, again and again: longer and longer pauses
        length.record(drafted=1, accepted=0)
        pause = 0
        while length.wanted() == 0:
            pause += 1
        waits.append(pause)
    assert waits[:4] == [1, 3, 7, 15] and max(waits) == MAX_BACKOFF_STEPS


def test_speculative_sampling_keeps_the_distribution():
    """With the draft fixed on one token, what `verify_draft` keeps is still distributed as p
    (temperature, top-k and top-p applied): 20,000 draws against the exact probabilities."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.0])
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.95)
    p = probabilities(logits, params)
    generator = torch.Generator().manual_seed(0)
    for draft in (0, 2, 5):  # the likeliest, a middling one, one top-k removes
        counts = torch.zeros(6)
        for _ in range(20_000):
            counts[verify_draft(logits.clone(), params, generator, draft)] += 1
        assert chi_square_z(counts, p) < 4.0, (draft, counts / 20_000, p)


def chi_square_z(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's chi-square of `counts` against probabilities `p`, as a standard normal z
    (Wilson-Hilferty); cells with expected count under 5 are pooled, and a count in a cell
    of probability 0 is an infinite z."""
    n = float(counts.sum())
    if bool((counts[p == 0] > 0).any()):
        return math.inf
    expected = p * n
    small = (expected < 5) & (p > 0)
    cells = [(float(c), float(e)) for c, e in zip(counts[~small & (p > 0)], expected[~small & (p > 0)])]
    if bool(small.any()):
        cells.append((float(counts[small].sum()), float(expected[small].sum())))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    k = len(cells) - 1
    return ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


def test_options_are_checked():
    with pytest.raises(ValueError, match="speculative must be"):
        Engine.load("smollm2-135m", speculative="medusa")
    with pytest.raises(ValueError, match="draft_tokens"):
        Engine.load("smollm2-135m", speculative="ngram", draft_tokens=0)


# ---- SmolLM2 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_speculative():
    engine = exact_drafting(Engine.load("smollm2-135m", dtype="fp32", speculative="ngram", draft_tokens=6))
    yield engine
    engine.close()


def squad_prompts(data_dir, count: int) -> list[str]:
    rows = [json.loads(line) for line in (data_dir / "squad" / "dev.jsonl").open()][: count * 7 : 7]
    return [
        f"Context: {r['context'][:700]}\nQuestion: {r['question']}\n"
        "Copy the sentence of the context that answers the question.\nSentence:"
        for r in rows
    ]


def test_smollm_prompt_lookup_gives_the_plain_tokens(smollm, smollm_speculative, data_dir):
    """SQuAD extraction prompts in one batch: identical greedy tokens, in fewer passes."""
    prompts = squad_prompts(data_dir, 4)
    plain = run_all(smollm, prompts, max_tokens=40)
    before = smollm_speculative.stats()
    fast = run_all(smollm_speculative, prompts, max_tokens=40)
    spent = smollm_speculative.stats().since(before)
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert [r.finish_reason for r in fast] == [r.finish_reason for r in plain]
    assert spent.accepted_tokens > 0 and spent.drafted_tokens >= spent.accepted_tokens
    assert sum(r.usage.accepted_tokens for r in fast) == spent.accepted_tokens
    assert sum(r.usage.forward_passes for r in fast) < sum(r.usage.forward_passes for r in plain)


def test_smollm_stop_strings_and_max_tokens_hold(smollm, smollm_speculative, data_dir):
    """A draft may run past a stop string or max_tokens; the output still ends where plain
    decoding ends it."""
    prompt = squad_prompts(data_dir, 1)[0]
    for kwargs in ({"max_tokens": 7}, {"max_tokens": 60, "stop": [" the "]}):
        plain = smollm.generate(prompt, **kwargs)
        fast = smollm_speculative.generate(prompt, **kwargs)
        assert (fast.text, fast.token_ids, fast.finish_reason) == (
            plain.text,
            plain.token_ids,
            plain.finish_reason,
        )


def test_smollm_json_schema_grammar(smollm, smollm_speculative, data_dir):
    """A JSON echo under a grammar: drafts the grammar forbids are cut, forced keys join them,
    and the tokens are the plain run's."""
    schema = {
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["question", "answer"],
    }
    prompt = squad_prompts(data_dir, 1)[0] + '\nAs JSON: {"question": "'
    results = []
    for engine in (smollm, smollm_speculative):
        constraint = compile_constraint(schema, engine.tokenizer, engine.info.vocab_size, max_tokens=80)
        results.append(engine.generate(prompt, constraint=constraint, max_tokens=80))
    assert results[1].token_ids == results[0].token_ids
    assert results[1].usage.accepted_tokens > 0
    json.loads(results[1].text)


# ---- tiny hybrids ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["dense", "moe", "latent"])
def hybrid(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"spec-{request.param}")
    write_chat_checkpoint(directory, "nemotron3", request.param, seed=3)
    plain = Engine.load(str(directory))
    fast = exact_drafting(Engine.load(str(directory), speculative="ngram", draft_tokens=5))
    yield plain, fast
    plain.close()
    fast.close()


def with_oracle(engine: Engine, references: dict[tuple, list[int]]) -> None:
    vocab = engine.info.vocab_size
    engine.scheduler.make_drafter = lambda request: OracleDrafter(
        references[tuple(request.prompt_ids)], vocab
    )


@pytest.mark.parametrize("costs", ["unweighed", "one pass a step"])
def test_hybrid_rollback_keeps_the_plain_tokens(hybrid, costs):
    """Every pass keeps some drafted tokens and rejects others (the oracle errs every fifth
    token): Mamba conv/SSM state goes back to the last kept token, and the batch's tokens
    equal plain decoding's, with the prefix cache restoring the second round's prompts. With
    a cost model that favours one pass a step, rows without a draft ride along in the verify
    pass (padded), and their tokens are plain decoding's too."""
    plain, fast = hybrid
    if costs == "one pass a step":
        fast.scheduler.weigh_drafts = True
        fast.scheduler.pass_costs = PassesCostTheirFixedPart()
    ids = [fast.prompt_ids(p) for p in PROMPTS]
    reference = run_all(plain, ids, max_tokens=48)
    with_oracle(fast, {tuple(i): r.token_ids for i, r in zip(ids, reference)})
    for _ in range(2):  # the second round starts from the prefix cache
        before = fast.stats()
        out = run_all(fast, ids, max_tokens=48)
        spent = fast.stats().since(before)
        assert [r.token_ids for r in out] == [r.token_ids for r in reference]
        assert 0 < spent.accepted_tokens < spent.drafted_tokens
        if costs == "one pass a step":  # every step: one verify pass, no decode pass beside it
            assert spent.decode_passes == 0
    assert sum(r.usage.cached_tokens for r in out) > 0
    exact_drafting(fast)


def test_hybrid_prompt_lookup_beside_plain_rows(hybrid):
    """Real prompt lookup, some rows drafting and some not in the same batch (sampled rows
    too, seeded): the greedy rows' tokens are the plain run's."""
    plain, fast = hybrid
    fast.scheduler.make_drafter = lambda request: PromptLookup(request.prompt_ids)
    prompt = PROMPTS[0]
    echo = prompt + plain.generate(prompt, max_tokens=24).text + " " + prompt  # its own words again
    prompts = [echo, *PROMPTS[1:3]]
    reference = run_all(plain, prompts, max_tokens=40)
    with ThreadPoolExecutor(4) as pool:
        sampled = pool.submit(fast.generate, PROMPTS[3], max_tokens=20, temperature=0.9, seed=7)
        out = run_all(fast, prompts, max_tokens=40)
        assert len(sampled.result().token_ids) > 0
    assert [r.token_ids for r in out] == [r.token_ids for r in reference]


def test_hybrid_grammar_with_oracle_drafts(hybrid):
    """Under a JSON grammar, drafted tokens the grammar forbids are cut before the pass and
    the rest are verified against the masked logits; the tokens equal plain decoding's."""
    plain, fast = hybrid
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    prompt = fast.prompt_ids(PROMPTS[1])

    def constrained(engine: Engine):
        constraint = compile_constraint(schema, engine.tokenizer, engine.info.vocab_size, max_tokens=40)
        return engine.generate(prompt, constraint=constraint, max_tokens=40)

    reference = constrained(plain)
    with_oracle(fast, {tuple(prompt): reference.token_ids})
    out = constrained(fast)
    assert out.token_ids == reference.token_ids
    assert out.usage.accepted_tokens > 0


def test_hybrid_sampled_rows_keep_the_distribution(hybrid):
    """Sampled rows verify drafts by speculative sampling: the joint distribution of the first
    three tokens (temperature 1, top-k 3) matches the model's exact one, computed from full
    forward passes, over 300 seeded requests with a draft at the second token."""
    plain, fast = hybrid
    prompt = fast.prompt_ids(PROMPTS[2])
    params = SamplingParams(temperature=1.0, top_k=3)
    greedy = plain.generate(prompt, max_tokens=3).token_ids
    fast.scheduler.make_drafter = lambda request: OracleDrafter(greedy, fast.info.vocab_size, every=10**6)
    stops = plain.tokenizer.stop_token_ids
    exact: dict[tuple, float] = {}

    def walk(prefix: list[int], mass: float) -> None:
        p = probabilities(plain.logits(prompt + prefix)[-1], params)
        for token in torch.nonzero(p).flatten().tolist():
            if token in stops or len(prefix) == 2:  # the output ends here
                key = tuple(prefix if token in stops else prefix + [token])
                exact[key] = exact.get(key, 0.0) + mass * float(p[token])
            else:
                walk(prefix + [token], mass * float(p[token]))

    walk([], 1.0)
    cells = {key: i for i, key in enumerate(exact)}
    counts = torch.zeros(len(cells))
    before = fast.stats()
    requests = [fast.submit(prompt, max_tokens=3, temperature=1.0, top_k=3, seed=i) for i in range(300)]
    for r in requests:
        counts[cells[tuple(r.wait().token_ids)]] += 1
    spent = fast.stats().since(before)
    assert spent.drafted_tokens > 0 and spent.accepted_tokens < spent.drafted_tokens
    assert chi_square_z(counts, torch.tensor(list(exact.values()))) < 4.0


# ---- MTP heads ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtp_engines(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spec-mtp")
    write_mtp_checkpoint(directory, "*E", seed=4)
    _byte_tokenizer(directory)
    plain = Engine.load(str(directory))
    fast = exact_drafting(Engine.load(str(directory), speculative="mtp", draft_tokens=3))
    yield plain, fast
    plain.close()
    fast.close()


def test_mtp_drafts_are_the_heads_own_and_tokens_the_plain_ones(mtp_engines):
    """With the (random) MTP head drafting on a hybrid MoE model: the tokens equal plain
    decoding's, and every draft is what the head computes on the whole sequence in one
    uncached pass — its first token from the pairs (h[t], x[t+1]) up to the last fed token, the
    second chained on the head's own output — so the head's state stays in step with the rows
    through prompt chunks, rejections, Mamba replays and prefix-cache restores."""
    plain, fast = mtp_engines
    model = fast.model
    drafts: list[tuple[list[int], list[int]]] = []
    propose = fast.scheduler.mtp.propose

    def recording(slot, row, count):
        draft = propose(slot, row, count)
        if draft:
            drafts.append((row.prompt_ids + row.request.token_ids, draft))
        return draft

    fast.scheduler.mtp.propose = recording
    ids = [fast.prompt_ids(p) for p in PROMPTS[:3]]
    reference = run_all(plain, ids, max_tokens=24)
    for _ in range(2):  # the second round restores its prompts from the prefix cache
        out = run_all(fast, ids, max_tokens=24)
        assert [r.token_ids for r in out] == [r.token_ids for r in reference]
    assert sum(r.usage.cached_tokens for r in out) > 0 and fast.stats().drafted_tokens > 0
    for tokens, draft in drafts[:: max(1, len(drafts) // 12)]:
        with torch.inference_mode():
            _, hidden = model(torch.tensor([tokens[:-1]]), return_hidden=True)
            logits, head = model.mtp_forward(hidden, torch.tensor([tokens[1:]]))
            assert int(logits[0, -1].argmax()) == draft[0]
            if len(draft) > 1:
                chained = torch.cat([hidden, head[:, -1:]], dim=1)
                logits, _ = model.mtp_forward(chained, torch.tensor([tokens[1:] + draft[:1]]))
                assert int(logits[0, -1].argmax()) == draft[1]


def test_mtp_needs_a_head():
    with pytest.raises(ValueError, match="MTP layers"):
        Engine.load("smollm2-135m", speculative="mtp")


def test_plait_lm_with_constrained_adapter(data_dir):
    """`plait.LM(..., speculative="ngram")` under ConstrainedAdapter: a DSPy extraction
    signature gives the same answers as without speculation, and the drafts were used."""
    import dspy

    import plait

    rows = [json.loads(line) for line in (data_dir / "squad" / "dev.jsonl").open()][:8:4]
    extract = dspy.Predict("context, question -> answer")
    answers = []
    engine = shared_engine("smollm2-135m", device="cpu", speculative="ngram", draft_tokens=6)
    # draft whatever the lookup finds: where a verify pass costs more than the drafts save (the
    # C decode pass on 2 cores), the scheduler would rightly stop drafting, and test nothing
    engine.scheduler.weigh_drafts = False
    try:
        for options in ({}, {"speculative": "ngram", "draft_tokens": 6}):
            lm = plait.LM("smollm2-135m", cache=False, max_tokens=96, **options)
            with dspy.context(lm=lm, adapter=plait.ConstrainedAdapter()):
                answers.append(
                    [extract(context=r["context"][:700], question=r["question"]).answer for r in rows]
                )
    finally:
        engine.scheduler.weigh_drafts = True
    assert answers[1] == answers[0]
    assert engine.stats().accepted_tokens > 0


def test_plait_serve_speculative(smollm, data_dir):
    """`plait serve --model smollm2-135m --speculative ngram`: a chat completion over HTTP has
    the plain engine's text, its usage counts drafted and accepted tokens, and /metrics too."""
    import httpx

    from plait.cli import build_parser
    from plait.serve.app import create_app
    from plait.serve.commands import build_runtime, config_from_args
    from tests.serve_fixtures import ServerThread

    argv = [
        "serve",
        "--model",
        "smollm2-135m",
        "--dtype",
        "float32",
        "--speculative",
        "ngram",
        "--draft-tokens",
        "5",
    ]
    args = build_parser().parse_args([*argv, "--no-traces"])
    config = config_from_args(args)
    runtime = build_runtime(args, config)
    messages = [{"role": "user", "content": squad_prompts(data_dir, 2)[1]}]
    try:
        with ServerThread(create_app(runtime)) as server, httpx.Client(base_url=server.url) as http:
            body = {"model": "smollm2-135m", "messages": messages, "max_tokens": 40, "temperature": 0}
            answer = http.post("/v1/chat/completions", json=body, timeout=300).json()
            metrics = http.get("/metrics").text
    finally:
        runtime.close()
    assert answer["choices"][0]["message"]["content"] == smollm.chat(messages, max_tokens=40).text
    usage = answer["plait"]
    assert 0 < usage["accepted_tokens"] <= usage["drafted_tokens"]
    accepted = re.search(r'plait_engine_accepted_tokens\{model="smollm2-135m-fp32"\} (\d+)', metrics)
    assert accepted and int(accepted.group(1)) >= usage["accepted_tokens"]
