"""Compile plait's Triton kernels for a GPU this machine does not have, and report the builds.

    .venv/bin/python -m plait.backends.runtime.triton_aot                      # both published models, sm_90
    .venv/bin/python -m plait.backends.runtime.triton_aot --model nano-30b-a3b --arch 90

The kernels' CPU tests run them under Triton's interpreter, which executes each kernel's Python
and never invokes the compiler: a kernel can pass every interpreter test and still fail to
compile for a real GPU, spill registers to local memory, or ask for more shared memory than an
SM has. Triton's compiler itself needs no GPU. Given a target (sm_90: the H100 and H200) it
lowers a kernel to PTX and assembles it with the ptxas that ships with triton.

`compile_only(arch)` installs a Triton driver that only names that target. For as long as it
is active:
* every kernel launch compiles the kernel, exactly as a real launch would specialise it (same
  arguments, strides, dtypes and block sizes), and returns without running;
* `dispatch.forced()` sends CPU tensors down the kernel path.

`model_builds` runs a model's passes this way: a prompt, a continuation from mid-chunk, and
decode steps at several batch sizes. For each distinct build it reads back registers, local
memory (spills), shared memory and whether the GEMMs use tensor-core instructions. Outputs of
the kernels are never computed, so the model's numbers are garbage. Its shapes are not, and
shapes are all a build depends on.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from plait.backends.kernels import dispatch
from plait.backends.models.state import Batch
from plait.backends.runtime.state_pool import StatePool

SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376}
"""Most shared memory one block may use (bytes, with the opt-in carve-out), by compute capability."""

REGISTER_LIMIT = 255
"""Registers per thread that any NVIDIA GPU since Kepler allows."""


@dataclass(frozen=True)
class KernelBuild:
    """What ptxas made of one specialisation of a kernel."""

    kernel: str
    constants: dict[str, object] = field(hash=False)
    num_warps: int
    num_stages: int
    registers: int
    local_bytes: int
    """Per-thread local memory plus stack: register spills land here (0 when nothing spills)."""
    shared_bytes: int
    tensor_cores: str
    """"wgmma" (Hopper's warpgroup MMA), "mma" (mma.sync) or "" for a kernel without them."""

    def problems(self, arch: int) -> list[str]:
        """Why this build would be slow or fail to launch on the target (empty when fine)."""
        found = []
        if self.local_bytes:
            found.append(f"{self.local_bytes} bytes of local memory per thread (register spills)")
        if self.registers > REGISTER_LIMIT:
            found.append(f"{self.registers} registers per thread")
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and self.shared_bytes > limit:
            found.append(f"{self.shared_bytes} bytes of shared memory, over sm_{arch}'s {limit}")
        return found


def _resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the cubin's kernel, as cuobjdump reports them."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {key: int(value) for key, value in re.findall(r"([A-Z]+):(\d+)", out)}


def _build(kernel_name: str, constants: dict[str, object], compiled) -> KernelBuild:
    ptx, usage = compiled.asm["ptx"], _resources(compiled.asm["cubin"])
    tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else ""
    meta = compiled.metadata
    return KernelBuild(
        kernel_name,
        constants,
        meta.num_warps,
        meta.num_stages,
        usage["REG"],
        usage["LOCAL"] + usage["STACK"],
        meta.shared + usage["SHARED"],
        tensor_cores,
    )


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[list[KernelBuild]]:
    """Within this block, kernel launches compile for sm_`arch` and run nothing; the list it
    yields fills with one `KernelBuild` per distinct specialisation, in launch order."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if dispatch.interpreting():
        raise RuntimeError("compile_only needs the compiler: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    device_key = f"compile-only-sm{arch}"  # kernels cache builds per device: keep these apart

    class CompileOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls) -> bool:
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self) -> GPUTarget:
            return target

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("nothing runs under compile_only")

        def get_current_device(self) -> str:
            return device_key

        def get_current_stream(self, device: object = None) -> int:
            return 0

    builds: list[KernelBuild] = []
    seen: set[int] = set()
    launch = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        compiled = launch(self, *args, grid=grid, warmup=True, **kwargs)
        if id(compiled) not in seen:
            seen.add(id(compiled))
            builds.append(_build(self.fn.__name__, dict(kwargs), compiled))
        return compiled

    # DriverConfig.reset_active() would create the default driver, which fails without a GPU:
    # put back whatever was active (possibly nothing yet) by hand.
    previous = driver._active
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = compile_instead
    try:
        with dispatch.forced():
            yield builds
    finally:
        JITFunction.run = launch
        driver._active = previous


def zero_model(config: dict, dtype: torch.dtype):
    """A Nemotron-H model of this config with zero weights (dtypes as the checkpoint loader
    gives them), built without initialising anything twice."""
    from plait.backends.models.nemotron_h import NemotronHForCausalLM, param_dtype
    from plait.backends.models.nemotron_h_config import NemotronHConfig

    with torch.device("meta"):
        model = NemotronHForCausalLM(NemotronHConfig.from_dict(config))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    zeros = {name: torch.zeros(t.shape, dtype=param_dtype(name, dtype)) for name, t in tensors.items()}
    model.load_state_dict(zeros, strict=False, assign=True)
    if config.get("tie_word_embeddings"):
        model.lm_head.weight = model.embeddings.weight
    return model.fuse_projections().eval().requires_grad_(False)  # as registry.load serves it


@torch.no_grad()
def run_engine_passes(
    model, prompt: int = 300, decode_batches: tuple[int, ...] = (1, 8, 64, 256)
) -> StatePool:
    """The passes the engine launches: a fresh prompt, a 5-token continuation from mid-chunk,
    and a decode step at each batch size (CUDA-graph buckets), on the model's device.
    -> the pool, its first row at `prompt + 5` tokens."""
    dtype = model.embeddings.weight.dtype
    slots = max(decode_batches)
    pool = StatePool(
        model.state_specs(dtype), slots=slots, capacity=prompt + 8, max_length=model.context_length
    )
    ids = torch.zeros(1, prompt, dtype=torch.long)
    model(ids, Batch(pool, 0, torch.tensor([0])), last_only=True)
    model(ids[:, :5], Batch(pool, 0, torch.tensor([prompt])), last_only=True)
    for rows in decode_batches:
        model(torch.zeros(rows, 1, dtype=torch.long), Batch(pool, 0, torch.full((rows,), prompt + 5)))
    return pool


def model_builds(config: dict, dtype: torch.dtype = torch.bfloat16, arch: int = 90) -> list[KernelBuild]:
    """Every kernel build the engine's passes make for this model on sm_`arch`. No kernel
    sees the vocabulary, so it is cut to 1,024 entries to spare memory."""
    model = zero_model(config | dict(vocab_size=1024), dtype)
    with compile_only(arch) as builds:
        run_engine_passes(model)
    return builds


def main() -> None:
    from plait.backends.models.nemotron_h_presets import PUBLISHED, one_layer_per_kind, preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        choices=list(PUBLISHED),
        help="a published model's dimensions (default: all)",
    )
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument(
        "--layers",
        default=None,
        help="layer pattern to build (default: one layer of each kind the model has)",
    )
    args = parser.parse_args()
    for name in args.model or list(PUBLISHED):
        pattern = args.layers or one_layer_per_kind(name)
        builds = model_builds(preset(name, pattern=pattern), getattr(torch, args.dtype), args.arch)
        print(f"\n== {name} ({args.dtype}, layers {pattern!r}) for sm_{args.arch}: {len(builds)} builds")
        print(
            f"{'kernel':<24}{'warps':>6}{'stages':>7}{'regs':>6}{'local':>7}{'smem KiB':>10}"
            f"{'MMA':>7}  constants"
        )
        for b in builds:
            constants = " ".join(f"{k}={v}" for k, v in b.constants.items())
            print(
                f"{b.kernel:<24}{b.num_warps:>6}{b.num_stages:>7}{b.registers:>6}{b.local_bytes:>7}"
                f"{b.shared_bytes / 1024:>10.1f}{b.tensor_cores or '-':>7}  {constants}"
            )
            for problem in b.problems(args.arch):
                print(f"  !! {problem}")


if __name__ == "__main__":
    main()
