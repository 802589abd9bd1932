"""`plait compile` and `plait eval`: argument parsing, rich progress bars, result tables.

The lead's CLI calls `add_commands(subparsers)`; each handler raises `PlaitError` for bad
input (the CLI prints it on one line and exits 2). The work itself is in `runner.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

from plait.compilers.errors import SelectionError
from plait.compilers.metrics import MAX_METRIC_ERRORS
from plait.compilers.selection import parse_objective
from plait.console import progress_bars
from plait.errors import PlaitError

OPTIMIZER_NAMES = ("labeled", "bootstrap", "random-search", "mipro", "gepa", "simba")
ADAPTER_NAMES = ("auto", "constrained", "chat", "json")


def _int_in(lowest: int, highest: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in `lowest..highest`, else a usage error while parsing, before
    any work (a bad number found after a baseline evaluation wastes minutes)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        if highest is not None and value > highest:
            raise argparse.ArgumentTypeError(f"must be at most {highest}, got {value}")
        return value

    return parse


#: Counts (threads, rows, tokens), offsets, and seeds (NumPy's range).
positive_int = _int_in(1)
non_negative_int = _int_in(0)
seed_int = _int_in(0, 2**32 - 1)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (costs in ms, score points)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number at least 0, got {text}")
    return value


def objective_weight(text: str) -> float:
    """An argparse type: `--objective`'s cost weight (see `selection.parse_objective`)."""
    try:
        return parse_objective(text)
    except SelectionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """`["index=idx/", "k=3"]` -> `{"index": "idx/", "k": 3}` (JSON values, else strings)."""
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise PlaitError(f"{flag} expects key=value, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "program",
        help="the program: module:Class or path/to/file.py:Class (with --compiled, the program "
        "loaded instead of the one the artifact names; class name and signature must match)",
    )
    p.add_argument("--devset", required=True, help="JSONL dev set (scored before and after compiling)")
    p.add_argument(
        "--metric",
        default="accuracy",
        help="accuracy | exact_match | f1 | contains | module:function (default accuracy)",
    )
    p.add_argument(
        "--threads", type=positive_int, default=4, help="examples in flight (the engine batches them)"
    )
    p.add_argument("--model", help="model for every LM call (default smollm2-135m, or the artifact's)")
    p.add_argument(
        "--adapter",
        choices=ADAPTER_NAMES,
        default="auto",
        help="auto = plait's grammar-constrained adapter when the model supports it",
    )
    p.add_argument("--max-tokens", type=positive_int, help="cap on tokens per LM call")
    p.add_argument(
        "--program-arg",
        action="append",
        metavar="KEY=VALUE",
        help="constructor argument of the program (repeatable), e.g. index=idx/",
    )
    p.add_argument("--db", help="database URL (default: PLAIT_DATABASE_URL, else .plait/plait.db)")
    p.add_argument("--fresh", action="store_true", help="start a new run instead of resuming a matching one")
    p.add_argument(
        "--max-metric-errors",
        type=positive_int,
        default=MAX_METRIC_ERRORS,
        metavar="N",
        help=f"stop when the metric raises on N examples in a row (default {MAX_METRIC_ERRORS})",
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `compile` and `eval` to the `plait` command's subparsers."""
    p = subparsers.add_parser("compile", help="optimize a DSPy program on a train set, scored on a dev set")
    _common(p)
    p.add_argument("--trainset", required=True, help="JSONL train set (the optimizer's examples)")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="bootstrap")
    p.add_argument(
        "--optimizer-arg",
        action="append",
        metavar="KEY=VALUE",
        help="override an optimizer setting (repeatable), e.g. max_bootstrapped_demos=8",
    )
    p.add_argument("--out", required=True, help="where to write the compiled artifact (JSON)")
    p.add_argument("--limit", type=positive_int, help="use at most N rows of each of the train and dev sets")
    p.add_argument("--train-limit", type=positive_int, help="rows of the train set (overrides --limit)")
    p.add_argument("--dev-limit", type=positive_int, help="rows of the dev set (overrides --limit)")
    p.add_argument("--seed", type=seed_int, default=0)
    pick = p.add_argument_group(
        "picking by idealized cost",
        "Candidates are the programs scored on the whole dev set (random search scores several); "
        "cost is idealized ms per example on the reference accelerator. Re-running with other "
        "values picks again from the stored run.",
    )
    rule = pick.add_mutually_exclusive_group()
    rule.add_argument(
        "--objective",
        type=objective_weight,
        metavar="'score - W*cost'",
        help="pick the candidate with the best score - W * (idealized ms per example)",
    )
    rule.add_argument(
        "--score-tolerance",
        type=non_negative_float,
        metavar="POINTS",
        help="pick the cheapest candidate scoring within POINTS of the best score",
    )
    pick.add_argument(
        "--max-cost",
        type=non_negative_float,
        metavar="MS",
        help="only candidates costing at most MS idealized ms per example",
    )
    p.set_defaults(func=run_compile)

    p = subparsers.add_parser("eval", help="score a program (or a compiled artifact) on a dataset")
    _common(p)
    p.add_argument(
        "--compiled", help="compiled artifact from `plait compile` (default: the program as written)"
    )
    p.add_argument("--limit", type=positive_int, help="score at most N rows")
    p.add_argument(
        "--offset", type=non_negative_int, default=0, help="skip the first N rows (e.g. rows compile used)"
    )
    p.add_argument("--json-out", help='write {"score", "n", "parse_failures", "results": [...]} here')
    p.add_argument(
        "--show", type=non_negative_int, default=0, metavar="N", help="print the first N per-example results"
    )
    p.set_defaults(func=run_eval)


