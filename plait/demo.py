"""`make demo`: the whole story on the embedded model, with the real commands.

generate → a typed DSPy program under a grammar → concurrent calls batched → a ColBERT-serve
index over HotPotQA paragraphs → evaluate the sentiment pipeline, compile it, evaluate again
→ serve the compiled program over HTTP, query it, stop the server.

Sizes are chosen to finish in about ten minutes on 2 CPU cores; `PLAIT_DEMO_ROWS` scales the
compile/eval part.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
DATA = Path(os.environ.get("PLAIT_DATA", Path.cwd().parent / "shared" / "data"))
ROWS = int(os.environ.get("PLAIT_DEMO_ROWS", "50"))


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def plait(*args: str) -> None:
    """Run a `plait` command exactly as a user would, echoing it; its output goes to the terminal."""
    console.print(f"[dim]$ plait {' '.join(args)}[/dim]")
    sys.stdout.flush()
    if subprocess.run([sys.executable, "-m", "plait.cli", *args]).returncode != 0:
        raise SystemExit(f"demo step failed: plait {' '.join(args)}")


def generation() -> None:
    step("1. The local engine")
    plait("models")
    plait(
        "generate",
        "-m",
        "smollm2-135m",
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "16",
    )


def typed_program() -> None:
    import dspy

    import plait as pl

    step("2. A typed DSPy program, decoded under a grammar")
    lm = pl.LM("smollm2-135m", cache=False)
    dspy.configure(lm=lm, adapter=pl.ConstrainedAdapter())
    classify = dspy.Predict("text -> sentiment: Literal['negative', 'positive'], confidence: float")
    for text in ["a gorgeous, witty film", "a tedious, joyless slog"]:
        result = classify(text=text)
        console.print(f"{text!r} -> sentiment={result.sentiment!r} confidence={result.confidence!r}")
    scheduler = lm.engine.engine.scheduler

    step("3. Concurrent DSPy calls share decode steps")
    rows = [json.loads(line) for line in open(DATA / "sst2" / "dev.jsonl")][:8]
    texts = [row["text"] for row in rows]
    started = time.perf_counter()
    sequential = [classify(text=t).sentiment for t in texts]
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda t: classify(text=t).sentiment, texts))
    concurrent_s = time.perf_counter() - started
    console.print(
        f"8 calls one by one: {sequential_s:.1f} s; 8 at once: {concurrent_s:.1f} s "
        f"({sequential_s / concurrent_s:.1f}x); identical greedy answers: {sequential == concurrent}"
    )
    console.print(
        f"prefix cache: {scheduler.prefix_cache.hit_tokens if scheduler.prefix_cache else 0} prompt tokens "
        "restored instead of recomputed"
    )


def retrieval(work: Path) -> None:
    step("4. ColBERT-serve retrieval over HotPotQA paragraphs (memory-mapped index)")
    corpus = work / "corpus.jsonl"
    with open(DATA / "hotpotqa" / "corpus.jsonl") as source, open(corpus, "w") as out:
        for i, line in enumerate(source):
            if i >= 800:
                break
            out.write(line)
    plait("index", "build", str(corpus), "--out", str(work / "index"))
    plait(
        "index", "search", str(work / "index"), "Which film did Tim Burton direct about Ed Wood?", "-k", "3"
    )


def lifecycle(work: Path) -> Path:
    step("5. Evaluate → compile → evaluate the sentiment pipeline on SST-2")
    program = "plait.pipelines.sentiment:Sentiment"
    dev, train = DATA / "sst2" / "dev.jsonl", DATA / "sst2" / "train.jsonl"
    artifact = work / "sentiment.json"
    before, after = work / "before.json", work / "after.json"
    common = ["--devset", str(dev), "--metric", "accuracy", "--db", f"sqlite:///{work / 'plait.db'}"]
    held_out = ["--offset", str(ROWS), "--limit", str(2 * ROWS)]  # rows compile never saw
    plait("eval", program, *common, *held_out, "--json-out", str(before))
    # random search over small demo sets: what works for a 135M model (plain bootstrap does not)
    plait(
        "compile",
        program,
        "--trainset",
        str(train),
        *common,
        "--optimizer",
        "random-search",
        "--optimizer-arg",
        "max_bootstrapped_demos=2",
        "--optimizer-arg",
        "max_labeled_demos=2",
        "--optimizer-arg",
        "num_candidate_programs=6",
        "--threads",
        "8",
        "--train-limit",
        str(ROWS),
        "--dev-limit",
        str(ROWS),
        "--out",
        str(artifact),
    )
    plait("eval", program, "--compiled", str(artifact), *common, *held_out, "--json-out", str(after))
    table = Table("program", "accuracy (held-out SST-2 dev rows)", "parse failures")
    for name, path in [("as written", before), ("compiled", after)]:
        result = json.loads(path.read_text())
        table.add_row(name, f"{result['score']:.1f} (n={result['n']})", str(result["parse_failures"]))
    console.print(table)
    return artifact


def serving(artifact: Path) -> None:
    import httpx

    from plait.serve.server import wait_until_serving

    step("6. Serve the compiled program over HTTP")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "demo-key"
    command = [
        sys.executable,
        "-m",
        "plait.cli",
        "serve",
        str(artifact),
        "--port",
        str(port),
        "--api-key",
        key,
    ]
    console.print(f"[dim]$ plait serve {artifact.name} --port {port} --api-key {key}[/dim]")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(base, server)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        headers = {"Authorization": f"Bearer {key}"}
        console.print(f"GET /v1/programs -> {httpx.get(f'{base}/v1/programs', headers=headers).json()}")
        for text in ["a triumph of a movie", "the dullest two hours of my life"]:
            response = httpx.post(
                f"{base}/v1/programs/sentiment", json={"text": text}, headers=headers, timeout=120
            )
            console.print(
                f"POST /v1/programs/sentiment {{'text': {text!r}}} -> {response.status_code} "
                f"{response.json()}"
            )
        denied = httpx.post(f"{base}/v1/programs/sentiment", json={"text": "x"}, timeout=30)
        console.print(f"without the key -> {denied.status_code} {denied.json()}")
    finally:
        server.terminate()
        server.wait(30)
        console.print("server stopped")


def main() -> None:
    if not DATA.exists():
        raise SystemExit(f"datasets not found at {DATA}: run from the repository with ../shared beside it")
    started = time.perf_counter()
    generation()
    typed_program()
    with tempfile.TemporaryDirectory(prefix="plait-demo-") as tmp:
        work = Path(tmp)
        retrieval(work)
        artifact = lifecycle(work)
        serving(artifact)
    console.rule(f"[bold green]demo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
