"""The GPU benchmark and the kernel build report run end to end (on CPU: `--tiny`, and builds
for sm_90), so a GPU session spends its minutes measuring, not fixing the scripts."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from plait.backends.kernels import dispatch

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_engine_gpu_tiny_measures_both_engines():
    out = run("benchmarks/engine_gpu.py", "--tiny", "--models", "nano-30b-a3b")
    for row in ("prefill 256", "prefill 512", "decode b1", "decode b8"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert re.search(r"[\d,]+\.\d\s+[\d,]+\.\d\s+\d+\.\d\dx$", line), line  # plait, transformers, ratio
    assert re.search(r"batch-1 decode = [\d.]+% of the weight-bandwidth roofline", out)


@pytest.mark.slow
@pytest.mark.skipif(not dispatch.AVAILABLE, reason="triton is not installed")
def test_triton_aot_report_lists_every_build():
    out = run("-m", "plait.backends.runtime.triton_aot", "--model", "nano-9b-v2", "--layers", "M*")
    assert "for sm_90" in out and "!!" not in out  # no build with a problem
    for kernel in ("_chunk_output_kernel", "_state_update_kernel", "_attention_split_kernel"):
        assert re.search(rf"^{kernel}\s+\d+\s+\d+\s+\d+\s+0\s", out, re.M), kernel  # 0 bytes spilled
