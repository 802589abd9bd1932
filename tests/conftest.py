"""Shared fixtures. Tests run offline; plait's files go to the repo's .plait/ (dequantised
weights are cached there across runs) and DSPy's cache is disabled per LM where it matters."""

import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PLAIT_HOME", str(Path(__file__).resolve().parents[1] / ".plait"))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.fail(f"shared datasets not found at {DATA} (../shared/data beside the repo)")
    return DATA


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2 engine, loaded once for the whole session."""
    from plait.backends.runtime.engine import Engine

    engine = Engine.load("smollm2-135m", dtype="fp32")  # the exact reference; the default is int4
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def smollm_gguf_path() -> Path:
    from plait.backends.loading.registry import resolve

    return resolve("smollm2-135m")[1]


@pytest.fixture(autouse=True)
def no_background_work_left():
    """Work a test starts in background threads ends with the test: DSPy's ParallelExecutor
    returns before the copies it resubmitted for stragglers finish (it shuts its pool down
    without waiting), and a copy still running would log into the next test's output. Threads
    of thread pools started during the test are joined here; one still running after a minute
    fails the test that left it."""
    before = set(threading.enumerate())
    yield
    pools = [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]
    started = [t for t in pools if t not in before]
    deadline = time.monotonic() + 60
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in started if t.is_alive()]
    assert not left, f"the test left pool threads running: {left}"


@pytest.fixture
def store(tmp_path):
    """A fresh SQLite store for one test (a module's own `store` fixture takes precedence)."""
    from plait.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'plait.db'}")
    yield store
    store.close()


@pytest.fixture
def sst2(tmp_path, data_dir) -> tuple[Path, Path]:
    """12 SST-2 train rows and 10 dev rows as JSONL files: (train, dev)."""
    from tests.lifecycle_fixtures import sst2_rows, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", sst2_rows(data_dir, "train", 12))
    dev = write_jsonl(tmp_path / "dev.jsonl", sst2_rows(data_dir, "dev", 10))
    return train, dev
