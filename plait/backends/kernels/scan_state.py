"""What a Mamba-2 pass hands to the next one, shared by the PyTorch path and the kernels.

The SSD scan (`plait.backends.models.ssd` and its Triton twin `plait.backends.kernels.ssd`)
returns a `ScanResult`; the causal conv (`models.mamba2.CausalConv1d` and
`kernels.conv1d.causal_conv1d`) keeps its history with `conv_history`. Both live here, below
the models and the kernels, so the two paths share one definition and neither imports the other.
"""

from typing import NamedTuple

import torch


class ScanResult(NamedTuple):
    """Output of `ssd_chunk_scan`.

    `chunk_states[:, c]` is the state after chunk c; `chunk_ends[c]` says after how many of
    this pass's tokens that is (the last entry is the pass length, so the last chunk state is
    `final_state`; the others sit at absolute positions that are multiples of chunk_size).
    """

    y: torch.Tensor  # [b, T, h, p] fp32
    final_state: torch.Tensor  # [b, h, p, n] fp32
    chunk_states: torch.Tensor  # [b, chunks, h, p, n] fp32
    chunk_ends: list[int]


def conv_history(
    x: torch.Tensor, history: torch.Tensor | None, keep: int, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The conv state after a pass: per row, the `keep` (= kernel - 1) inputs ending at its
    last real one. x [B, C, T]; history [B, C, keep] or None (zeros); lengths [B] real inputs
    per row of a right-padded pass (None: all T) -> [B, C, keep] in x's dtype.

    A padded row's history must end at its last real input, not at the padding, or the next
    pass would continue from tokens the sequence never had. The PyTorch path and the Triton
    wrapper (`plait.backends.kernels.conv1d.causal_conv1d`) both call this, so they cannot disagree.
    """
    if history is None:
        history = x.new_zeros(x.shape[0], x.shape[1], keep)
    length = x.shape[-1]
    if lengths is None:  # every row ends at T: only the tail of x can be in the history
        window = torch.cat([history.to(x.dtype), x[:, :, max(0, length - keep) :]], dim=-1)
        return window[:, :, window.shape[-1] - keep :]
    # window = history + x along time; row r's entries ending at input n_r - 1 are window[n_r : n_r + keep]
    window = torch.cat([history.to(x.dtype), x], dim=-1)
    ends = lengths.to(x.device)[:, None] + torch.arange(keep, device=x.device)
    return window.gather(-1, ends[:, None, :].expand(-1, x.shape[1], -1))
