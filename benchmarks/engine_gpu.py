"""plait's GPU engine against transformers' NemotronHForCausalLM, at the real model dimensions.

    .venv/bin/python benchmarks/engine_gpu.py                  # both models, on CUDA
    .venv/bin/python benchmarks/engine_gpu.py --models nano-9b-v2 --decode-steps 64
    .venv/bin/python benchmarks/engine_gpu.py --tiny            # scaled-down dims, runs on CPU too

Weights are random bf16 at the dimensions of NVIDIA-Nemotron-Nano-9B-v2 and
Nemotron-3-Nano-30B-A3B (values from the checkpoints' config.json). No weights are downloaded:
the transformers model is built empty on the device and filled from a seeded generator, and
plait's model takes the very same tensors (one copy in memory, so both compute the same
function and the 30B model fits once on one 80 GB GPU).

Per model, for plait (Triton kernels, CUDA-graph decode) and transformers (its PyTorch path,
as installed), in the same run:
  * prefill tok/s of one 2k and one 8k-token prompt, cache written (after a warm-up pass of the
    same length; plait the median of 3 passes, transformers 1);
  * decode tok/s at batch 1/8/32/64 after a 128-token prompt per row (greedy, the next token
    chosen on the device);
  * peak GPU memory of each engine's runs (weights included, and shared);
  * batch-1 decode as a fraction of the roofline: the bytes of the weights one step must read
    (every weight except the embedding table; for MoE layers only top_k of the routed experts)
    over the device copy bandwidth measured here by copying a 1 GiB tensor.
It prints a table and plait/transformers ratios. It asserts nothing (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from plait.backends.models.nemotron_h import NemotronHForCausalLM
from plait.backends.models.nemotron_h_config import NemotronHConfig
from plait.backends.models.nemotron_h_presets import PUBLISHED, preset
from plait.backends.models.state import Batch
from plait.backends.runtime.cuda_graphs import DecodeGraphs
from plait.backends.runtime.state_pool import StatePool


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights of a sensible scale (so routing and decays behave as in a trained model)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.uniform_(0.0, math.log(16.0), generator=g)
        elif leaf == "dt_bias":  # softplus^-1 of dt log-uniform in [1e-3, 0.1]
            dt = (
                torch.empty_like(p, dtype=torch.float32)
                .uniform_(math.log(1e-3), math.log(0.1), generator=g)
                .exp()
            )
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "D" or "norm" in name:
            p.fill_(1.0)
        elif p.dim() == 1:
            p.normal_(0.0, 0.02, generator=g)
        elif "embeddings" in name:
            p.normal_(0.0, 1.0, generator=g)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.01, generator=g)


def build(config: dict, device: torch.device, seed: int = 0):
    """(transformers model, plait model) sharing one set of random bf16 weights on `device`."""
    from transformers import NemotronHConfig as HFConfig
    from transformers import NemotronHForCausalLM as HFModel

    hf_config = HFConfig(**config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            hf = HFModel(hf_config)
    finally:
        torch.set_default_dtype(default)
    hf = hf.to_empty(device=device).eval().requires_grad_(False)
    randomise(hf, seed)

    cfg = NemotronHConfig.from_dict(hf_config.to_dict())
    with torch.device("meta"):
        plait = NemotronHForCausalLM(cfg)
    shared = {}
    for name, t in {**dict(hf.named_parameters()), **dict(hf.named_buffers())}.items():
        name = name.removeprefix("model.").removeprefix("backbone.")
        small_fp32 = name.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D", "e_score_correction_bias")
        shared[name] = t.float().clone() if small_fp32 else t
    plait.load_state_dict(shared, strict=False, assign=True)
    left = [n for n, t in [*plait.named_parameters(), *plait.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers has no tensor for plait's {', '.join(left[:5])}")
    return hf, plait.fuse_projections().eval().requires_grad_(False)  # as registry.load serves it


def weight_bytes_per_step(model: NemotronHForCausalLM) -> int:
    """Bytes a batch-1 decode step must read: all weights but the embedding table, and of each
    MoE layer's routed experts only the top_k that run."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embeddings."):
            continue
        nbytes = p.numel() * p.element_size()
        if ".experts." in name:
            nbytes = nbytes * model.config.num_experts_per_tok // model.config.n_routed_experts
        total += nbytes
    if model.lm_head.weight is model.embeddings.weight:
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total


