"""The CPU thread count of the engine's passes: the cores other processes leave free."""

import sys
import threading

import pytest
import torch

from plait.backends.runtime import cpu_threads
from plait.backends.runtime.cpu_threads import CpuThreads, others_running
from plait.backends.runtime.openmp_teams import run_in_fresh_thread
from plait.backends.runtime.options import EngineOptions


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The tests set torch's count on this thread: put it back. They start from at least 2 (an
    OMP_NUM_THREADS=1 run leaves nothing to move)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def started_later_count() -> int:
    """The torch thread count a thread started now begins with."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


class Load:
    """A stand-in for /proc: the other processes' runnable threads, as the test says."""

    def __init__(self, others: int | None):
        self.others = others

    def __call__(self) -> int | None:
        return self.others


def test_the_pass_gets_the_cores_others_leave_free():
    load = Load(0)
    threads = CpuThreads(most=4, interval=0.0, window=2, sample=load, cores=4)
    assert threads.for_next_step() == 4
    load.others = 3
    assert threads.for_next_step() == 2  # window of (0, 3): 1.5 busy, round(2.5) = 2 free
    assert threads.for_next_step() == 1  # (3, 3)
    assert torch.get_num_threads() == 1  # set on the thread that runs the passes
    assert threads.default > 1 and started_later_count() == threads.default  # and nowhere else
    load.others = 9
    assert threads.for_next_step() == 1  # never below one
    load.others = 0
    threads.for_next_step()
    assert threads.for_next_step() == 4  # and back up to the ceiling, not past it
    assert threads.changes == 3


def test_samples_are_taken_at_most_every_interval():
    load = Load(0)
    threads = CpuThreads(most=2, interval=3600.0, window=1, sample=load, cores=2)
    assert threads.for_next_step() == 2
    load.others = 5
    assert threads.for_next_step() == 2  # the last sample is still fresh


def test_a_fixed_count_ignores_the_load_and_no_sample_keeps_the_count():
    fixed = CpuThreads(most=1, adapt=False, interval=0.0, sample=Load(0), cores=8)
    assert fixed.for_next_step() == 1 and torch.get_num_threads() == 1
    unknown = CpuThreads(most=2, interval=0.0, sample=Load(None), cores=2)
    assert unknown.for_next_step() == 2


def test_others_running_reads_proc_less_this_process_threads(tmp_path):
    (tmp_path / "loadavg").write_text("3.10 2.50 2.00 7/412 90210\n")
    tasks = tmp_path / "task"
    for tid, name, state in [(1, "python", "R"), (2, "a (busy) one", "R"), (3, "idle)", "S")]:
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} ({name}) {state} 1 1 1 0 -1\n")
    assert others_running(tmp_path / "loadavg", tasks) == 5  # 7 runnable, 2 of them ours
    assert others_running(tmp_path / "missing", tasks) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_others_running_reads_this_machine():
    others = others_running()
    assert isinstance(others, int) and others >= 0


def test_engine_option_validates_and_fixes_the_count(smollm):
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineOptions(cpu_threads=0)
    assert smollm.cpu_threads is not None and smollm.cpu_threads.adapt  # the default adapts
    assert 1 <= smollm.generate("Hi", max_tokens=2, temperature=0.0).usage.completion_tokens <= 2
    assert 1 <= smollm.cpu_threads.current <= smollm.cpu_threads.most


def test_use_free_cores_sets_the_calling_thread_only(monkeypatch):
    """A load on a busy machine runs its conversions with the free cores, and threads started
    later (the scheduler's) still begin with torch's default."""
    monkeypatch.setattr(cpu_threads, "others_running", lambda: 99)
    default = torch.get_num_threads()

    def load_then_look():
        taken = cpu_threads.use_free_cores()
        return taken, torch.get_num_threads(), run_in_fresh_thread(torch.get_num_threads)

    assert run_in_fresh_thread(load_then_look) == (1, 1, default)
    monkeypatch.setattr(cpu_threads, "others_running", lambda: None)
    assert run_in_fresh_thread(cpu_threads.use_free_cores) == default
