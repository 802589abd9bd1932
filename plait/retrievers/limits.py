"""Bounds on what one request may ask of the retrieval stack, shared by the searcher, the index
server and the CLI's argument parser (which must not import torch to learn them)."""

#: Most results one query may ask for.
MAX_K = 1000
