"""The Mamba-2 mixer: in_proj -> causal conv1d -> SSD -> gated grouped RMSNorm -> out_proj.

Per sequence it keeps two fixed-size states: the last `conv_kernel - 1` inputs of the causal
convolution (model dtype) and the SSM state `[heads, head_dim, state_size]` (fp32 by default).
Any pass can continue from them: a prompt fed in chunks gives the same result as one pass, and
a one-token step gives the same result as a full forward (up to the dt clamp, see `DtClamp`).

A row whose `cache_len` is 0 starts from zero state whatever its slot held before, so a slot
does not have to be cleared between sequences.

On CUDA (with triton) each step runs as a Triton kernel from `plait.backends.kernels` (the twins of
this one; this file's PyTorch code is their reference and the CPU path. A one-token step on
the kernels does no host-side work at all (new rows are zero-started inside the kernels), so
it can be captured in a CUDA graph.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.backends.kernels.dispatch import use_kernels
from plait.backends.kernels.scan_state import conv_history
from plait.backends.models.ssd import ssd_chunk_scan, ssd_step
from plait.backends.models.state import LayerState, StateSpec


@dataclass(frozen=True)
class DtClamp:
    """Where dt = softplus(dt_raw + dt_bias) is clamped to [low, high].

    The references disagree. transformers 5.23 clamps dt >= `time_step_min` (ignoring the
    config's `time_step_limit`) in its chunked scan, i.e. for every multi-token pass and for the
    first pass of a sequence, but not in its one-token decode update; vLLM clamps nowhere (its
    limit is (0, inf)). So transformers' own incremental decode can differ from its full
    forward when dt < time_step_min. `in_scan` covers passes that use the chunked scan (any pass
    with T > 1, and a row's first token); `in_step` covers one-token steps continuing a
    sequence.
    """

    low: float = 0.0
    high: float = math.inf
    in_scan: bool = False
    in_step: bool = False

    MODES = ("transformers", "none", "limit")

    @classmethod
    def named(
        cls, mode: str, time_step_min: float, time_step_limit: tuple[float, float] = (0.0, math.inf)
    ) -> "DtClamp":
        """ "transformers" (the default; prefill-only clamp at time_step_min), "none" (vLLM) or
        "limit" (clamp to the config's time_step_limit everywhere, as mamba_ssm's dt_limit)."""
        if mode == "transformers":
            return cls(time_step_min, math.inf, in_scan=True, in_step=False)
        if mode == "none":
            return cls()
        if mode == "limit":
            low, high = time_step_limit
            return cls(low, high, in_scan=True, in_step=True)
        raise ValueError(f"unknown dt clamp mode {mode!r}: expected one of {', '.join(cls.MODES)}")

    def apply(self, dt: torch.Tensor, scan_rows: torch.Tensor | bool) -> torch.Tensor:
        """dt [B, ..., h]; scan_rows: bool, or [B] bool marking rows computed as a scan."""
        if not (self.in_scan or self.in_step) or (self.low <= 0.0 and self.high == math.inf):
            return dt
        clamped = dt.clamp(min=self.low, max=self.high)
        if isinstance(scan_rows, bool):
            use = self.in_scan if scan_rows else self.in_step
            return clamped if use else dt
        if self.in_scan and self.in_step:
            return clamped
        use = scan_rows if self.in_scan else ~scan_rows
        return torch.where(use.view(-1, *([1] * (dt.dim() - 1))), clamped, dt)


@dataclass(frozen=True)
class Mamba2Config:
    hidden_size: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    proj_bias: bool = False
    norm_eps: float = 1e-5
    dt_clamp: DtClamp = DtClamp()
    ssm_state_dtype: torch.dtype = torch.float32

    @property
    def inner_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the convolution: x, then B and C for every group."""
        return self.inner_size + 2 * self.n_groups * self.state_size


class GatedGroupRMSNorm(nn.Module):
    """RMSNorm of y * silu(gate), normalised per group of channels (not over all of them).

    The gate multiplies before the normalisation (mamba_ssm's `norm_before_gate=False`), and
    each of the `n_groups` slices of channels gets its own RMS, matching the grouped B/C, so
    the result does not depend on how heads are sharded over devices.
    """

    def __init__(self, size: int, groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if use_kernels(y) and self.weight.dtype == dtype:
            from plait.backends.kernels import norm as norm_kernels

            return norm_kernels.gated_group_rmsnorm(y, gate, self.weight, self.groups, self.eps, dtype)
        h = y.float() * F.silu(gate.float())
        grouped = h.unflatten(-1, (self.groups, -1))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.flatten(-2).to(dtype)


class CausalConv1d(nn.Module):
    """Depthwise causal convolution that continues from the previous `kernel - 1` inputs.

    `weight` is `[channels, 1, kernel]` as in `nn.Conv1d` checkpoints.
    """

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.kernel = kernel

    def forward(
        self, x: torch.Tensor, history: torch.Tensor | None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, T], history [B, C, K-1] (None = zeros), lengths [B] real inputs per row of a
        right-padded pass (None: all T) -> (silu(conv) [B, C, T], new history; see `conv_history`).

        Padding sits after a row's real inputs, so the causal outputs of real positions never
        see it; only the new history has to skip it."""
        if use_kernels(x):
            from plait.backends.kernels import conv1d as conv1d_kernels

            return conv1d_kernels.causal_conv1d(x, history, self.weight, self.bias, lengths)
        if history is None:
            history = x.new_zeros(x.shape[0], x.shape[1], self.kernel - 1)
        window = torch.cat([history.to(x.dtype), x], dim=-1)
        out = F.conv1d(window, self.weight.to(x.dtype), self.bias, groups=x.shape[1])
        return F.silu(out), conv_history(x, history, self.kernel - 1, lengths)


class Mamba2Mixer(nn.Module):
    """Names follow the HF checkpoints: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        inner, heads = cfg.inner_size, cfg.num_heads
        # in_proj emits [gate z (inner) | x, B, C (conv_dim) | dt (heads)].
        self.in_proj = nn.Linear(cfg.hidden_size, inner + cfg.conv_dim + heads, bias=cfg.proj_bias)
        self.conv1d = CausalConv1d(cfg.conv_dim, cfg.conv_kernel, cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = GatedGroupRMSNorm(inner, cfg.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(inner, cfg.hidden_size, bias=cfg.proj_bias)

    def state_specs(self, dtype: torch.dtype) -> dict[str, StateSpec]:
        cfg = self.cfg
        return {
            "conv": StateSpec((cfg.conv_dim, cfg.conv_kernel - 1), dtype),
            "ssm": StateSpec((cfg.num_heads, cfg.head_dim, cfg.state_size), cfg.ssm_state_dtype),
        }

    def forward(self, hidden: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        cfg = self.cfg
        bsz, steps, _ = hidden.shape
        gate, xbc, dt_raw = self.in_proj(hidden).split([cfg.inner_size, cfg.conv_dim, cfg.num_heads], dim=-1)
        A = -torch.exp(self.A_log.float())
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())  # [B, T, h]
        if state is not None and steps == 1 and use_kernels(hidden):
            y = self._step_kernels(xbc[:, 0], dt[:, 0], A, state)[:, None]
            return self.out_proj(self.norm(y.flatten(-2), gate, hidden.dtype))

        conv_state = ssm_state = lengths = None
        start = 0
        if state is not None:
            lengths = state.batch.new_tokens  # rows right-padded to the pass: see _mask_padding
            conv_state, ssm_state = state.tensors["conv"], state.tensors["ssm"]
            lens = state.batch.cache_lens
            fresh = lens == 0
            if bool(fresh.any()):  # a new sequence starts from zero, whatever the slot held
                conv_state[fresh] = 0
                ssm_state[fresh] = 0
            start = int(lens[0]) if bsz == 1 else 0

        xbc, new_conv = self.conv1d(xbc.transpose(1, 2), conv_state, lengths)
        if conv_state is not None:
            conv_state.copy_(new_conv)
        x, B, C = xbc.transpose(1, 2).split(
            [cfg.inner_size, cfg.n_groups * cfg.state_size, cfg.n_groups * cfg.state_size], dim=-1
        )

        step = state is not None and steps == 1
        if step:
            # transformers' decode update only runs for rows that already have state; a row's
            # first token goes through its scan, which clamps.
            dt = cfg.dt_clamp.apply(dt, fresh)
            y = ssd_step(
                ssm_state,
                x[:, 0].unflatten(-1, (cfg.num_heads, cfg.head_dim)),
                dt[:, 0],
                A,
                B[:, 0].unflatten(-1, (cfg.n_groups, cfg.state_size)),
                C[:, 0].unflatten(-1, (cfg.n_groups, cfg.state_size)),
                self.D,
            )[:, None]
        else:
            # a verify pass stands for one-token steps (speculative decoding): clamp like them
            dt = cfg.dt_clamp.apply(dt, state is None or not state.batch.step_clamp)
            if lengths is not None:
                dt = self._mask_padding(dt, lengths)
            scan = ssd_chunk_scan
            if use_kernels(hidden):
                from plait.backends.kernels import ssd as ssd_kernels

                scan = ssd_kernels.ssd_chunk_scan
            result = scan(
                x.unflatten(-1, (cfg.num_heads, cfg.head_dim)),
                dt,
                A,
                B.unflatten(-1, (cfg.n_groups, cfg.state_size)),
                C.unflatten(-1, (cfg.n_groups, cfg.state_size)),
                cfg.chunk_size,
                D=self.D,
                initial_state=ssm_state,
                start=start,
            )
            if ssm_state is not None:
                ssm_state.copy_(result.final_state)
            y = result.y
        y = self.norm(y.flatten(-2), gate, hidden.dtype)
        return self.out_proj(y)

    @staticmethod
    def _mask_padding(dt: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """dt [B, T, h] -> 0 at positions t >= lengths[r], the padding of a multi-row pass.

        A step with dt = 0 decays the state by exp(0 * A) = 1 and adds nothing, so the SSM state
        a row ends with is its state after its last real token (for the PyTorch and the Triton
        scan alike). This must come after the dt clamp, which would lift 0 to its floor.
        """
        steps = torch.arange(dt.shape[1], device=dt.device)
        padding = steps[None, :] >= lengths.to(dt.device)[:, None]
        return dt.masked_fill(padding[:, :, None], 0.0)

    def _step_kernels(
        self, xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        """One token per row on the Triton kernels: xbc [B, conv_dim], dt [B, h] -> y [B, h, p].

        The same maths as the PyTorch step, with no host sync: rows whose cache_len is 0 are
        zero-started inside the kernels instead of by clearing their slots here.
        """
        from plait.backends.kernels import conv1d as conv1d_kernels
        from plait.backends.kernels import ssd as ssd_kernels

        cfg = self.cfg
        lens = state.batch.cache_lens
        conv_state, ssm_state = state.tensors["conv"], state.tensors["ssm"]
        xbc = conv1d_kernels.causal_conv1d_update(xbc, conv_state, self.conv1d.weight, self.conv1d.bias, lens)
        x, B, C = xbc.split(
            [cfg.inner_size, cfg.n_groups * cfg.state_size, cfg.n_groups * cfg.state_size], dim=-1
        )
        dt = cfg.dt_clamp.apply(dt, lens == 0)
        return ssd_kernels.selective_state_update(
            ssm_state,
            x.unflatten(-1, (cfg.num_heads, cfg.head_dim)),
            dt,
            A,
            B.unflatten(-1, (cfg.n_groups, cfg.state_size)),
            C.unflatten(-1, (cfg.n_groups, cfg.state_size)),
            self.D,
            cache_lens=lens,
        )
