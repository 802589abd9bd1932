"""Loading ModelOpt FP8 / NVFP4 checkpoints against the bf16 checkpoint of the same weights.

    .venv/bin/python benchmarks/modelopt_load.py                   # tiny and x16 models, dense and MoE
    .venv/bin/python benchmarks/modelopt_load.py --scales 1 --repeats 3

Checkpoints are the tests' tiny Nemotron-H models (tests/modelopt_fixtures.py), optionally widened
`--scales` times (hidden size, MLP/expert widths, Mamba and attention heads), written three ways
from one set of weights: bf16, FP8 (every linear layer but the head) and NVFP4 (the same layers).
Each is loaded by `load_nemotron_h` into each of `--dtypes`, in a fresh process (after one
load of a tiny checkpoint, which pays the one-off imports) on `--threads` torch threads (default
1: on a shared 2-core machine, 2-thread load times varied up to 10x between runs), reporting:
  * load time: median of `--repeats` loads (the files are in the page cache: this is parsing,
    dequantizing and copying, not disk reads);
  * RssAnon after the first load minus before it: the loaded model's private memory, with the
    heap pages malloc kept of the load's freed intermediates; then the same after `malloc_trim`
    (`release_free_memory`, which plait serve calls every few steps): the model alone;
  * peak RSS (VmHWM) minus the RSS before: the transient peak, including the pages of the
    memory-mapped safetensors files.
Ratios are against the bf16 checkpoint in the same run. plait dequantizes at load, so the loaded
model is the same size whatever the file holds: the quantized formats save disk, not RAM. A bf16
checkpoint loaded into bf16 is not even copied: its tensors stay views of the memory-mapped file
(no private memory, pages read when first used), so its load time is not comparable.
Benchmarks are not tests: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ("bf16", "FP8", "NVFP4")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(directory: str, warmup: str, dtype: str, repeats: int, threads: int) -> None:
    """Runs in a fresh process: load `directory` `repeats` times, print one JSON line.

    One load of the tiny `warmup` checkpoint first pays the one-off costs (lazy imports, torch's
    first meta-device model: ~3 s) without leaving freed memory that the measured load could
    reuse unseen."""
    import gc

    import torch

    from plait.backends.loading.nemotron_h import load_nemotron_h
    from plait.backends.runtime.host_memory import release_free_memory

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    load_nemotron_h(warmup, torch_dtype, "cpu")
    gc.collect()
    anon, rss = _status_kb("RssAnon"), _status_kb("VmRSS")
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        model = load_nemotron_h(directory, torch_dtype, "cpu")
        seconds.append(time.perf_counter() - start)
        if i == 0:
            loaded_anon, peak = _status_kb("RssAnon") - anon, _status_kb("VmHWM") - rss
            release_free_memory()
            trimmed_anon = _status_kb("RssAnon") - anon
        del model
        gc.collect()
    print(
        json.dumps({"seconds": seconds, "anon_kb": loaded_anon, "trimmed_kb": trimmed_anon, "peak_kb": peak})
    )


def write_checkpoints(root: Path, kind: str, scale: int) -> dict[str, Path]:
    """The same seeded weights as bf16, FP8 and NVFP4 checkpoints (the head stays bf16)."""
    from tests.modelopt_fixtures import CONFIG_FILE, QUANT_FILE, write_modelopt
    from tests.nemotron_fixtures import COMMON, CONFIGS

    widen = ("hidden_size", "intermediate_size", "mamba_num_heads", "num_attention_heads")
    widen += ("num_key_value_heads", "moe_intermediate_size", "moe_shared_expert_intermediate_size")
    base = COMMON | CONFIGS[kind]
    overrides = {k: base[k] * scale for k in widen if k in base}
    out = {}
    for fmt in FORMATS:
        quantized = fmt != "bf16"
        written = write_modelopt(
            root / f"{kind}-x{scale}-{fmt}",
            kind,
            lambda m, fmt=fmt, quantized=quantized: fmt if quantized and m != "lm_head" else None,
            algo=fmt if quantized else None,
            exclude=["lm_head"] if quantized else [],
            files=(QUANT_FILE, CONFIG_FILE) if quantized else (),
            seed=0,
            **overrides,
        )
        out[fmt] = written.directory
    return out


def measure(directory: Path, warmup: Path, dtype: str, repeats: int, threads: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(directory), str(warmup), dtype, str(repeats), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", default="dense,moe")
    parser.add_argument("--scales", default="1,16", help="width multipliers of the tiny test models")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="run dtypes to load into")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per load (1: steadier on a shared machine)"
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:3], int(args.child[3]), int(args.child[4]))
        return

    print(
        f"load_nemotron_h on CPU ({os.cpu_count()} cores, {args.threads} torch threads), median of "
        f"{args.repeats} loads; x: ratio to bf16"
    )
    print(
        f"{'checkpoint':<11}{'params':>8}{'into':>10}{'format':>7}{'disk MB':>9}{'x':>6}"
        f"{'load ms':>9}{'x':>6}{'RssAnon MB':>11}{'x':>6}{'trimmed':>8}{'x':>6}{'peak MB':>9}{'x':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        warmup = write_checkpoints(Path(tmp) / "warmup", "dense", 1)["bf16"]
        for kind in args.kinds.split(","):
            for scale in (int(s) for s in args.scales.split(",")):
                dirs = write_checkpoints(Path(tmp), kind, scale)
                params = disk_bytes(dirs["bf16"]) / 2  # bf16: two bytes a parameter
                for dtype in args.dtypes.split(","):
                    rows = {
                        fmt: measure(d, warmup, dtype, args.repeats, args.threads) for fmt, d in dirs.items()
                    }
                    base = rows["bf16"]
                    for fmt, r in rows.items():
                        disk, base_disk = disk_bytes(dirs[fmt]), disk_bytes(dirs["bf16"])
                        ms, base_ms = (statistics.median(x["seconds"]) * 1e3 for x in (r, base))
                        print(
                            f"{kind + ' x' + str(scale):<11}{params / 1e6:>7.2f}M{dtype:>10}{fmt:>7}"
                            f"{disk / 1e6:>9.2f}{ratio(disk, base_disk)}{ms:>9.1f}{ratio(ms, base_ms)}"
                            f"{r['anon_kb'] / 1e3:>11.1f}{ratio(r['anon_kb'], base['anon_kb'], 1000)}"
                            f"{r['trimmed_kb'] / 1e3:>8.1f}{ratio(r['trimmed_kb'], base['trimmed_kb'], 1000)}"
                            f"{r['peak_kb'] / 1e3:>9.1f}{ratio(r['peak_kb'], base['peak_kb'], 1000)}"
                        )


def ratio(value: float, base: float, floor: float = 0.0) -> str:
    """`value / base` in a 6-wide column, or "-" when the base is at most `floor`: memory under
    1 MB, as for a bf16 checkpoint loaded into bf16, whose weights stay memory-mapped."""
    return f"{value / base:>6.2f}" if base > floor else f"{'-':>6}"


if __name__ == "__main__":
    main()
