"""`plait index build | search | serve | verify`: argparse wiring for the retrieval stack.

`add_commands(subparsers)` adds the `index` command group to plait's CLI. Every leaf parser
sets `func(args) -> int`; handlers raise `PlaitError` subclasses for bad input (the CLI
prints one line and exits 2). Heavy imports happen inside handlers, so `plait --help` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Self

from plait.console import progress_bars
from plait.retrievers.errors import BadQueryError
from plait.retrievers.limits import API_KEY_ENV, MAX_K, ServerSettings

VERIFY_HELP = (
    "check every file's sha256 against the manifest first (reads the whole index once). Opening "
    "always checks file sizes and the structure of the small arrays; only this catches flipped "
    "bytes that keep the structure valid, e.g. in the embeddings"
)


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high]: a bad number is refused while parsing
    (one line, exit 2), before an index is opened or a corpus encoded."""
    bounds = f"at least {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type for a number in [0, 1] (NaN and infinities are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


QueryWriterFactory = Callable[[argparse.Namespace], Any]
"""`plait index tune`'s query generator from its arguments (`--model`, `--concurrency`): a
callable passages -> queries with a `name`. The CLI passes it in: the DSPy
program that writes queries lives above retrieval (`plait.pipelines.synthetic_queries`)."""


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version",
        type=integer(1),
        default=None,
        help="which version of the index (1: as built; default: the newest, e.g. a tuned one)",
    )


def add_commands(
    subparsers: argparse._SubParsersAction, query_writer: QueryWriterFactory | None = None
) -> argparse.ArgumentParser:
    """The `index` group; `tune` only with a `query_writer`."""
    index = subparsers.add_parser("index", help="build, search, tune and serve ColBERT-serve indexes")
    names = "build,search,serve,verify" + (",tune" if query_writer is not None else "")
    sub = index.add_subparsers(dest="index_command", metavar=f"{{{names}}}", required=True)

    build = sub.add_parser("build", help="index a corpus JSONL ({_id|id, title?, text} rows)")
    build.add_argument("corpus", help="corpus JSONL file")
    build.add_argument("--out", required=True, help="index directory to create")
    build.add_argument(
        "--encoder", default=None, help="BERT/ColBERT checkpoint directory (default: the embedded MiniLM-L6)"
    )
    build.add_argument(
        "--dtype",
        choices=["float16", "bfloat16"],
        default="float16",
        help="storage type of token embeddings (default: float16)",
    )
    build.add_argument(
        "--projection-dim",
        type=integer(1),
        default=None,
        help="add a seeded random projection to this many dims (saved in the index)",
    )
    build.add_argument("--centroids", type=integer(1), default=None, help="number of k-means centroids")
    build.add_argument("--chunk-size", type=integer(1), default=256, help="documents per streamed chunk")
    build.add_argument("--batch-size", type=integer(1), default=32, help="documents per encoder forward pass")
    build.add_argument("--no-stem", action="store_true", help="BM25 without plural stemming")
    build.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    build.add_argument(
        "-q", "--quiet", action="store_true", help="no progress on stderr (the summary line still prints)"
    )
    build.set_defaults(func=cmd_build)

    search = sub.add_parser("search", help="query an index")
    search.add_argument("index", help="index directory")
    search.add_argument("query", nargs="?", help="a query (or use --queries)")
    search.add_argument("--queries", help="queries file: JSONL {_id|id, text} or TSV qid<TAB>text")
    search.add_argument("-k", type=integer(1, MAX_K), default=10, help="results per query (default 10)")
    search.add_argument("--stage", choices=["bm25", "late", "hybrid"], default="hybrid")
    search.add_argument("--alpha", type=fraction, default=None, help="hybrid weight of BM25 in [0, 1]")
    search.add_argument("--run-out", help="write a TREC run (qid Q0 docid rank score tag) here")
    search.add_argument("--tag", default=None, help="run tag in the TREC file (default plait-<stage>)")
    search.add_argument("--qrels", help="qrels TSV: print nDCG@10 and Recall@100 of the run")
    search.add_argument("--batch", type=integer(1), default=16, help="queries per batch with --queries")
    search.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    add_version_argument(search)
    search.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    search.set_defaults(func=cmd_search)

    serve = sub.add_parser(
        "serve",
        help="serve an index over HTTP (dspy.ColBERTv2 protocol)",
        description="Answer dspy.ColBERTv2's protocol (GET/POST /, public GET /healthz). A key is "
        "required off loopback; with a key every request but /healthz needs 'Authorization: Bearer "
        "KEY', which dspy.ColBERTv2 itself does not send: give such clients a loopback server "
        "without a key, or a proxy that adds the header.",
    )
    serve.add_argument("index", help="index directory")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=integer(1, 65535), default=8893, help="port (default 8893)")
    serve.add_argument("--stage", choices=["bm25", "late", "hybrid"], default="hybrid")
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"accepted bearer token (repeatable; default ${API_KEY_ENV}); required off loopback",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=integer(1),
        default=ServerSettings.max_body_bytes,
        help=f"largest request body; larger gets 413 (default {ServerSettings.max_body_bytes})",
    )
    serve.add_argument(
        "--max-query-chars",
        type=integer(1),
        default=ServerSettings.max_query_chars,
        help=f"longest query; longer gets 400 (default {ServerSettings.max_query_chars})",
    )
    serve.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    add_version_argument(serve)
    serve.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    serve.set_defaults(func=cmd_serve)

    verify = sub.add_parser("verify", help="check every index file against the manifest's sha256")
    verify.add_argument("index", help="index directory")
    add_version_argument(verify)
    verify.set_defaults(func=cmd_verify)
    if query_writer is not None:
        add_tune_command(sub, query_writer)
    return index


