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
fp32 arithmetic. Large multi-token passes (prefill) are slower through the int4 kernel than a
dense bf16 matmul would be; the trade is made for decode, which is where the time goes.
"""

import torch
from torch import nn

SCHEMES = ("int4", "int8")


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation {scheme!r}: expected one of {', '.join(SCHEMES)}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16)


class Int4Linear(nn.Module):
    """y = x @ dequant(W).T (+ bias), W stored as packed nibbles with per-group scale/zero."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in/group, out, 2] bf16
        self.register_buffer("bias", bias)

    @staticmethod
    def fits(weight: torch.Tensor, group_size: int) -> bool:
        out_features, in_features = weight.shape
        return in_features % group_size == 0 and out_features % 16 == 0

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32
    ) -> "Int4Linear":
        out_features, in_features = weight.shape
        groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        zero = low + 8 * scale
        scales_and_zeros = torch.cat([scale, zero], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(
            in_features,
            out_features,
            group_size,
            packed,
            scales_and_zeros,
            None if bias is None else bias.detach().to(torch.bfloat16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            _flat(x), self.packed, self.group_size, self.scales_and_zeros
        )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T (+ bias), q int8 symmetric per output channel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", weight)  # not `weight`: nothing may take it for a float matrix
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        w = weight.detach().float()
        scales = (w.abs().amax(-1) / 127).clamp(min=1e-8)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scales.to(torch.bfloat16), None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(_flat(x), self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize(model: nn.Module, scheme: str, group_size: int = 32, head_name: str = "lm_head") -> nn.Module:
    """Replace the model's `nn.Linear` layers in place (load the model in bf16 first: the rest
    of it, norms, embeddings and fp32 SSM parameters, stays as loaded).

    Under "int4" a layer whose shape the packed kernel cannot take (input size not a multiple of
    `group_size`, output size not a multiple of 16) and the output head get int8 instead.
    """
    check_scheme(scheme)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        use_int4 = scheme == "int4" and name != head_name and Int4Linear.fits(linear.weight, group_size)
        replacement = (
            Int4Linear.from_weight(linear.weight, linear.bias, group_size)
            if use_int4
            else Int8Linear.from_weight(linear.weight, linear.bias)
        )
        setattr(parent, child, replacement)
    return model
