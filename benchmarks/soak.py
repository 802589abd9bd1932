"""Soak and bad-input sweep of `plait serve` on the embedded model, over real HTTP on loopback.

One `plait serve` process at default settings serves a compiled sentiment program (SST-2
demos) and, on the same engine, the OpenAI endpoints. Then:

1. chat alone: a few chats one after another, the peer of the chats under load;
2. the soak: `--programs` program calls and `--chats` chat completions, shuffled, sent by
   `--concurrency` clients at once; every answer is checked (status, and a label or text);
   the server's RSS is sampled throughout;
3. the sweep: bad inputs of every kind (broken JSON, wrong types, out-of-range numbers and
   token ids, nesting, surrogates, schemas, auth, sizes, unknown names) — each must be a 4xx
   with a JSON error, and the server's log must show no traceback.

Prints p50/p99 per kind, chat latency under load against chat alone, RSS before/peak/after,
and the counts of lost answers, 5xx and tracebacks.

    .venv/bin/python benchmarks/soak.py [--programs 2000] [--chats 300] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
KEY = "soak-key"
MODEL = "smollm2-135m"
PROGRAM = "plait.pipelines.sentiment:Sentiment"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rows(name: str, split: str) -> list[dict]:
    with open(DATA / name / f"{split}.jsonl") as handle:
        return [json.loads(line) for line in handle]


def write_artifact(directory: Path) -> Path:
    """The sentiment program with eight SST-2 demos, as `plait compile` would save it."""
    from plait.compilers.artifact import save_artifact
    from plait.pipelines.sentiment import Sentiment

    program = Sentiment()
    program.classify.demos = [Sentiment.from_row(r) for r in rows("sst2", "train")[:8]]
    path = directory / "sentiment.json"
    save_artifact(program, path, program_path=PROGRAM, model=MODEL)
    return path


class Server:
    """`plait serve` in a subprocess on a free loopback port; its log goes to a file."""

    def __init__(self, artifact: Path, workdir: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = workdir / "server.log"
        env = {**os.environ, "PLAIT_API_KEY": KEY, "PYTHONPATH": str(REPO)}
        command = [
            sys.executable,
            "-m",
            "plait.cli",
            "serve",
            str(artifact),
            "--port",
            str(self.port),
            "--db",
            f"sqlite:///{workdir / 'traces.db'}",
            "--log-level",
            "warning",
        ]
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"plait serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("plait serve did not become ready")

    def rss(self) -> float:
        return rss_mb(self.process.pid)

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


class RssSampler:
    """The server's RSS every `period` seconds, in a thread, while the load runs."""

    def __init__(self, server: Server, period: float = 1.0):
        self.server, self.period, self.samples = server, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(self.server.rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def chat_body(question: str) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Answer briefly: {question}"}],
        "max_tokens": 96,
        "temperature": 0.7,
        "seed": 1,
    }


async def one_call(
    client: httpx.AsyncClient, kind: str, payload: dict, timeout: float
) -> tuple[int, float, bool]:
    """(status, seconds, whether the answer is well formed); status 0 = no answer (lost)."""
    path = "/v1/programs/sentiment" if kind == "program" else "/v1/chat/completions"
    started = time.perf_counter()
    try:
        response = await client.post(path, json=payload, timeout=timeout)
    except httpx.HTTPError:
        return 0, time.perf_counter() - started, False
    seconds = time.perf_counter() - started
    try:
        body = response.json()
        if kind == "program":
            good = body["outputs"]["label"] in ("negative", "positive")
        else:
            good = isinstance(body["choices"][0]["message"]["content"], str)
    except (ValueError, KeyError, TypeError, IndexError):
        good = False
    return response.status_code, seconds, good and response.status_code == 200


async def run_load(url: str, jobs: list[tuple[str, dict]], concurrency: int, timeout: float, deadline: float):
    results: dict[str, list[tuple[int, float, bool]]] = {"program": [], "chat": []}
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits
    ) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    kind, payload = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[kind].append(await one_call(client, kind, payload, timeout))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, queue.qsize()