def add_tune_command(sub: argparse._SubParsersAction, query_writer: QueryWriterFactory) -> None:
    from plait.retrievers.query_map import TrainSettings

    train = TrainSettings()
    tune = sub.add_parser(
        "tune",
        help="adapt an index to its corpus with synthetic queries (writes a new version)",
        description="Generate a query for each of N sampled passages with the LM, keep those whose "
        "passage the index ranks first, learn a map of query embeddings from them, and write it as "
        "the index's next version (the old one is kept: --version 1). Resumable: a rerun continues "
        "the generated queries and reuses finished stages.",
    )
    tune.add_argument("index", help="index directory")
    tune.add_argument(
        "--queries", type=integer(1), default=2000, help="passages to write a query for (default 2000)"
    )
    tune.add_argument(
        "--model", default="smollm2-135m", help="the LM that writes queries (default smollm2-135m)"
    )
    tune.add_argument(
        "--concurrency",
        type=integer(1),
        default=16,
        help="queries generated at once (the engine batches them)",
    )
    tune.add_argument(
        "--from-version", type=integer(1), default=None, help="version to tune (default: newest)"
    )
    tune.add_argument(
        "--keep-rank",
        type=integer(1),
        default=1,
        help="keep a query when its passage ranks within this (default 1)",
    )
    tune.add_argument(
        "--negatives", type=integer(0), default=train.negatives, help="hard negatives per query"
    )
    tune.add_argument("--epochs", type=integer(1), default=train.epochs, help="training epochs")
    tune.add_argument(
        "--batch-size", type=integer(2), default=train.batch_size, help="queries per training step"
    )
    tune.add_argument("--lr", type=float, default=train.learning_rate, help="Adam learning rate")
    tune.add_argument("--seed", type=integer(0), default=0, help="passage sample and training seed")
    tune.add_argument("--restart", action="store_true", help="discard generated queries and finished stages")
    tune.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    tune.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    tune.set_defaults(func=lambda args: cmd_tune(args, query_writer))


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


