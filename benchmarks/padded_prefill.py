"""Prompts that arrive together on a hybrid Mamba model: one padded pass vs one row per pass.

    .venv/bin/python benchmarks/padded_prefill.py                       # 8 prompts of 20-60 tokens
    .venv/bin/python benchmarks/padded_prefill.py --lo 100 --hi 300 --model nano-30b-a3b

A Nemotron-H model at the tiny preset dimensions (`nemotron_presets`, random weights, fp32,
CPU) gets `--rows` prompts at once with max_tokens=1, so the time is their prefill. The same
engine runs them with `Scheduler.padded_passes` on (prompts right-padded into shared passes;
the Mamba layers keep the padding out of their state) and off (one row per multi-token pass),
the two interleaved so that drift in machine load hits both. It prints medians, the passes and
padding each made, and the ratio; the outputs of both modes must be the same tokens.
"""

import argparse
import statistics
import time

import torch
from engine_gpu import randomise

from plait.backends.models.nemotron_h import NemotronHForCausalLM
from plait.backends.models.nemotron_h_config import NemotronHConfig
from plait.backends.models.nemotron_h_presets import PUBLISHED, preset
from plait.backends.runtime.engine import Engine


class ByteTokenizer:
    """Enough of a tokenizer for token-id prompts: the engine only decodes what it generates."""

    stop_token_ids = frozenset({2})

    def decode(self, ids: list[int]) -> str:
        return bytes(i % 256 for i in ids).decode("latin-1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nano-9b-v2", choices=list(PUBLISHED))
    parser.add_argument("--lo", type=int, default=20, help="shortest prompt (tokens)")
    parser.add_argument("--hi", type=int, default=60, help="longest prompt (tokens)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = NemotronHConfig.from_dict(preset(args.model, tiny=True))
    model = NemotronHForCausalLM(cfg).eval().requires_grad_(False)
    randomise(model, 0)
    model.fuse_projections()  # as registry.load serves it
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.lo, args.hi + 1, (args.rows,), generator=g).tolist()
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    engine = Engine(model, ByteTokenizer(), "bench", "nemotron_h", prefix_cache=False)
    print(
        f"{args.model} (tiny, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, fp32), "
        f"{torch.get_num_threads()} threads, prompts of {lengths} tokens"
    )
    try:
        engine.generate(prompts[0][:16], max_tokens=1)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        outputs, stats = {}, {}
        for _ in range(args.repeats):
            for padded in (False, True):
                engine.scheduler.padded_passes = padded
                before = engine.stats()
                started = time.perf_counter()
                requests = [engine.submit(p, max_tokens=1) for p in prompts]
                outputs[padded] = [r.wait().token_ids for r in requests]
                times[padded].append(time.perf_counter() - started)
                stats[padded] = engine.stats().since(before)
    finally:
        engine.close()
    for padded, label in ((False, "one row per pass"), (True, "padded passes")):
        s = stats[padded]
        print(
            f"{label:<17} median {statistics.median(times[padded]) * 1e3:7.1f} ms  "
            f"({s.multi_token_passes} passes, {s.multi_token_tokens} tokens + "
            f"{s.multi_token_padding} padding)"
        )
    if outputs[True] != outputs[False]:
        raise SystemExit("the two modes generated different tokens")
    print(
        f"speed-up of padded passes: {statistics.median(times[False]) / statistics.median(times[True]):.2f}x"
    )


if __name__ == "__main__":
    main()
