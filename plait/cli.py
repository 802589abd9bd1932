"""The `plait` command line.

Every `PlaitError` (and every bad argument) ends as one line on stderr and exit code 2.
"""

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from plait.backends.loading.arguments import add_precision_arguments
from plait.backends.runtime.drafting import add_speculation_arguments
from plait.errors import PlaitError

# Each part of plait adds its own subcommands (`add_commands(subparsers)`).
COMMAND_MODULES = ("plait.retrievers.commands", "plait.compilers.commands", "plait.serve.commands")


def _query_writer(args: argparse.Namespace):
    """`plait index tune`'s query writer: the synthetic-query DSPy program on the chosen LM
    (retrieval sits below the programs, so the CLI hands it over)."""
    from plait.backends.clients.local import LM
    from plait.pipelines.synthetic_queries import QueryWriter

    return QueryWriter(LM(args.model), threads=args.concurrency)


#: Keyword arguments of a module's `add_commands` beyond the subparsers.
COMMAND_OPTIONS = {"plait.retrievers.commands": {"query_writer": _query_writer}}


def _models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from plait.backends.loading.registry import REGISTRY

    table = Table("name", "installed", "description")
    for model in REGISTRY.values():
        table.add_row(model.name, "yes" if model.locate() else "no", model.description)
    Console().print(table)
    print("Any HF checkpoint directory (nemotron_h) or .gguf file (llama) also works: -m PATH")


def _generate(args: argparse.Namespace) -> None:
    from plait.backends.runtime.drafting import speculation_options
    from plait.backends.runtime.engine import Engine

    if args.max_tokens < 1:
        raise PlaitError("--max-tokens must be at least 1")
    spec = _grammar_spec(args)
    tools = _tools(args)
    if args.raw and (args.reasoning is not None or tools):
        raise PlaitError("--reasoning and --tools need the chat template: they cannot be used with --raw")
    engine = Engine.load(args.model, dtype=args.dtype, quantize=args.quantize, **speculation_options(args))
    turn = None
    if args.raw:
        prompt = args.prompt
    else:
        from plait.backends.clients.messages import template_messages
        from plait.backends.runtime.turn import plan_turn

        fmt = engine.tool_format
        messages, template_kwargs = template_messages([{"role": "user", "content": args.prompt}], tools, fmt)
        if tools:  # the model's own call format, or the answer `spec` asks for
            required = args.tool_choice == "required"
            spec = fmt.grammar(tools, required=required, answer=spec, max_tokens=args.max_tokens)
        turn = plan_turn(
            engine,
            messages,
            reasoning=args.reasoning,
            spec=spec,
            max_tokens=args.max_tokens,
            template_kwargs=template_kwargs,
        )
        prompt = turn.prompt
    options = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or None,
    )
    if turn is not None:
        options["constraint"] = turn.constraint(engine, args.max_tokens)
    elif spec is not None:
        from plait.backends.grammar.constraint import compile_constraint

        options["constraint"] = compile_constraint(
            spec, engine.tokenizer, engine.info.vocab_size, max_tokens=args.max_tokens
        )
    try:
        if args.stream:
            splitter = turn.stream_splitter() if turn is not None else None
            for piece in engine.stream(prompt, **options):
                _print_pieces(splitter.feed(piece) if splitter else ("", piece))
            _print_pieces(splitter.flush() if splitter else ("", ""))
            sys.stdout.write("\n")
        else:
            text = engine.generate(prompt, **options).text
            thought, answer = turn.split(text) if turn is not None else (None, text)
            calls = engine.tool_format.parse(answer, tools).calls if tools else ()
            if calls:  # printed as JSON, one list, for a pipe to read
                answer = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
            _print_pieces((f"{thought}\n" if thought else "", answer))
            sys.stdout.write("\n")
    finally:
        engine.close()


def _print_pieces(pieces: tuple[str, str]) -> None:
    """A thinking model's reasoning goes to stderr, its answer to stdout (what a pipe reads)."""
    thought, answer = pieces
    if thought:
        sys.stderr.write(thought)
        sys.stderr.flush()
    if answer:
        sys.stdout.write(answer)
        sys.stdout.flush()


def _tools(args: argparse.Namespace) -> list:
    """The tools of --tools FILE (an OpenAI `tools` list), checked before the model loads."""
    if not args.tools:
        return []
    from plait.backends.grammar.tool_formats import tool_specs

    try:
        tools = json.loads(Path(args.tools).read_text())
    except json.JSONDecodeError as exc:
        raise PlaitError(f"{args.tools} is not valid JSON: {exc}") from exc
    if not isinstance(tools, list) or not tools:
        raise PlaitError(f"{args.tools} must hold a non-empty JSON list of tools")
    return tool_specs(tools)


def _reasoning_setting(value: str):
    """argparse type of --reasoning: on, off, an effort word or a token budget."""
    from plait.backends.grammar.reasoning import ReasoningError, ReasoningRequest

    try:
        return ReasoningRequest.parse(value)
    except ReasoningError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), like every other error."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _grammar_spec(args: argparse.Namespace):
    """The output constraint asked for on the command line, checked before the model loads."""
    from plait.backends.grammar.spec import GrammarSpec

    given = [name for name in ("choice", "json_schema", "regex", "grammar") if getattr(args, name)]
    if len(given) > 1:
        raise PlaitError(f"use one of --choice, --json-schema, --regex, --grammar (got {', '.join(given)})")
    if args.choice:
        return GrammarSpec.choices(args.choice)
    if args.regex:
        return GrammarSpec.regex(args.regex)
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except json.JSONDecodeError as exc:
            raise PlaitError(f"{args.json_schema} is not valid JSON: {exc}") from exc
        return GrammarSpec.json_schema(schema)
    if args.grammar:
        return GrammarSpec.lark(Path(args.grammar).read_text())
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="plait", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("models", help="list the models plait can load")
    p.set_defaults(func=_models)

    p = sub.add_parser("generate", help="generate text with a local model")
    p.add_argument("prompt")
    p.add_argument(
        "-m", "--model", default="smollm2-135m", help="registered name, .gguf file or HF directory"
    )
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument(
        "--reasoning",
        type=_reasoning_setting,
        metavar="on|off|EFFORT|N",
        help="thinking of a model that has it: on, off, low/medium/high, or a token budget "
        "(the reasoning is printed to stderr)",
    )
    p.add_argument(
        "--tools",
        metavar="FILE",
        help="JSON list of tools (OpenAI form) the model may call, in its own format; "
        "calls are printed as a JSON list",
    )
    p.add_argument("--tool-choice", choices=["auto", "required"], default="auto")
    add_precision_arguments(p)
    add_speculation_arguments(p)
    constrain = p.add_argument_group("output constraints (one of)")
    constrain.add_argument("--choice", action="append", help="allowed answer (repeatable)")
    constrain.add_argument("--json-schema", metavar="FILE", help="JSON schema the answer must follow")
    constrain.add_argument("--regex", help="regular expression the answer must match")
    constrain.add_argument(
        "--grammar", metavar="FILE", help="Lark grammar (llguidance dialect) of the answer"
    )
    p.set_defaults(func=_generate)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub, **COMMAND_OPTIONS.get(module, {}))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (already printed) or --help
        return int(exc.code or 0)
    try:
        result = args.func(args)
    except (PlaitError, ValueError, OSError) as exc:
        print(f"plait: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