def median_seconds(fn, device: torch.device, reps: int) -> float:
    """The median of `reps` timed calls of fn (after the caller's warm-up)."""
    return sorted(timed(fn, device) for _ in range(reps))[reps // 2]


def copy_bandwidth(device: torch.device, size: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 20 if device.type == "cuda" else 3
    seconds = timed(lambda: [dst.copy_(src) for _ in range(reps)], device)
    return 2 * size * reps / seconds


# --- plait ---------------------------------------------------------------------------------


@torch.no_grad()
def plait_prefill(model, length: int, device) -> float:
    ids = torch.randint(3, model.vocab_size, (1, length), device=device)
    pool = StatePool(
        model.state_specs(torch.bfloat16),
        device=device,
        slots=1,
        capacity=length,
        max_length=model.context_length,
    )

    def prefill():
        model(ids, Batch(pool, 0, torch.tensor([0], device=device)), last_only=True)

    prefill()  # warm-up at this very length: Triton compiles per shape, autotunes per size
    return length / median_seconds(prefill, device, reps=3)


@torch.no_grad()
def plait_decode(model, batch: int, prompt: int, steps: int, device) -> float:
    pool = StatePool(
        model.state_specs(torch.bfloat16),
        device=device,
        slots=max(2, batch),
        capacity=prompt + steps + 4,
        max_length=model.context_length,
    )
    for row in range(batch):
        ids = torch.randint(3, model.vocab_size, (1, prompt), device=device)
        model(ids, Batch(pool, row, torch.tensor([0], device=device)), last_only=True)
    graphs = DecodeGraphs(model, pool, capture=device.type == "cuda")
    lens = torch.full((batch,), prompt, dtype=torch.long, device=device)
    ids = torch.randint(3, model.vocab_size, (batch, 1), device=device)

    def step():
        nonlocal ids, lens
        logits = graphs.run(ids, 0, lens, live_slots=batch)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        lens = lens + 1

    step()  # captures this bucket's graph
    seconds = timed(lambda: [step() for _ in range(steps - 1)], device)
    return batch * (steps - 1) / seconds


# --- transformers ------------------------------------------------------------------------


@torch.no_grad()
def hf_prefill(hf, length: int, device) -> float:
    ids = torch.randint(3, hf.config.vocab_size, (1, length), device=device)

    def prefill():
        hf(ids, use_cache=True, logits_to_keep=1)

    prefill()  # warm-up at this length too, as plait's
    return length / median_seconds(prefill, device, reps=1)


@torch.no_grad()
def hf_decode(hf, batch: int, prompt: int, steps: int, device) -> float:
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt), device=device)
    out = hf(ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def loop():
        nonlocal cache, nxt
        for _ in range(steps - 1):
            out = hf(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    return batch * (steps - 1) / timed(loop, device)


# --- the run -------------------------------------------------------------------------------


def measure(label: str, fn, *args):
    """fn(*args), or the reason it could not run (out of memory, or a peer's error)."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"
    except Exception as exc:  # a peer's failure is a result, not a crash of the benchmark
        print(f"  {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", file=sys.stderr)
        return "error"


def peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fmt(value) -> str:
    if isinstance(value, str) or value is None:
        return value or "-"
    return f"{value:,.1f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def run_model(name: str, config: dict, args, device, bandwidth: float) -> None:
    hf, model = build(config, device)
    params = sum(p.numel() for p in model.parameters())
    step_bytes = weight_bytes_per_step(model)
    roofline = bandwidth / step_bytes  # batch-1 steps/s if only the weights' bytes counted
    print(
        f"\n== {name}: {params / 1e9:.2f} B parameters (bf16), {step_bytes / 2**30:.2f} GiB read per "
        f"batch-1 step -> roofline {roofline:,.1f} tok/s at {bandwidth / 1e9:,.0f} GB/s"
    )
    results: dict[str, dict[str, object]] = {}
    engines = [("plait", plait_prefill, plait_decode, model)]
    if not args.no_transformers:
        engines.append(("transformers", hf_prefill, hf_decode, hf))
    for engine, prefill, decode, m in engines:
        peak_reset(device)
        row = results[engine] = {}
        for length in args.prefill:
            row[f"prefill {length}"] = measure(f"{engine} prefill {length}", prefill, m, length, device)
        for batch in args.batches:
            steps = args.decode_steps if engine == "plait" else max(4, args.decode_steps // 4)
            row[f"decode b{batch}"] = measure(
                f"{engine} decode b{batch}", decode, m, batch, args.prompt, steps, device
            )
        row["peak GiB"] = peak(device)
    keys = list(results["plait"])
    width = max(len(k) for k in keys) + 2
    print(f"{'tok/s':<{width}}" + "".join(f"{e:>14}" for e in results) + f"{'plait/tf':>10}")
    for key in keys:
        cells = [results[e][key] for e in results]
        extra = ratio(cells[0], cells[1]) if len(cells) > 1 else "-"
        print(f"{key:<{width}}" + "".join(f"{fmt(c):>14}" for c in cells) + f"{extra:>10}")
    b1 = results["plait"].get(f"decode b{args.batches[0]}") if args.batches else None
    if isinstance(b1, float) and args.batches[0] == 1:
        print(f"plait batch-1 decode = {b1 / roofline:.1%} of the weight-bandwidth roofline")
    del hf, model
    peak_reset(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default=",".join(PUBLISHED), help=f"comma-separated: {', '.join(PUBLISHED)}"
    )
    parser.add_argument("--tiny", action="store_true", help="scaled-down dimensions (a smoke run; CPU works)")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row before decoding")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("engine_gpu.py needs a CUDA GPU (use --tiny for a scaled-down smoke run on CPU)")
        sys.exit(2)
    args.prefill = [256, 512] if args.tiny else [2048, 8192]
    args.batches = [1, 8] if args.tiny and device.type != "cuda" else [1, 8, 32, 64]
    if args.tiny:
        args.decode_steps, args.prompt = min(args.decode_steps, 8), min(args.prompt, 32)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}; copy bandwidth {bandwidth / 1e9:,.0f} GB/s; torch {torch.__version__}"
        + ("; TINY dimensions (smoke run)" if args.tiny else "")
    )
    for model_name in args.models.split(","):
        config = preset(model_name, tiny=args.tiny)
        run_model(model_name + (" (tiny)" if args.tiny else ""), config, args, device, bandwidth)


if __name__ == "__main__":
    main()