def bad_inputs() -> list[tuple[str, str, dict, bytes | str | dict | None]]:
    """(name, path, extra headers, body) of requests a hostile or careless client sends; a dict
    body is sent as JSON, bytes/str as they are."""
    chat = "/v1/chat/completions"
    comp = "/v1/completions"
    prog = "/v1/programs/sentiment"
    msg = [{"role": "user", "content": "hi"}]
    deep = "[" * 3000 + "]" * 3000
    cases: list[tuple[str, str, dict, bytes | str | dict | None]] = [
        ("not json", chat, {}, b"{not json"),
        ("empty body", chat, {}, b""),
        ("json array", chat, {}, [1, 2]),
        ("json string", prog, {}, '"text"'),
        ("no messages", chat, {}, {"model": MODEL}),
        ("messages not a list", chat, {}, {"model": MODEL, "messages": "hi"}),
        ("message without role", chat, {}, {"model": MODEL, "messages": [{"content": "hi"}]}),
        ("unknown role", chat, {}, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("content a number", chat, {}, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
        ("unknown model", chat, {}, {"model": "gpt-9", "messages": msg}),
        ("max_tokens 0", chat, {}, {"model": MODEL, "messages": msg, "max_tokens": 0}),
        ("max_tokens negative", chat, {}, {"model": MODEL, "messages": msg, "max_tokens": -5}),
        ("max_tokens huge", chat, {}, {"model": MODEL, "messages": msg, "max_tokens": 10**12}),
        ("max_tokens string", chat, {}, {"model": MODEL, "messages": msg, "max_tokens": "ten"}),
        ("temperature negative", chat, {}, {"model": MODEL, "messages": msg, "temperature": -1}),
        (
            "temperature huge",
            chat,
            {},
            {"model": MODEL, "messages": msg, "temperature": 1e308, "max_tokens": 4},
        ),
        ("temperature NaN text", chat, {}, b'{"model": "smollm2-135m", "messages": [], "temperature": NaN}'),
        (
            "temperature Infinity",
            chat,
            {},
            b'{"model": "smollm2-135m", "messages": [{"role": "user", '
            b'"content": "hi"}], "temperature": Infinity}',
        ),
        ("top_p 0", chat, {}, {"model": MODEL, "messages": msg, "top_p": 0}),
        ("top_p 2", chat, {}, {"model": MODEL, "messages": msg, "top_p": 2}),
        ("top_k negative", chat, {}, {"model": MODEL, "messages": msg, "top_k": -3}),
        ("n 0", chat, {}, {"model": MODEL, "messages": msg, "n": 0}),
        ("n 100000", chat, {}, {"model": MODEL, "messages": msg, "n": 100000}),
        ("seed string", chat, {}, {"model": MODEL, "messages": msg, "seed": "x"}),
        ("seed huge", chat, {}, {"model": MODEL, "messages": msg, "seed": 2**80}),
        ("stop an object", chat, {}, {"model": MODEL, "messages": msg, "stop": {"a": 1}}),
        ("stop 1000 strings", chat, {}, {"model": MODEL, "messages": msg, "stop": ["x"] * 1000}),
        ("stream n=2", chat, {}, {"model": MODEL, "messages": msg, "stream": True, "n": 2}),
        ("logprobs", chat, {}, {"model": MODEL, "messages": msg, "logprobs": True}),
        ("tools unsupported", chat, {}, {"model": MODEL, "messages": msg, "tools": [{"type": "function"}]}),
        ("nested 3000 deep", chat, {}, f'{{"model": "{MODEL}", "messages": {deep}}}'),
        ("nested unknown field", chat, {}, '{"model": "smollm2-135m", "messages": [], "x": ' + deep + "}"),
        (
            "lone surrogate chat",
            chat,
            {},
            '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\\ud800"}]}',
        ),
        ("lone surrogate program", prog, {}, '{"text": "\\udfff"}'),
        ("lone surrogate completion", comp, {}, '{"model": "smollm2-135m", "prompt": "\\ud800"}'),
        (
            "invalid utf-8",
            chat,
            {},
            b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        ),
        ("prompt empty", comp, {}, {"model": MODEL, "prompt": ""}),
        ("prompt empty list", comp, {}, {"model": MODEL, "prompt": []}),
        ("prompt ids out of vocab", comp, {}, {"model": MODEL, "prompt": [1, 2, 10**9], "max_tokens": 2}),
        ("prompt ids negative", comp, {}, {"model": MODEL, "prompt": [1, -7, 3], "max_tokens": 2}),
        ("prompt ids floats", comp, {}, {"model": MODEL, "prompt": [1.5, 2.5]}),
        ("prompt too long", comp, {}, {"model": MODEL, "prompt": [1] * 9000, "max_tokens": 2}),
        ("64 prompts n=16", comp, {}, {"model": MODEL, "prompt": ["a"] * 64, "n": 16, "max_tokens": 2}),
        (
            "response_format not an object",
            chat,
            {},
            {"model": MODEL, "messages": msg, "response_format": "json"},
        ),
        (
            "response_format bad type",
            chat,
            {},
            {"model": MODEL, "messages": msg, "response_format": {"type": "xml"}},
        ),
        (
            "json_schema not a schema",
            chat,
            {},
            {
                "model": MODEL,
                "messages": msg,
                "response_format": {"type": "json_schema", "json_schema": {"schema": 5}},
            },
        ),
        (
            "json_schema invalid",
            chat,
            {},
            {
                "model": MODEL,
                "messages": msg,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
            },
        ),
        (
            "json_schema 300 deep",
            chat,
            {},
            {
                "model": MODEL,
                "messages": msg,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": json.loads('{"items": ' * 300 + "{}" + "}" * 300)},
                },
            },
        ),
        ("guided_regex invalid", chat, {}, {"model": MODEL, "messages": msg, "guided_regex": "(["}),
        (
            "guided_grammar invalid",
            chat,
            {},
            {"model": MODEL, "messages": msg, "guided_grammar": "start: ???"},
        ),
        ("guided_choice empty", chat, {}, {"model": MODEL, "messages": msg, "guided_choice": []}),
        (
            "two constraints",
            chat,
            {},
            {"model": MODEL, "messages": msg, "guided_regex": "a", "guided_choice": ["a"]},
        ),
        (
            "plait_grammar bad kind",
            chat,
            {},
            {"model": MODEL, "messages": msg, "plait_grammar": {"kind": "x"}},
        ),
        ("program unknown", "/v1/programs/nope", {}, {"text": "a"}),
        ("program missing input", prog, {}, {}),
        ("program input wrong type", prog, {}, {"text": {"nested": [1, 2]}}),
        ("program extra input", prog, {}, {"text": "fine", "evil": "__import__('os')"}),
        ("program name traversal", "/v1/programs/..%2F..%2Fetc", {}, {"text": "a"}),
        ("wrong method", "/v1/programs/sentiment", {"X-Method": "PUT"}, {"text": "a"}),
        ("no auth", chat, {"Authorization": ""}, {"model": MODEL, "messages": msg}),
        ("wrong key", chat, {"Authorization": "Bearer nope"}, {"model": MODEL, "messages": msg}),
        ("body too large", prog, {}, {"text": "x" * (2 << 20)}),
        ("content-type text", chat, {"Content-Type": "text/plain"}, b"hello"),
        ("unknown path", "/v1/everything", {}, {"a": 1}),
    ]
    return cases


