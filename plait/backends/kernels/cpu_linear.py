"""Linear layers for a few rows on CPU (fp32): the shape of decode batches and of speculative
decoding's verify passes.

Replaces `torch.nn.functional.linear(x, weight, bias)` (weight [N, K]). For 2 to 4 rows, MKL's
sgemm on x @ weight.T runs a row-by-row kernel that reads the weight once per row; (weight @
x.T).T reads it once. Measured on this machine's 2 AVX-512 cores for SmolLM2's shapes:
576 -> 3072 at 2/3/4 rows 285/431/362 us -> 176/277/212 us, 1536 -> 576 121/175/178 us ->
97/154/108 us; for the 49,152-wide vocabulary projection the gain holds up to 8 rows (2/4/6
rows 23/17/25 ms -> 4/5/7 ms). The rule is fixed by shape, not timed, so every engine in every
run computes the same sums.
"""

import torch
import torch.nn.functional as F
from torch import nn

WIDE = 8192
"""Output features from which a layer counts as wide (the vocabulary projection)."""


def transposed_rows(rows: int, out_features: int) -> bool:
    """Whether (weight @ x.T).T beats sgemm's x @ weight.T for `rows` rows."""
    return 2 <= rows <= (8 if out_features >= WIDE else 4)


class FewRowLinear(nn.Linear):
    """`nn.Linear` that computes a few rows as (weight @ x.T).T on CPU (see the module doc).
    Loaded fp32 layers become this class (`CausalLM.fuse_projections`); their parameters and
    names are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        weight = self.weight
        if (
            x.device.type != "cpu"
            or weight.dtype != torch.float32
            or not transposed_rows(rows, weight.shape[0])
        ):
            return F.linear(x, weight, self.bias)
        out = torch.mm(weight, x.reshape(rows, -1).t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().reshape(*x.shape[:-1], weight.shape[0])