class BuildReporter:
    """`plait index build`'s progress (a `BuildProgress`) on a console, stderr by default.

    On a terminal, rich bars, one per stage, left in place when done. On a pipe or a log file
    rich draws nothing until a display stops (a long build would look hung), so there each
    stage gets plain lines instead: one when it starts, one at most every `interval` seconds
    while it runs, and one when it is done.
    """

    def __init__(self, console: Any, interval: float = 10.0):
        self.console = console
        self.interval = interval
        self.bars = progress_bars(console, 18, "unit", disable=not console.is_terminal)
        self.tasks: dict[str, Any] = {}
        self.stages: dict[str, tuple[int | None, str, float]] = {}  # total, unit, started
        self.completed: dict[str, int] = {}
        self.last_line = 0.0

    def __enter__(self) -> Self:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def _line(self, text: str) -> None:
        if not self.console.is_terminal:  # plain text: never wrapped to the console's width
            self.console.file.write(text + "\n")
            self.console.file.flush()
            self.last_line = time.monotonic()

    def _count(self, stage: str) -> str:
        total, unit, _ = self.stages[stage]
        done = self.completed[stage]
        return f"{done}/{total} {unit}" if total is not None else f"{done} {unit}"

    def start(self, stage: str, total: int | None, unit: str) -> None:
        self.stages[stage] = (total, unit, time.monotonic())
        self.completed[stage] = 0
        self.tasks[stage] = self.bars.add_task(stage, total=total, unit=unit)
        self._line(f"{stage}: {total if total is not None else '?'} {unit}")

    def update(self, stage: str, completed: int) -> None:
        self.completed[stage] = completed
        self.bars.update(self.tasks[stage], completed=completed)
        if time.monotonic() - self.last_line >= self.interval:
            self._line(f"{stage}: {self._count(stage)}, {time.monotonic() - self.stages[stage][2]:.0f}s")

    def finish(self, stage: str) -> None:
        task = self.tasks[stage]
        if self.bars.tasks[task].total is None:  # a stage of unknown length ends as a full bar
            done = self.completed[stage] or 1
            self.bars.update(task, total=done, completed=done)
        self.bars.stop_task(task)
        self._line(f"{stage}: done, {self._count(stage)} in {time.monotonic() - self.stages[stage][2]:.1f}s")


