"""A Llama model's generated-token passes as one C call on AVX-512 CPUs (`cpu_decode.c`).

Replaces `LlamaForCausalLM.forward` (plait/backends/models/llama.py) for passes of generated
tokens: decode steps, forced spans and speculative verify passes. At one token a row, PyTorch
spends most of a 135M model's step launching ~500 small ops (casts, norms, rotary, the packed
matmuls one by one); the C pass runs the layers in one OpenMP team, reads each 4-bit matrix once
per pass with VNNI int8 dot products, and keeps the residual stream in fp32. What it computes
is described at the top of the C file; it is bitwise independent of the batch's shape. The same
library holds the attention of the model's bf16 prompt passes (`LlamaDecodeKernel.prompt_attention`),
summed per token in one order, so a prompt token's result does not depend on the pass either.

The library is compiled on first use with the machine's C compiler (gcc or cc, as Python's own
extensions are) into plait's cache, named by the source's hash, and loaded with ctypes. Where
there is no compiler, no AVX-512 VNNI, or the build fails, `library()` returns None and the
model keeps its PyTorch path: nothing else changes.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
BLOCK = 32
"""Weights and activations are quantised in blocks of 32 inputs (GGUF's Q4_1 block)."""
FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c")
"""The CPU features the kernel is built for (as /proc/cpuinfo names them)."""
COMPILE = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cpu_supported() -> bool:
    """An x86-64 Linux CPU with the AVX-512 features the kernel uses."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return all(flag in flags for flag in FLAGS)


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def library(build_dir: Path) -> ctypes.CDLL | None:
    """The compiled kernel (built into `build_dir` on first use), or None where it cannot run.

    Set `PLAIT_CPU_DECODE=0` to keep every pass on PyTorch (the kernel's own tests compare the two).
    """
    global _library, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("PLAIT_CPU_DECODE", "1") == "0" or not cpu_supported():
            return None
        cc = compiler()
        if cc is None:
            return None
        digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE).encode()).hexdigest()[:16]
        target = build_dir / f"cpu_decode-{digest}.so"
        if not target.exists() and not _build(cc, target):
            return None
        _library = _bind(ctypes.CDLL(str(target)))
        return _library


def reset() -> None:
    """Forget the loaded library's verdict (tests toggle `PLAIT_CPU_DECODE`)."""
    global _library, _tried
    with _lock:
        _library, _tried = None, False


def _build(compiler: str, target: Path) -> bool:
    """Compile into a temporary file beside `target`, then rename: concurrent first uses and an
    interrupted build never leave a half-written library under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = [compiler, *COMPILE, "-fopenmp", "-fPIC", "-shared", "-o", str(partial), str(SOURCE), "-lm"]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        partial.replace(target)
        return True
    except (OSError, subprocess.SubprocessError):
        partial.unlink(missing_ok=True)
        return False


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.plait_llama_new.argtypes = [p, f, p]
    lib.plait_llama_new.restype = p
    lib.plait_llama_free.argtypes = [p]
    lib.plait_llama_layers.argtypes = [p, p, i, i, p, p, p, i, i, i]
    lib.plait_llama_layers.restype = i
    lib.plait_llama_head.argtypes = [p, p, i, p, i]
    lib.plait_prompt_attention.argtypes = [p, p, p, p, i, i, i, i, i, i, p, i]
    lib.plait_prompt_attention.restype = i
    return lib


def pack_q4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """[n, k] weight -> the kernel's 4-bit form: per 32-block min m and step d = (max - min) / 15,
    both fp16 (as GGUF stores them: a decode step reads 17% fewer bytes than with fp32), and
    q = round((w - m) / d); per pair of blocks, byte j holds q[2p][j] | q[2p+1][j] << 4.
    On weights that were Q4_1 (the GGUF's), this recovers the file's own grid."""
    n, k = weight.shape
    if k % (2 * BLOCK):
        raise ValueError(f"the kernel's 4-bit matrices need inputs in multiples of {2 * BLOCK}, not {k}")
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    low, high = blocks.amin(-1), blocks.amax(-1)
    step = (
        ((high - low) / 15).clamp(min=1e-7).half()
    )  # fp16's smallest normal is 6e-5: 1e-7 is subnormal, > 0
    low = low.half()
    q = ((blocks - low.float()[..., None]) / step.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    pairs = q.reshape(n, k // (2 * BLOCK), 2, BLOCK)
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, k // 2)
    return {"nibbles": nibbles.contiguous(), "scales": step.contiguous(), "mins": low.contiguous()}


def pack_q8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """[n, k] weight -> the kernel's 8-bit head: per 32-block scale amax / 127 (fp16, as GGUF
    stores it), q = round(w / scale) stored as q + 128 (VNNI multiplies unsigned bytes by signed
    ones). On a Q8_0 weight (the GGUF's head) this recovers the file's grid."""
    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    scale = (blocks.abs().amax(-1) / 127).clamp(min=1e-7).half()
    q = (blocks / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int16) + 128
    return {"head": q.to(torch.uint8).reshape(n, k).contiguous(), "head_scales": scale.contiguous()}


def unpack_q4(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The [n, k] fp32 weight `pack_q4` stands for (the tests' reference)."""
    nibbles = tensors["nibbles"]
    n, half = nibbles.shape
    pairs = nibbles.reshape(n, half // BLOCK, 1, BLOCK)
    q = torch.cat([pairs & 15, pairs >> 4], dim=2).reshape(n, -1, BLOCK).float()
    scales, mins = tensors["scales"].float(), tensors["mins"].float()
    return (q * scales[..., None] + mins[..., None]).reshape(n, 2 * half)


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    eps: float

    def fits(self) -> bool:
        """The sizes the kernel's vector loops assume."""
        return (
            self.hidden % (2 * BLOCK) == 0
            and self.intermediate % (2 * BLOCK) == 0
            and (self.heads * self.head_dim) % (2 * BLOCK) == 0
            and self.head_dim % 32 == 0
            and self.head_dim <= 128
            and self.heads % self.kv_heads == 0
        )


LAYER_MATRICES = ("qkv", "o", "gate_up", "down")
"""Each layer's 4-bit matrices, in the order the C side reads them."""


class LlamaDecodeKernel:
    """The C model handle and the tensors it points into (kept alive here).

    `tensors`: "cos"/"sin" [max_positions, head_dim/2] fp32, "final_norm" fp32, "head" uint8
    [vocab, hidden] and "head_scales" fp16 [vocab, hidden/32] (`pack_q8`); per layer l,
    f"{l}.attn_norm", f"{l}.mlp_norm" and f"{l}.{matrix}.{nibbles|scales|mins}" for each of
    `LAYER_MATRICES`.
    """

    def __init__(self, lib: ctypes.CDLL, shape: LlamaShape, tensors: dict[str, torch.Tensor]):
        self.lib, self.shape = lib, shape
        self.tensors = {name: t.contiguous() for name, t in tensors.items()}
        names = ["cos", "sin", "final_norm", "head", "head_scales"]
        for layer in range(shape.layers):
            names += [f"{layer}.attn_norm", f"{layer}.mlp_norm"]
            names += [f"{layer}.{m}.{part}" for m in LAYER_MATRICES for part in ("nibbles", "scales", "mins")]
        pointers = (ctypes.c_void_p * len(names))(*(self.tensors[name].data_ptr() for name in names))
        dims = (ctypes.c_int * 8)(
            shape.layers,
            shape.hidden,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            shape.intermediate,
            shape.vocab,
            shape.max_positions,
        )
        self.handle = lib.plait_llama_new(dims, shape.eps, pointers)

    def __del__(self) -> None:
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.lib.plait_llama_free(handle)

    def layers(
        self,
        x: torch.Tensor,
        cache_lens: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        first_slot: int,
    ) -> torch.Tensor:
        """x [rows, steps, hidden] fp32 embeddings -> hidden states (in place); writes each
        token's K/V into `keys`/`values` ([slots, kv_heads, capacity, head_dim] bf16 per layer)."""
        rows, steps, _ = x.shape
        x = x.contiguous()
        lens = cache_lens.to(torch.int64).contiguous()
        key_ptrs = (ctypes.c_void_p * len(keys))(*(k.data_ptr() for k in keys))
        value_ptrs = (ctypes.c_void_p * len(values))(*(v.data_ptr() for v in values))
        capacity = keys[0].shape[2]
        status = self.lib.plait_llama_layers(
            self.handle,
            x.data_ptr(),
            rows,
            steps,
            lens.data_ptr(),
            key_ptrs,
            value_ptrs,
            first_slot,
            capacity,
            torch.get_num_threads(),
        )
        if status != 0:
            raise ValueError(f"a pass past the cache's {capacity} positions or the model's context")
        return x

    def prompt_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache_lens: torch.Tensor
    ) -> torch.Tensor:
        """Attention of a prompt pass's queries `q` [rows, heads, steps, head_dim] over `keys`
        and `values` ([rows, kv_heads, capacity, head_dim] bf16, the pass's slots, this pass's
        tokens already written at cache_lens[r] ..) -> q's shape and dtype. Each token's output
        is summed in one order whatever the pass's split, batch and padding (`cpu_decode.c`)."""
        rows, heads, steps, head_dim = q.shape
        query = q.float().contiguous()
        out = torch.empty_like(query)
        lens = cache_lens.to(torch.int64).contiguous()
        status = self.lib.plait_prompt_attention(
            query.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            lens.data_ptr(),
            rows,
            steps,
            heads,
            keys.shape[1],
            head_dim,
            keys.shape[2],
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise ValueError(f"a prompt pass past the cache's {keys.shape[2]} positions")
        return out.to(q.dtype)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] fp32 -> [rows, vocab] fp32 logits (final norm, then the int8 head)."""
        hidden = hidden.contiguous()
        rows = hidden.shape[0]
        logits = torch.empty(rows, self.shape.vocab)
        self.lib.plait_llama_head(
            self.handle, hidden.data_ptr(), rows, logits.data_ptr(), torch.get_num_threads()
        )
        return logits