class RichProgress:
    """The runner's progress protocol drawn as rich progress bars (one per phase)."""

    def __init__(self, console: Any):
        self.console = console
        self.bars = progress_bars(console, 9, "info", transient=False)
        self.tasks: dict[str, Any] = {}
        self.scores: dict[str, list[float]] = {}

    def __enter__(self) -> Self:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def start(self, phase: str, total: int | None) -> None:
        self.scores[phase] = []
        self.tasks[phase] = self.bars.add_task(
            phase, total=total, info="metric calls" if total is None else ""
        )

    def advance(self, phase: str, result: Any = None) -> None:
        info = None
        if result is not None:
            self.scores[phase].append(result.score)
            info = f"score {100 * sum(self.scores[phase]) / len(self.scores[phase]):.1f}"
        self.bars.update(self.tasks[phase], advance=1, **({"info": info} if info else {}))

    def finish(self, phase: str, summary: str) -> None:
        task = self.tasks[phase]
        total = self.bars.tasks[task].total
        self.bars.update(
            task, info=summary, **({"completed": total} if total else {"total": 1, "completed": 1})
        )


@contextlib.contextmanager
def dspy_quiet() -> Iterator[None]:
    """While a command runs, DSPy draws no progress bars, prints nothing (BootstrapFewShot
    prints a summary line to stdout) and logs warnings and errors only: plait's own bars and
    summary report the work, on stderr. (Library users keep DSPy's output: this is the CLI's
    choice.) DSPy's optimizers open tqdm bars with `disable=False` spelled out, so the bars are
    switched off where they are made."""
    import tqdm

    make_bar = tqdm.tqdm.__init__

    def silent_bar(bar: Any, *args: Any, **kwargs: Any) -> None:
        make_bar(bar, *args, **{**kwargs, "disable": True})

    dspy_log = logging.getLogger("dspy")
    level = dspy_log.level
    tqdm.tqdm.__init__ = silent_bar
    dspy_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tqdm.tqdm.__init__ = make_bar
        dspy_log.setLevel(level)


