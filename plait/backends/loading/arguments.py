"""The command-line options that choose how a model's weights run, shared by the commands that
load one. Kept apart from the loaders so that building a parser imports no torch."""

import argparse


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dtype` and `--quantize` (see `plait.backends.loading.registry.precision`)."""
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="dense weights in this dtype (default: the model's own precision, int4 for a GGUF on CPU)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int4", "int8"],
        default=None,
        help="weight-only quantised linear layers, bf16 activations (CPU)",
    )
