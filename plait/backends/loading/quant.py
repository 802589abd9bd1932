"""Weight-only int4 / int8 linear layers for CPU decode.

One-token decode on CPU is bound by memory bandwidth: every step reads every weight once, so a
135M-parameter model in fp32 moves 540 MB per token. PyTorch ships CPU kernels that multiply
bf16 activations by packed low-bit weights (AVX-512 / AVX512-BF16 here), which read 4-8x less:

  * `Int4Linear`: asymmetric 4-bit groups along the input dimension (default 32, the GGUF Q4_1
    block), one bf16 scale and zero point per group; w = (q - 8) * scale + zero, q in 0..15.
    Quantising weights that were themselves Q4_1 (min/max per 32-block) recovers their grid, so
    the GGUF's 4-bit weights run as they are, up to bf16 rounding of the scales.
  * `Int8Linear`: symmetric int8 per output channel. Used for whole models (`"int8"`), and for
    the output head under `"int4"`: the head is read once per token too, and 4 bits there cost
    more accuracy than they save.

Activations are bf16 (the kernels are slow on fp32 inputs); norms and SSM state keep their own
fp32 arithmetic.

The packed kernels unpack the weights again for every input row, so their time grows with the
rows: a dense bf16 matmul is 1.4x faster at 8 rows and 2-2.5x at 32-256 (this machine's cores).
A layer therefore keeps the bf16 weight it was made from (`dense`) when the model's linear layers
are small enough to hold twice (`DENSE_COPY_LIMIT_BYTES`), and runs it for prompt tokens: in
passes under `prompt_pass()`, which the scheduler opens for prompt chunks (and for the tokens a
grammar forces before anything is sampled, a prefix known with the prompt). Generated tokens
(sampled, forced later, drafted) always run the packed kernel, whatever the batch: which weights
compute a token depends on what the token is, never on what else shares its pass.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from plait.backends.models.passes import in_prompt_pass

SCHEMES = ("int4", "int8")


DENSE_COPY_LIMIT_BYTES = 2 * 2**30
"""Linear weights (bf16) up to this size are kept beside their packed form for prompt passes:
SmolLM2-135M's 270 MB is; a 9B model's 18 GB on a CPU is not (it runs packed only)."""


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation {scheme!r}: expected one of {', '.join(SCHEMES)}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16)


def _rows_alike(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) where a row's result is the same bits whatever the other rows.

    A bf16 matmul of one row takes another kernel than one of several (oneDNN's matrix-vector
    path), whose sums round differently: SmolLM2's down projection gave a prompt's last token
    other outputs in a one-token pass (a prompt whose prefix the cache restored) than in the
    pass of its whole prompt, and the greedy answer changed 17 tokens later. A lone row is
    computed as two, itself twice: the several-row kernel's per-row sums do not depend on how
    many rows share the call (checked on this model's shapes at 2 to 1,024 rows, 1 and 2 threads)."""
    if x.shape[0] != 1:
        return F.linear(x, weight, bias)
    return F.linear(x.expand(2, -1).contiguous(), weight, bias)[:1]