def _store(url: str | None):
    from plait.store import Store

    return Store.open(url)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def run_compile(args: argparse.Namespace) -> int:
    from rich.table import Table

    from plait.compilers.optimizers import parse_optimizer_args
    from plait.compilers.runner import DEFAULT_MODEL, CompileConfig, compile_program
    from plait.compilers.selection import Selection

    config = CompileConfig(
        program=args.program,
        trainset=args.trainset,
        devset=args.devset,
        out=args.out,
        metric=args.metric,
        optimizer=args.optimizer,
        train_limit=args.train_limit or args.limit,
        dev_limit=args.dev_limit or args.limit,
        threads=args.threads,
        seed=args.seed,
        model=args.model or DEFAULT_MODEL,
        adapter=args.adapter,
        max_tokens=args.max_tokens,
        optimizer_args=parse_optimizer_args(args.optimizer_arg),
        program_args=_key_values(args.program_arg, "--program-arg"),
        fresh=args.fresh,
        max_metric_errors=args.max_metric_errors,
        selection=Selection(args.objective, args.max_cost, args.score_tolerance),
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = _console()
    store = _store(args.db)
    try:
        with dspy_quiet(), RichProgress(console) as progress:
            result = compile_program(config, store, progress)
    finally:
        store.close()
    usage = result.usage
    table = Table(
        title=f"compile run {result.run_id}"
        + (f" (resumed, attempt {result.attempts})" if result.resumed else "")
    )
    for column in ("", "before", "after"):
        table.add_column(column, justify="right")
    table.add_row(
        f"score ({args.metric}, {result.after.n} dev)",
        f"{result.before.score:.1f}",
        f"{result.after.score:.1f}",
    )
    table.add_row("parse failures", str(result.before.parse_failures), str(result.after.parse_failures))
    table.add_row(
        "tokens / example",
        f"{result.before.tokens_per_example:.0f}",
        f"{result.after.tokens_per_example:.0f}",
    )
    table.add_row(
        "idealized ms / example",
        _ms(result.before.ideal_seconds_per_example),
        _ms(result.after.ideal_seconds_per_example),
    )
    console.print(table)
    if len(result.candidates) > 2 or result.selection.active:
        _print_candidates(console, result, args.metric)
    share = usage.forced_share
    console.print(
        f"optimizer {args.optimizer} on {result.n_train} train examples, {result.trials} candidate "
        f"evaluations; {result.tokens:,} tokens in {usage.calls:,} LM calls "
        f"({usage.replayed:,} replayed from the store), "
        f"forced-token share {'n/a' if share is None else f'{100 * share:.0f}%'}, "
        f"{result.seconds:.1f} s; idealized {_ms(usage.cost)} ms of LM calls"
    )
    if result.uses_devset:
        console.print(
            "[yellow]note: this optimizer selects on the dev set; score it on held-out rows with "
            "`plait eval --compiled ... --offset N`[/yellow]"
        )
    console.print(f"wrote {result.artifact}")
    return 0


def _ms(seconds: float | None) -> str:
    """Idealized seconds as milliseconds, 3 significant digits ("n/a": not priced)."""
    return "n/a" if seconds is None else f"{1000 * seconds:.3g}"


def _print_candidates(console: Any, result: Any, metric: str) -> None:
    """The candidates by cost, the score-cost Pareto front marked, and what was picked."""
    from rich.table import Table

    from plait.backends.models.cost import REFERENCE

    front = {c.state_hash for c in result.front}
    table = Table(title=f"candidates on the dev set (idealized cost on {REFERENCE.accelerator.name})")
    for column in ("trial", "demos", f"score ({metric})", "ideal ms / example", "front", ""):
        table.add_column(column, justify="right")
    ordered = sorted(result.candidates, key=lambda c: (c.cost_ms is None, c.cost_ms or 0.0, -c.score))
    for c in ordered:
        marks = [
            mark
            for mark, on in (
                ("best score", c.state_hash == result.best.state_hash),
                ("picked", c.state_hash == result.picked.state_hash),
            )
            if on
        ]
        table.add_row(
            str(c.trial),
            str(c.demos),
            f"{c.score:.1f}",
            _ms(c.ideal_seconds),
            "*" if c.state_hash in front else "",
            ", ".join(marks),
        )
    console.print(table)
    picked, best = result.picked, result.best
    line = f"picked: {result.selection.describe()}"
    if picked.state_hash != best.state_hash and picked.ideal_seconds and best.ideal_seconds:
        saving = 1 - picked.ideal_seconds / best.ideal_seconds
        line += (
            f" -> trial {picked.trial}: score {picked.score:.1f} vs {best.score:.1f}, "
            f"{_ms(picked.ideal_seconds)} vs {_ms(best.ideal_seconds)} ms per example "
            f"({100 * saving:.0f}% cheaper than the best-score pick)"
        )
    console.print(line)
    console.print(f"[dim]idealized cost: {REFERENCE.name}, batch 1, no prefix cache[/dim]")


def run_eval(args: argparse.Namespace) -> int:
    from rich.table import Table

    from plait.backends.models.cost import REFERENCE
    from plait.compilers.outputs import check_output_file
    from plait.compilers.runner import EvalConfig, evaluate_program

    if args.json_out:
        check_output_file(args.json_out, "--json-out")
    config = EvalConfig(
        program=args.program,
        devset=args.devset,
        metric=args.metric,
        compiled=args.compiled,
        limit=args.limit,
        offset=args.offset,
        threads=args.threads,
        model=args.model,
        adapter=args.adapter,
        max_tokens=args.max_tokens,
        program_args=_key_values(args.program_arg, "--program-arg"),
        fresh=args.fresh,
        max_metric_errors=args.max_metric_errors,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = _console()
    store = _store(args.db)
    try:
        with dspy_quiet(), RichProgress(console) as progress:
            outcome = evaluate_program(config, store, progress)
    finally:
        store.close()
    report = outcome.report
    if args.show:
        rows = Table("#", "score", "tokens", "ideal ms", "prediction", "error")
        for result in report.results[: args.show]:
            rows.add_row(
                str(result.index),
                f"{result.score:.2f}",
                str(result.tokens),
                _ms(result.ideal_seconds),
                json.dumps(result.prediction)[:80],
                (result.error or "")[:60],
            )
        console.print(rows)
    usage = report.usage
    share = usage.forced_share
    per_example = report.ideal_seconds_per_example
    usd_per_million = None if per_example is None else REFERENCE.usd(per_example) * 1e6
    console.print(
        f"score {report.score:.1f} ({args.metric}) on {report.n} examples; parse failures "
        f"{report.parse_failures}, errors {report.errors}; "
        f"{sum(r.tokens for r in report.results):,} tokens, forced-token share "
        f"{'n/a' if share is None else f'{100 * share:.0f}%'}; {report.seconds:.1f} s; "
        f"idealized {_ms(per_example)} ms / example on {REFERENCE.accelerator.name}"
        + (f" (${usd_per_million:.2f} per million examples)" if usd_per_million is not None else "")
        + (f" ({report.reused} examples reused from run {outcome.run_id})" if report.reused else "")
    )
    if args.json_out:
        document = {
            "score": report.score,
            "n": report.n,
            "parse_failures": report.parse_failures,
            "errors": report.errors,
            "tokens": sum(r.tokens for r in report.results),
            "seconds": round(report.seconds, 3),
            "ideal_seconds_per_example": per_example,
            "cost_reference": REFERENCE.name,
            "usd_per_million_examples": usd_per_million,
            "model": outcome.model,
            "compiled": outcome.compiled,
            "run_id": outcome.run_id,
            "usage": usage.to_dict(),
            "results": [r.to_json() for r in report.results],
        }
        Path(args.json_out).write_text(json.dumps(document, indent=2))
    print(json.dumps({"score": report.score, "n": report.n, "parse_failures": report.parse_failures}))
    return 0
