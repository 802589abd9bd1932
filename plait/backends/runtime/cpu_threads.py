"""How many threads a CPU pass gets: the cores that other work leaves free, re-read as it changes.

A pass of a small model is hundreds of short parallel regions, each ending at a barrier. When
every core is taken, a team of N threads waits at each barrier for its slowest member, and a
member the OS has descheduled holds the whole region for a time slice: on 2 cores with a load
of ~5 (a DSPy optimizer beside two test runs), a 78-token prompt chunk of SmolLM2 took 11 s of
model time with 2 threads and 0.9 s with 1 (fp32, a MIPROv2 bootstrap call of 8 demos). With the
cores free, 2 threads are faster. The same holds for a step's other parallel ops: zeroing a
600 KB state-pool tensor took 12 ms with 2 threads at a load of 3, 0.01 ms with 1. So the
scheduler thread asks `CpuThreads.for_next_step()` before each step, which samples how many
threads of *other* processes are runnable (Linux's /proc: the system's running count less this
process's own running threads) at most every `interval` seconds, averages the last `window`
samples, and gives the step the cores left (at least 1, at most the count the engine started
with).

Where /proc cannot be read (not Linux) the count stays where it started.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from plait.backends.runtime.openmp_teams import run_in_fresh_thread

_LOADAVG = Path("/proc/loadavg")
_OWN_TASKS = Path("/proc/self/task")


def others_running(loadavg: Path = _LOADAVG, own_tasks: Path = _OWN_TASKS) -> int | None:
    """Threads of other processes runnable right now, or None where /proc says nothing.

    /proc/loadavg's fourth field is "runnable/total" threads of the whole system; each of this
    process's threads has a stat file whose state letter follows its parenthesised name."""
    try:
        running = int(loadavg.read_text().split()[3].split("/")[0])
        own = 0
        for task in os.listdir(own_tasks):
            try:
                stat = (own_tasks / task / "stat").read_text()
            except OSError:  # the thread ended between the listing and the read
                continue
            own += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def use_free_cores() -> int:
    """Give the calling thread's torch ops the cores other processes leave free now (one
    sample, at least 1, at most torch's count): for one-off work such as loading a model,
    whose conversions and concatenations are parallel ops like a pass's."""
    others = others_running()
    threads = torch.get_num_threads()
    if others is not None:
        threads = max(1, min(threads, usable_cores() - others))
        set_own_thread_count(threads)
    return threads


class CpuThreads:
    """Sets torch's intra-op thread count on the calling (scheduler) thread before each pass.

    `most`: the ceiling (None: torch's count when made, which follows OMP_NUM_THREADS and
    `torch.set_num_threads`); with `adapt=False` every pass gets exactly `most`. `sample` reads
    the other processes' running threads (tests pass their own). OpenMP keeps a thread count per
    thread, so the count is set from the thread that runs the passes, not where this is made;
    torch's process-wide default (what threads started later begin with) is left as it was."""

    def __init__(
        self,
        most: int | None = None,
        adapt: bool = True,
        interval: float = 0.25,
        window: int = 8,
        sample: Callable[[], int | None] = others_running,
        cores: int | None = None,
    ):
        self.default = torch.get_num_threads()  # the process's, for threads started later
        self.most = most or self.default
        self.adapt = adapt
        self.cores = cores or usable_cores()
        self.interval, self.sample = interval, sample
        self._samples: deque[int] = deque(maxlen=window)
        self._sampled_at = -float("inf")
        self.current: int | None = None  # not yet set on the passes' thread
        self.changes = 0

    def for_next_step(self) -> int:
        """The thread count for the step about to run (set on this thread if it changed)."""
        if self.current is None:
            self._set(self.most)
        if not self.adapt:
            return self.current
        now = time.monotonic()
        if now - self._sampled_at < self.interval:
            return self.current
        self._sampled_at = now
        others = self.sample()
        if others is None:
            return self.current
        self._samples.append(others)
        busy = sum(self._samples) / len(self._samples)
        wanted = max(1, min(self.most, round(self.cores - busy)))
        if wanted != self.current:
            self._set(wanted)
            self.changes += 1
        return self.current

    def _set(self, threads: int) -> None:
        set_own_thread_count(threads, self.default)
        self.current = threads


def set_own_thread_count(threads: int, default: int | None = None) -> None:
    """Set the calling thread's count only. `torch.set_num_threads` also sets the default that
    other threads take at their first parallel op (which made a retrieval encoder's batching
    thread score with 1 thread and its caller with 2, a few ulps apart), so a short-lived
    thread puts `default` back (None: the count this thread had, which is the process's
    default on a thread that never set its own). This thread must have taken its own default
    first (`get_num_threads` does), or it would take the restored one at its next op."""
    own = torch.get_num_threads()
    default = own if default is None else default
    torch.set_num_threads(threads)
    if threads != default:
        run_in_fresh_thread(torch.set_num_threads, default)