def sweep(url: str, timeout: float) -> list[tuple[str, int, bool]]:
    """(case, status, whether the body is a JSON error without a traceback) per bad input."""
    out = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for name, path, headers, body in bad_inputs():
            headers = {"Authorization": f"Bearer {KEY}", **headers}
            method = headers.pop("X-Method", "POST")
            if not headers["Authorization"]:
                headers.pop("Authorization")
            if isinstance(body, (dict, list)):
                request = client.build_request(method, path, json=body, headers=headers)
            else:
                data = body.encode() if isinstance(body, str) else body
                headers.setdefault("Content-Type", "application/json")
                request = client.build_request(method, path, content=data, headers=headers)
            try:
                response = client.send(request)
                text = response.text
                try:
                    clean = "error" in response.json() and "Traceback" not in text
                except ValueError:
                    clean = False
                out.append((name, response.status_code, clean))
            except httpx.HTTPError as exc:
                out.append((f"{name} ({type(exc).__name__})", 0, False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=2000)
    parser.add_argument("--chats", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--alone", type=int, default=8, help="chats sent one at a time first (the peer)")
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout per call (s)")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop sending new calls after this")
    args = parser.parse_args()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))

    rng = random.Random(0)
    sentences = [r["text"] for r in rows("sst2", "dev")]
    questions = [r["question"] for r in rows("squad", "dev")]
    with tempfile.TemporaryDirectory(prefix="plait-soak-") as tmp:
        workdir = Path(tmp)
        server = Server(write_artifact(workdir), workdir)
        try:
            started = time.monotonic()
            server.wait_ready()
            print(
                f"plait serve ready in {time.monotonic() - started:.1f} s "
                f"(default settings, port {server.port})"
            )
            headers = {"Authorization": f"Bearer {KEY}"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=args.timeout) as client:
                client.post("/v1/programs/sentiment", json={"text": "a warm-up"}).raise_for_status()
                rss_before = server.rss()
                alone = []
                for question in questions[: args.alone]:
                    began = time.perf_counter()
                    client.post("/v1/chat/completions", json=chat_body(question)).raise_for_status()
                    alone.append(time.perf_counter() - began)
            jobs = [("program", {"text": rng.choice(sentences)}) for _ in range(args.programs)]
            jobs += [("chat", chat_body(rng.choice(questions))) for _ in range(args.chats)]
            rng.shuffle(jobs)
            deadline = time.monotonic() + args.max_seconds
            with RssSampler(server) as rss:
                began = time.perf_counter()
                results, unsent = asyncio.run(
                    run_load(server.url, jobs, args.concurrency, args.timeout, deadline)
                )
                wall = time.perf_counter() - began
            rss_after_load = server.rss()
            tracebacks_before_sweep = server.tracebacks()
            swept = sweep(server.url, args.timeout)
            time.sleep(1)
            rss_end = server.rss()
            tracebacks = server.tracebacks()
        finally:
            server.stop()

        print(
            f"\nsoak: {args.programs} program calls + {args.chats} chats, {args.concurrency} clients, "
            f"{wall:.0f} s wall ({unsent} not sent before --max-seconds)"
        )
        for kind, outcomes in results.items():
            seconds = [s for status, s, _ in outcomes if status == 200]
            lost = sum(1 for status, _, _ in outcomes if status == 0)
            fivexx = sum(1 for status, _, _ in outcomes if status >= 500)
            bad = sum(1 for status, _, good in outcomes if status == 200 and not good)
            other = sorted({status for status, _, _ in outcomes if status not in (0, 200)})
            line = (
                f"  {kind:<8} {len(outcomes):>5} answered-or-lost: 200 {len(seconds)}, lost {lost}, "
                f"5xx {fivexx}, malformed 200s {bad}, other statuses {other}"
            )
            if seconds:
                line += (
                    f"; latency p50 {statistics.median(seconds):.2f} s, p99 {percentile(seconds, 99):.2f} s, "
                    f"throughput {len(seconds) / wall:.1f}/s"
                )
            print(line)
        chat_load = [s for status, s, _ in results["chat"] if status == 200]
        if alone and chat_load:
            print(
                f"  chat alone (peer, {len(alone)} one at a time): p50 {statistics.median(alone):.2f} s; "
                f"under program load p50 {statistics.median(chat_load):.2f} s = "
                f"{statistics.median(chat_load) / statistics.median(alone):.1f}x, "
                f"p99 {percentile(chat_load, 99):.2f} s"
            )
        print(
            f"  server RSS: before the load {rss_before:.0f} MB, "
            f"peak during {max(rss.samples, default=0):.0f} MB, "
            f"after {rss_after_load:.0f} MB, after the sweep {rss_end:.0f} MB"
        )
        if len(rss.samples) >= 4:
            half = len(rss.samples) // 2
            print(
                f"  RSS over the soak: first half median {statistics.median(rss.samples[:half]):.0f} MB, "
                f"second half median {statistics.median(rss.samples[half:]):.0f} MB"
            )
        fivexx = [(n, s) for n, s, _ in swept if s >= 500 or s == 0]
        unclean = [n for n, s, clean in swept if not clean]
        print(
            f"\nbad-input sweep: {len(swept)} cases, 5xx or no answer {len(fivexx)} {fivexx}, "
            f"not a JSON error {len(unclean)} {unclean}"
        )
        print(f"  statuses: {sorted({s for _, s, _ in swept})}")
        print(f"tracebacks in the server log: {tracebacks} ({tracebacks_before_sweep} during the soak)")
        print("load average at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
