"""`plait serve`: argparse wiring, loading, and running uvicorn.

    plait serve sentiment.json --port 8000 --api-key "$KEY"
    plait serve qa=rag.json sentiment.json --host 0.0.0.0 --api-key "$KEY" --rate-limit 5
    plait serve --model smollm2-135m            # OpenAI-compatible endpoints only
    plait serve rag.json --remote-url http://gpu:8000/v1 --remote-model nvidia/NVIDIA-Nemotron-Nano-9B-v2

`add_commands(subparsers)` adds the command to plait's CLI. Everything is loaded before the
port is bound, so a server that accepts connections can answer them; bad settings (a public
address without a key, a missing artifact) fail as one line and exit code 2 before any
weights are read. Heavy imports happen inside the handler, so `plait --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from plait.backends.loading.arguments import add_precision_arguments
from plait.backends.runtime.drafting import add_speculation_arguments, speculation_options
from plait.compilers.commands import positive_int
from plait.compilers.loading import split_target
from plait.serve.config import ADAPTERS, ServeConfig, ServeConfigError

API_KEY_ENV = "PLAIT_API_KEY"


def add_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve compiled programs (and OpenAI-compatible endpoints) over HTTP",
        description="Serve compiled artifacts at POST /v1/programs/{name}, plus /v1/chat/completions, "
        "/v1/completions, /healthz and /metrics.",
    )
    p.add_argument(
        "artifacts",
        nargs="*",
        metavar="[NAME=]ARTIFACT.json",
        help="compiled artifacts; NAME defaults to the file name without .json",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="MODEL",
        help="also serve this model on the OpenAI endpoints (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"accepted bearer token (repeatable; default ${API_KEY_ENV}); required off loopback",
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        help="requests per second per client (API key or address); 0 = off (default)",
    )
    p.add_argument(
        "--rate-burst", type=int, default=20, help="requests a client may send at once (default 20)"
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=64,
        help="generations admitted at once (a program call is one, an OpenAI call its prompts x n); "
        "more get 503 (default 64)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=None, help="threads running calls (default: --max-inflight)"
    )
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a call gets 504")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a request's headers before it is disconnected (default 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a request's body before it is disconnected (default 30)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=4096,
        help="largest max_tokens an OpenAI-style request may ask for (default 4096)",
    )
    p.add_argument("--max-tokens", type=positive_int, default=None, help="max_tokens of each program LM call")
    p.add_argument(
        "--adapter",
        choices=ADAPTERS,
        default="auto",
        help="DSPy adapter for programs (auto: the artifact's, else constrained when the "
        "engine decodes under grammars)",
    )
    p.add_argument(
        "--remote-url",
        default=None,
        metavar="URL",
        help="run the programs' LM calls on this OpenAI-compatible server (.../v1) instead of a local engine",
    )
    p.add_argument(
        "--remote-model",
        default=None,
        help="the model name the remote server serves (default: each artifact's model)",
    )
    p.add_argument(
        "--remote-dialect",
        default="auto",
        choices=["auto", "plait", "vllm", "vllm-legacy", "sglang", "openai"],
        help="how the remote server takes grammars (default: ask it)",
    )
    p.add_argument(
        "--max-batch-size", type=positive_int, default=None, help="sequences the engine decodes together"
    )
    p.add_argument(
        "--memory-budget-mb",
        type=positive_int,
        default=None,
        help="the engine's decoding state (KV cache, Mamba state) at most, in MiB; sequences that "
        "outgrow it are paused and recomputed (default: 512 on CPU or a tenth of the RAM, 80%% of "
        "free GPU memory on CUDA)",
    )
    p.add_argument(
        "--step-tokens",
        type=positive_int,
        default=None,
        help="tokens per engine step: prompts are prefilled in chunks beside decoding rows "
        "(default 256 on CPU, 2048 on CUDA)",
    )
    p.add_argument(
        "--program",
        action="append",
        default=[],
        metavar="FILE.py:Class",
        help="the program of an artifact compiled from a file you name (repeatable; matched to "
        "artifacts by class name): an artifact never imports a file by itself",
    )
    add_precision_arguments(p)
    p.add_argument("--device", default="cpu", help="engine device (default cpu)")
    add_speculation_arguments(p)
    p.add_argument(
        "--database",
        "--db",
        default=None,
        help="SQLAlchemy URL for traces (default: PLAIT_DATABASE_URL, else .plait/plait.db)",
    )
    p.add_argument("--no-traces", action="store_true", help="do not record request traces")
    p.add_argument("--no-trace-io", action="store_true", help="traces keep field names, not values")
    p.add_argument(
        "--dspy-cache", action="store_true", help="answer repeated program calls from DSPy's cache"
    )
    p.add_argument(
        "--no-prompt-prefill",
        action="store_true",
        help="run each stage's prompt only when its call comes (no start-up prefill of the programs' "
        "instructions and demos, no background prefill of later stages)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=cmd_serve, func=cmd_serve)
    return p


def parse_artifact(spec: str) -> tuple[str | None, Path]:
    """`name=path.json` or `path.json` (a path may contain `=`: only a valid name splits)."""
    name, sep, path = spec.partition("=")
    from plait.serve.programs import NAME_PATTERN

    if sep and NAME_PATTERN.match(name) and path:
        return name, Path(path)
    return None, Path(spec)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    keys = list(args.api_key) or ([os.environ[API_KEY_ENV]] if os.environ.get(API_KEY_ENV) else [])
    return ServeConfig(
        host=args.host,
        port=args.port,
        api_keys=tuple(keys),
        max_body_bytes=args.max_body_bytes,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        max_inflight=args.max_inflight,
        workers=args.workers or args.max_inflight,
        request_timeout=args.request_timeout,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_tokens_limit=args.max_tokens_limit,
        trace_io=not args.no_trace_io,
        dspy_cache=args.dspy_cache,
        prompt_prefill=not args.no_prompt_prefill,
    ).check()


def build_runtime(args: argparse.Namespace, config: ServeConfig) -> Any:
    """Open the store, load every artifact and model: everything before the port opens."""
    from plait.serve.runtime import ServeRuntime

    specs = [parse_artifact(a) for a in args.artifacts]
    missing = [str(path) for _, path in specs if not path.is_file()]
    if missing:
        raise ServeConfigError(f"artifact not found: {', '.join(missing)}")
    _check_unique_names(specs)
    store = None
    if not args.no_traces:
        from plait.store import Store

        store = Store.open(args.database)
    runtime = ServeRuntime(config, store=store)
    lm_options: dict[str, Any] = {"device": args.device, **speculation_options(args)}
    for option in ("max_batch_size", "memory_budget_mb", "step_tokens"):
        if getattr(args, option) is not None:
            lm_options[option] = getattr(args, option)
    programs = _named_programs(args.program)
    from plait.compilers.artifact import read_artifact

    if args.dtype:
        lm_options["dtype"] = args.dtype
    if args.quantize:
        lm_options["quantize"] = args.quantize
    program_options = dict(lm_options)
    if args.max_tokens:
        program_options["max_tokens"] = args.max_tokens
    try:
        for name, path in specs:
            lm = _remote_lm(args, path, config) if args.remote_url else None
            program = programs.get(split_target(read_artifact(path)["program"])[1])
            runtime.load_artifact(
                path, name, adapter=args.adapter, lm_options=program_options, lm=lm, program=program
            )
        for model in args.model:
            runtime.load_model(model, lm_options)
    except BaseException:
        runtime.close()
        raise
    return runtime


def _named_programs(targets: list[str]) -> dict[str, str]:
    """`--program FILE.py:Class` targets by class name (the key an artifact is matched by)."""
    by_class: dict[str, str] = {}
    for target in targets:
        _, cls = split_target(target)
        if cls in by_class:
            raise ServeConfigError(f"two --program targets define {cls}: {by_class[cls]} and {target}")
        by_class[cls] = target
    return by_class


def _check_unique_names(specs: list[tuple[str | None, Path]]) -> None:
    """Two artifacts served under one name (`a.json other/a.json`) are a usage error, found
    before anything loads; the message shows how to name them apart."""
    from plait.serve.runtime import program_name

    seen: dict[str, Path] = {}
    for name, path in specs:
        served = name or program_name(path)
        if served in seen:
            raise ServeConfigError(
                f"two artifacts would both be served as {served!r} ({seen[served]}, {path}): name them "
                f"with NAME=path.json, e.g. {served}={seen[served]} {served}2={path}"
            )
        seen[served] = path


def _remote_lm(args: argparse.Namespace, path: Path, config: ServeConfig) -> Any:
    """The LM for an artifact's program when `--remote-url` sends its calls to another server
    (its key, if any, from `PLAIT_REMOTE_API_KEY`)."""
    from plait.backends.clients.remote import remote_lm
    from plait.compilers.artifact import read_artifact

    model = args.remote_model or read_artifact(path)["model"]
    options: dict[str, Any] = {"cache": config.dspy_cache}
    if args.max_tokens:
        options["max_tokens"] = args.max_tokens
    return remote_lm(
        args.remote_url, model, api_key_env="PLAIT_REMOTE_API_KEY", dialect=args.remote_dialect, **options
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.artifacts and not args.model:
        raise ServeConfigError(
            "nothing to serve: give compiled artifacts, or --model for the OpenAI endpoints"
        )
    config = config_from_args(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from plait.backends.runtime.host_memory import tune_for_serving
    from plait.serve.app import create_app
    from plait.serve.server import uvicorn_options

    tune_for_serving()  # a long-running process: freed memory goes back to the OS
    runtime = build_runtime(args, config)
    app = create_app(runtime)
    shown = "localhost" if config.host in ("127.0.0.1", "::1") else config.host
    print(
        f"plait: serving {len(runtime.programs)} program(s) {sorted(runtime.programs)} and model(s) "
        f"{sorted(runtime.models)} on http://{shown}:{config.port}"
        f"{'' if config.api_keys else ' (no authentication: loopback only)'}",
        file=sys.stderr,
    )
    try:
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=10,
            access_log=args.log_level == "debug",
            **uvicorn_options(config),
        )
    finally:
        runtime.close()
    return 0