def cmd_build(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from rich.console import Console

    from plait.retrievers.build import build_index

    _threads(args.threads)
    reporter = None if args.quiet else BuildReporter(Console(stderr=True))
    with reporter or nullcontext():
        out = build_index(
            args.corpus,
            args.out,
            encoder=args.encoder,
            dtype=args.dtype,
            projection_dim=args.projection_dim,
            num_centroids=args.centroids,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            stem=not args.no_stem,
            overwrite=args.overwrite,
            progress=reporter,
        )
    from plait.retrievers.manifest import read_manifest

    m = read_manifest(out)
    size = sum(e["bytes"] for e in m["files"].values())
    print(
        f"{out}: {m['num_docs']} docs, {m['num_tokens']} tokens, {m['num_centroids']} centroids, "
        f"{size / 1e6:.1f} MB, built in {m['build_seconds']:.1f}s"
    )
    return 0


def _params(args: argparse.Namespace):
    from plait.retrievers.searcher import SearchParams

    return None if args.alpha is None else SearchParams(alpha=args.alpha)


def cmd_search(args: argparse.Namespace) -> int:
    from plait.retrievers.colbert_serve import ColBERTServe
    from plait.retrievers.evaluation import load_qrels, load_queries, ndcg_at_k, recall_at_k, write_trec

    if (args.query is None) == (args.queries is None):
        raise BadQueryError("give either a query or --queries FILE")
    if args.run_out and not args.queries:
        raise BadQueryError("--run-out needs --queries")
    if args.qrels and not args.queries:
        raise BadQueryError("--qrels needs --queries")
    _threads(args.threads)
    params = _params(args)
    rm = ColBERTServe.open(
        args.index, version=args.version, verify=args.verify, stage=args.stage, batching=False
    )
    if args.query is not None:
        for p in rm.search_batch([args.query], args.k, args.stage, params)[0]:
            snippet = " ".join(p.text.split())[:100]
            print(f"{p.rank:>3}  {p.score:9.4f}  {p.id}  {snippet}")
        return 0
    queries = load_queries(args.queries)
    run: dict[str, list[tuple[str, float]]] = {}
    for start in range(0, len(queries), args.batch):
        batch = queries[start : start + args.batch]
        results = rm.search_batch([text for _, text in batch], args.k, args.stage, params)
        for (qid, _), passages in zip(batch, results):
            run[qid] = [(p.id, p.score) for p in passages]
    if args.run_out:
        write_trec(run, args.run_out, args.tag or f"plait-{args.stage}")
        print(f"wrote {sum(len(v) for v in run.values())} lines for {len(run)} queries to {args.run_out}")
    if args.qrels:
        qrels = load_qrels(args.qrels)
        print(
            f"nDCG@10 {ndcg_at_k(run, qrels, 10):.4f}  Recall@100 {recall_at_k(run, qrels, 100):.4f}  "
            f"({len(qrels)} judged queries)"
        )
    if not args.run_out and not args.qrels:
        for qid, hits in run.items():
            print(qid, " ".join(d for d, _ in hits))
    return 0


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The server's settings, checked before the index is opened (a public address without a
    key is refused at once)."""
    keys = list(args.api_key) or ([os.environ[API_KEY_ENV]] if os.environ.get(API_KEY_ENV) else [])
    return ServerSettings(
        host=args.host,
        port=args.port,
        api_keys=tuple(keys),
        max_body_bytes=args.max_body_bytes,
        max_query_chars=args.max_query_chars,
    ).check()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from plait.retrievers.colbert_serve import ColBERTServe
    from plait.retrievers.server import serve

    _threads(args.threads)
    from plait.retrievers.memory import return_large_buffers_to_os

    return_large_buffers_to_os()  # a long-lived server: keep RssAnon at what it really uses
    rm = ColBERTServe.open(args.index, version=args.version, verify=args.verify, stage=args.stage)
    try:
        rm.warmup()
        print(
            f"serving {args.index} ({rm.num_docs} docs) on http://{settings.host}:{settings.port}"
            f"{'' if settings.api_keys else ' (no authentication: loopback only)'}",
            file=sys.stderr,
        )
        serve(rm, settings)
    finally:
        rm.close()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from plait.retrievers.store import IndexStore
    from plait.retrievers.versions import version_dir

    store = IndexStore(version_dir(args.index, args.version), verify=True)
    print(
        f"{args.index}: OK ({len(store.manifest['files'])} files, {store.disk_bytes() / 1e6:.1f} MB verified)"
    )
    return 0


def cmd_tune(args: argparse.Namespace, query_writer: QueryWriterFactory) -> int:
    from contextlib import nullcontext

    from rich.console import Console

    from plait.retrievers.query_map import TrainSettings
    from plait.retrievers.tuning import TuneSettings, tune_index
    from plait.retrievers.versions import version_dir

    settings = TuneSettings(
        queries=args.queries,
        seed=args.seed,
        keep_rank=args.keep_rank,
        train=TrainSettings(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            negatives=args.negatives,
            seed=args.seed,
        ),
    ).check()
    from plait.retrievers.manifest import read_manifest

    read_manifest(version_dir(args.index, args.from_version))  # a bad index fails before the LM loads
    _threads(args.threads)
    writer = query_writer(args)
    reporter = None if args.quiet else BuildReporter(Console(stderr=True))
    with reporter or nullcontext():
        out = tune_index(
            args.index,
            writer,
            generator=writer.name,
            settings=settings,
            base_version=args.from_version,
            restart=args.restart,
            progress=reporter,
        )
    manifest = read_manifest(out)
    tuning = manifest["tuning"]
    print(
        f"{args.index}: version {out.name} from version {manifest['base_version']}, "
        f"{tuning['queries_kept']}/{tuning['queries_generated']} synthetic queries kept, "
        f"held-out loss {tuning['training']['heldout_loss_before']:.3f} -> "
        f"{min([tuning['training']['heldout_loss_before'], *tuning['training']['heldout_loss']]):.3f}"
    )
    return 0
