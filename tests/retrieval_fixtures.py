"""Shared data and helpers for the retrieval tests (imported, not a conftest)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np

# Eight short documents on distinct topics; each query below has exactly one right answer.
TINY_CORPUS = [
    {
        "_id": "hamlet",
        "title": "Hamlet",
        "text": "Hamlet is a tragedy written by William Shakespeare around 1600. "
        "The prince of Denmark seeks revenge on his uncle.",
    },
    {
        "_id": "photo",
        "title": "Photosynthesis",
        "text": "Plants convert sunlight, water and carbon dioxide into "
        "glucose and oxygen inside their chloroplasts.",
    },
    {
        "_id": "python",
        "title": "Python (programming language)",
        "text": "Python is a programming language created by Guido van Rossum; it emphasises readable code.",
    },
    {
        "_id": "eiffel",
        "text": "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France, completed in 1889.",
    },
    {
        "id": 5,
        "title": "White matter",
        "text": "Diffusion tensor imaging shows the microstructural development "
        "of cerebral white matter in premature newborns.",
    },
    {
        "_id": "volcano",
        "title": "Volcanoes",
        "text": "A volcano erupts when molten rock, ash and gases escape "
        "from a magma chamber below the surface.",
    },
    {
        "_id": "bees",
        "title": "Honey bees",
        "text": "Honey bees pollinate flowering crops and store nectar as "
        "honey in wax combs inside the hive.",
    },
    {
        "_id": "insulin",
        "title": "Insulin",
        "text": "Insulin is a hormone made by the pancreas that lowers blood "
        "glucose; people with type 1 diabetes must inject it.",
    },
]

# query -> the document that must rank first (in every stage)
EXPECTED_TOP1 = {
    "who wrote the tragedy Hamlet": "hamlet",
    "how do plants make glucose from sunlight": "photo",
    "which programming language did Guido van Rossum create": "python",
    "iron tower in Paris": "eiffel",
    "white matter development in newborns": "5",
    "magma and ash erupting": "volcano",
    "insects that pollinate crops and make honey": "bees",
    "hormone treatment for type 1 diabetes": "insulin",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on a loopback port in a daemon thread (a context manager)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_colbert_checkpoint(directory: Path, minilm: Path, dim: int = 16, use_bin: bool = False) -> Path:
    """A tiny random colbert-ai style checkpoint: BERT weights under `bert.`, a `linear` layer,
    config.json, the MiniLM tokenizer and an artifact.metadata with ColBERT's settings."""
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    state = {f"bert.{k}": v.detach().clone().contiguous() for k, v in bert.state_dict().items()}
    state["linear.weight"] = torch.randn(dim, cfg.hidden_size)
    if use_bin:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(directory / "model.safetensors"))
    config = cfg.to_dict()
    config["architectures"] = ["HF_ColBERT"]
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(minilm / "tokenizer.json", directory / "tokenizer.json")
    (directory / "artifact.metadata").write_text(
        json.dumps(
            {
                "query_maxlen": 12,
                "doc_maxlen": 40,
                "query_token_id": "[unused0]",
                "doc_token_id": "[unused1]",
                "attend_to_mask_tokens": False,
                "mask_punctuation": True,
                "dim": dim,
            }
        )
    )
    return directory


def brute_force_maxsim(query: np.ndarray, docs: list[np.ndarray]) -> np.ndarray:
    """Reference MaxSim for every document, float64, fully in memory."""
    q = query.astype(np.float64)
    return np.array([(q @ d.astype(np.float64).T).max(axis=1).sum() for d in docs])
