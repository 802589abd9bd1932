"""`tune_index`: adapt an index to its corpus with synthetic queries, as a new index version.

Stages (`STAGES`), each reported to a `BuildProgress` and each resumable:
1. generate - a query for each of N sampled passages, by an LM program (`QueryWriter`);
   appended to `tune/queries.jsonl` as they come, so a rerun continues.
2. filter   - keep a pair when the base version's hybrid ranks its passage within `keep_rank`;
   the other top hits become hard negatives (`synthetic.filter_queries`).
3. encode   - the kept queries' token embeddings under the base encoder (no query map).
4. train    - a query map from them (`query_map.train_query_map`): documents, centroids and
   codes are untouched, so nothing is re-encoded.
5. write    - the next version (`versions.write_version`): the base's files as hard links plus
   `query_map.npy`; its manifest records how it was tuned. The base version stays as it was.

The filter's and training's results are kept in `tune/from-<base>/` with the settings that made
them; a rerun with the same settings reuses them (a crash while writing costs no retraining).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from plait.retrievers.build import BuildProgress, Silent
from plait.retrievers.colbert_serve import load_index_encoder
from plait.retrievers.errors import SettingsError
from plait.retrievers.query_map import TrainReport, TrainSettings, train_query_map
from plait.retrievers.searcher import Searcher
from plait.retrievers.store import IndexStore
from plait.retrievers.synthetic import (
    QueryWriter,
    filter_queries,
    generate_queries,
    read_pairs,
    sample_documents,
    write_pairs,
)
from plait.retrievers.versions import version_dir, version_number, write_version

log = logging.getLogger(__name__)

GENERATE, FILTER, ENCODE, TRAIN, WRITE = (
    "generating queries",
    "filtering queries",
    "encoding queries",
    "training query map",
    "writing version",
)
STAGES = (GENERATE, FILTER, ENCODE, TRAIN, WRITE)
WORK_DIR = "tune"
QUERY_MAP_FILE = "query_map.npy"


@dataclass(frozen=True)
class TuneSettings:
    """Everything that decides a tuned version (recorded in its manifest)."""

    queries: int = 2000
    seed: int = 0
    keep_rank: int = 1
    generation_chunk: int = 64  # passages per writer call: the generation file grows this much at once
    train: TrainSettings = field(default_factory=TrainSettings)

    def check(self) -> TuneSettings:
        for name in ("queries", "keep_rank", "generation_chunk"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        t = self.train
        if t.negatives < 0:
            raise SettingsError(f"negatives must be at least 0, got {t.negatives}")
        if t.epochs < 1 or t.batch_size < 2:
            raise SettingsError("training needs at least 1 epoch and batches of at least 2 queries")
        if not 0 <= t.heldout < 1 or not t.learning_rate > 0 or t.distill < 0:
            raise SettingsError("heldout must be in [0, 1), learning_rate > 0 and distill >= 0")
        return self


def _stage_cache(work: Path, name: str, key: dict[str, Any]) -> Path | None:
    """`work/name` when it was made with `key` (its settings), else None."""
    meta = work / f"{name}.key.json"
    if (work / name).is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        return work / name
    return None


def _remember(work: Path, name: str, key: dict[str, Any]) -> None:
    (work / f"{name}.key.json").write_text(json.dumps(key, sort_keys=True))


def _generator_check(work: Path, generator: str, seed: int, restart: bool) -> None:
    """Queries from one generator and sample only: a rerun with another refuses (or restarts)."""
    meta = work / "queries.key.json"
    key = {"generator": generator, "seed": seed}
    if restart:
        (work / "queries.jsonl").unlink(missing_ok=True)
    elif meta.is_file() and json.loads(meta.read_text()) != key and (work / "queries.jsonl").exists():
        raise SettingsError(
            f"{work / 'queries.jsonl'} was generated with {json.loads(meta.read_text())}, not {key}; "
            "pass --restart to generate anew"
        )
    meta.write_text(json.dumps(key, sort_keys=True))


def tune_index(
    index: str | Path,
    writer: QueryWriter,
    *,
    generator: str,
    settings: TuneSettings | None = None,
    base_version: int | None = None,
    restart: bool = False,
    progress: BuildProgress | None = None,
) -> Path:
    """Tune version `base_version` (None: the newest) of the index at `index` and write the
    next version; returns its directory. `generator` names `writer` in the manifest (and keys
    the query file: queries from another generator are not mixed in)."""
    s = (settings or TuneSettings()).check()
    report = progress or Silent()
    root = Path(index)
    base = version_dir(root, base_version)
    store = IndexStore(base)
    base_number = version_number(store.manifest)
    encoder = load_index_encoder(store)
    work = root / WORK_DIR
    work.mkdir(exist_ok=True)
    if restart:
        shutil.rmtree(work / f"from-{base_number}", ignore_errors=True)
    stage_work = work / f"from-{base_number}"
    stage_work.mkdir(exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(stage: str, started: float) -> None:
        seconds[stage] = round(time.perf_counter() - started, 1)
        report.finish(stage)

    started = time.perf_counter()
    _generator_check(work, generator, s.seed, restart)
    docs = sample_documents(store.num_docs, s.queries, s.seed)
    report.start(GENERATE, len(docs), "queries")
    generated = generate_queries(
        work / "queries.jsonl",
        docs,
        lambda d: store.docs.get(d).full_text,
        writer,
        s.generation_chunk,
        lambda n: report.update(GENERATE, n),
    )
    timed(GENERATE, started)

    started = time.perf_counter()
    filter_key = {"queries": len(generated), "keep_rank": s.keep_rank, "seed": s.seed}
    cached = _stage_cache(stage_work, "pairs.jsonl", filter_key)
    report.start(FILTER, len(generated), "queries")
    if cached is not None:
        pairs = read_pairs(cached)
    else:
        searcher = Searcher(store, encoder)
        pairs = filter_queries(searcher, generated, s.keep_rank, lambda n: report.update(FILTER, n))
        write_pairs(stage_work / "pairs.jsonl", pairs)
        _remember(stage_work, "pairs.jsonl", filter_key)
    report.update(FILTER, len(generated))
    timed(FILTER, started)
    if len(pairs) < 2:
        raise SettingsError(
            f"only {len(pairs)} of {len(generated)} synthetic queries ranked their passage within "
            f"the top {s.keep_rank}: too few to train on; ask for more queries or a larger --keep-rank"
        )

    train_key = {**filter_key, "train": asdict(s.train)}
    cached = _stage_cache(stage_work, QUERY_MAP_FILE, train_key)
    started = time.perf_counter()
    report.start(ENCODE, len(pairs), "queries")
    if cached is not None:
        report.update(ENCODE, len(pairs))
        timed(ENCODE, started)
        report.start(TRAIN, 0, "steps")
        matrix = np.load(cached)
        train_report = TrainReport(**json.loads((stage_work / "train_report.json").read_text()))
    else:
        raw = encoder.with_query_map(None)
        vectors: list[np.ndarray] = []
        for i in range(0, len(pairs), 64):
            vectors += raw.encode_queries([p.query for p in pairs[i : i + 64]])
            report.update(ENCODE, len(vectors))
        timed(ENCODE, started)
        started = time.perf_counter()
        start = store.query_map if store.query_map is not None else np.eye(store.dim, dtype=np.float32)
        steps = s.train.epochs * -(-(len(pairs) - round(len(pairs) * s.train.heldout)) // s.train.batch_size)
        report.start(TRAIN, steps, "steps")
        matrix, train_report = train_query_map(
            store,
            vectors,
            pairs,
            start,
            s.train,
            on_step=lambda n: report.update(TRAIN, n),
        )
        np.save(stage_work / QUERY_MAP_FILE, matrix.astype(np.float32))
        (stage_work / "train_report.json").write_text(json.dumps(asdict(train_report)))
        _remember(stage_work, QUERY_MAP_FILE, train_key)
    timed(TRAIN, started)

    started = time.perf_counter()
    report.start(WRITE, 1, "versions")
    tuning = {
        "generator": generator,
        "queries_generated": len(generated),
        "queries_kept": len(pairs),
        "filter": f"passage within the top {s.keep_rank} hybrid hits of version {base_number}",
        "settings": asdict(s),
        "training": asdict(train_report),
        "seconds": seconds,
    }
    encoder_info = {**store.encoder_info, "query_map": QUERY_MAP_FILE}
    out = write_version(
        root, base, {QUERY_MAP_FILE: stage_work / QUERY_MAP_FILE}, {"encoder": encoder_info, "tuning": tuning}
    )
    report.update(WRITE, 1)
    timed(WRITE, started)
    log.info(
        "tuned %s: version %s from %d of %d synthetic queries", root, out.name, len(pairs), len(generated)
    )
    return out