class _PackedLinear(nn.Module):
    """What the int4 and int8 layers share: the dense weight for prompt passes, the bias."""

    out_features: int
    dense: torch.Tensor | None
    bias: torch.Tensor | None

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flat(x)
        if self.dense is not None and in_prompt_pass():
            return _rows_alike(flat, self.dense, self.bias).view(*x.shape[:-1], self.out_features)
        y = self._packed_mm(flat)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def _dense(weight: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The bf16 weight a layer keeps for prompt passes (the loaded tensor itself when it is
    bf16 already: a tied output head then shares the embedding's memory)."""
    return weight.detach().to(torch.bfloat16) if keep else None


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().to(torch.bfloat16)


class Int4Linear(_PackedLinear):
    """y = x @ dequant(W).T (+ bias), W stored as packed nibbles with per-group scale/zero."""

    PACKED = ("packed", "scales_and_zeros")
    """The buffers `pack` computes (what the quantised-weights cache stores)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in/group, out, 2] bf16
        self.register_buffer("bias", bias)
        self.register_buffer("dense", dense)

    @staticmethod
    def fits(weight: torch.Tensor, group_size: int) -> bool:
        out_features, in_features = weight.shape
        return in_features % group_size == 0 and out_features % 16 == 0

    @staticmethod
    def pack(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        out_features, in_features = weight.shape
        groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        zero = low + 8 * scale
        scales_and_zeros = torch.cat([scale, zero], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
        return {
            "packed": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
            "scales_and_zeros": scales_and_zeros,
        }

    @staticmethod
    def fits_packed(weight: torch.Tensor, group_size: int, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether cached `tensors` have the shapes `pack(weight, group_size)` gives."""
        out_features, in_features = weight.shape
        packed, scales = tensors["packed"], tensors["scales_and_zeros"]
        return packed.numel() * packed.element_size() * 2 == weight.numel() and scales.shape == (
            in_features // group_size,
            out_features,
            2,
        )

    @classmethod
    def from_packed(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        tensors: dict[str, torch.Tensor],
        keep_dense: bool,
    ) -> "Int4Linear":
        """The layer for `weight` from its `pack`ed tensors (computed now or read from a cache)."""
        out_features, in_features = weight.shape
        packed, scales_and_zeros = tensors["packed"], tensors["scales_and_zeros"]
        dense = _dense(weight, keep_dense)
        return cls(in_features, out_features, group_size, packed, scales_and_zeros, _bias(bias), dense)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 32,
        keep_dense: bool = False,
    ) -> "Int4Linear":
        return cls.from_packed(weight, bias, group_size, cls.pack(weight, group_size), keep_dense)

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(x, self.packed, self.group_size, self.scales_and_zeros)


class Int8Linear(_PackedLinear):
    """y = x @ (q * scale[:, None]).T (+ bias), q int8 symmetric per output channel."""

    PACKED = ("qweight", "scales")

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", weight)  # not `weight`: nothing may take it for a float matrix
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.register_buffer("dense", dense)

    @staticmethod
    def pack(weight: torch.Tensor, group_size: int = 0) -> dict[str, torch.Tensor]:
        """(`group_size` is unused: the scales are per output channel.)"""
        w = weight.detach().float()
        scales = (w.abs().amax(-1) / 127).clamp(min=1e-8)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales.to(torch.bfloat16)}

    @staticmethod
    def fits_packed(weight: torch.Tensor, group_size: int, tensors: dict[str, torch.Tensor]) -> bool:
        return tensors["qweight"].shape == weight.shape and tensors["scales"].shape == weight.shape[:1]

    @classmethod
    def from_packed(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        tensors: dict[str, torch.Tensor],
        keep_dense: bool,
    ) -> "Int8Linear":
        return cls(tensors["qweight"], tensors["scales"], _bias(bias), _dense(weight, keep_dense))

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_dense: bool = False
    ) -> "Int8Linear":
        return cls.from_packed(weight, bias, 0, cls.pack(weight), keep_dense)

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)


def quantize(
    model: nn.Module,
    scheme: str,
    group_size: int = 32,
    head_name: str = "lm_head",
    keep_dense: bool | None = None,
    cache: Path | None = None,
) -> nn.Module:
    """Replace the model's `nn.Linear` layers in place (load the model in bf16 first: the rest
    of it, norms, embeddings and fp32 SSM parameters, stays as loaded).

    Under "int4" a layer whose shape the packed kernel cannot take (input size not a multiple of
    `group_size`, output size not a multiple of 16) and the output head get int8 instead.
    `keep_dense` (None: when the layers' bf16 weights total at most `DENSE_COPY_LIMIT_BYTES`)
    keeps each layer's bf16 weight for prompt passes (`prompt_pass`). `cache`: a safetensors
    file of the packed tensors, read (memory-mapped) when it holds every layer's and written
    when it does not: packing SmolLM2 takes seconds, reading it a fraction of one.
    """
    check_scheme(scheme)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if keep_dense is None:
        keep_dense = sum(2 * m.weight.numel() for _, m in linears) <= DENSE_COPY_LIMIT_BYTES
    cached = _read_cache(cache)
    packed_state: dict[str, torch.Tensor] = {}
    computed = False
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        use_int4 = scheme == "int4" and name != head_name and Int4Linear.fits(linear.weight, group_size)
        kind = Int4Linear if use_int4 else Int8Linear
        tensors = {key: cached.get(f"{name}.{key}") for key in kind.PACKED}
        fresh = any(t is None for t in tensors.values())
        if fresh or not kind.fits_packed(linear.weight, group_size, tensors):
            tensors, computed = kind.pack(linear.weight, group_size), True
        packed_state |= {f"{name}.{key}": tensor for key, tensor in tensors.items()}
        setattr(parent, child, kind.from_packed(linear.weight, linear.bias, group_size, tensors, keep_dense))
    if cache is not None and computed:
        tmp = cache.with_name(cache.name + ".tmp")
        save_file(packed_state, str(tmp))
        tmp.replace(cache)
    return model


def _read_cache(cache: Path | None) -> dict[str, torch.Tensor]:
    """The cached packed tensors, or none when there is no readable cache (it is then rewritten).

    Each is copied out of the file's mapping: safetensors places a tensor at any 8-byte offset,
    and the packed kernels read their weights with aligned vector loads (the int8 kernel
    crashed on a mapped head with several rows)."""
    if cache is None or not cache.exists():
        return {}
    try:
        return {name: tensor.clone() for name, tensor in load_file(str(cache)).items()}
    except Exception:  # a damaged or foreign file: pack again
        return {}
