"""`build_index`: corpus JSONL -> an index directory of plain files, in bounded memory.

One streaming pass over the corpus, `chunk_size` documents at a time: encode, append token
embeddings to the raw matrix, append ids/texts to the doc store and BM25 term ids to a temp
file. Then, from the files just written: k-means on a bounded sample of token embeddings,
per-token centroid codes and the inverted file (read back in blocks), the BM25 matrix, and
finally the manifest with every file's size and sha256. The directory is built under a
temporary name and renamed at the end, so a crashed build never looks like an index.

Files (all named in manifest.json):
  embeddings.f16|.bf16   (tokens x dim) raw row-major token embeddings
  doc_offsets.npy        int64 (docs + 1): document d's rows are [off[d], off[d+1])
  docs.jsonl, docs.offsets.npy   ids, titles, texts (+ byte offsets)
  centroids.npy          float32 (centroids x dim), unit norm
  codes.npy              int32 (tokens): nearest centroid of each token
  ivf_docs.npy, ivf_offsets.npy  centroid -> documents inverted file
  bm25/*                 bm25s's CSC matrix, vocabulary and parameters
  projection.npy         float32 (dim x hidden), only when a projection was requested
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Protocol

import numpy as np

from plait.retrievers import embeddings as emb
from plait.retrievers.centroids import build_inverted_file
from plait.retrievers.corpus import Document, count_documents, iter_corpus
from plait.retrievers.docstore import DOCS_FILE, OFFSETS_FILE, DocStoreWriter
from plait.retrievers.encoder import ColBERTEncoder, EncoderSettings
from plait.retrievers.errors import CorpusError, IndexExistsError, SettingsError
from plait.retrievers.kmeans import assign, default_num_centroids, spherical_kmeans
from plait.retrievers.lexical import TermWriter, build_bm25
from plait.retrievers.manifest import FORMAT, FORMAT_VERSION, file_entries, write_manifest

log = logging.getLogger(__name__)

ENCODE, KMEANS, CODES, BM25, MANIFEST = (
    "encoding documents",
    "k-means centroids",
    "centroid codes",
    "BM25",
    "writing manifest",
)
#: The stages of a build, in order; each takes minutes on a large corpus (encoding most).
STAGES = (ENCODE, KMEANS, CODES, BM25, MANIFEST)


class BuildProgress(Protocol):
    """What a build reports while it runs, so a long build is never silent: each stage of
    `STAGES` starts (with its total in `unit`s, None when not known ahead), is updated with
    the count done so far, and finishes. Called from the building thread."""

    def start(self, stage: str, total: int | None, unit: str) -> None: ...

    def update(self, stage: str, completed: int) -> None: ...

    def finish(self, stage: str) -> None: ...


class Silent:
    """The progress of a build nobody watches."""

    def start(self, stage: str, total: int | None, unit: str) -> None:
        pass

    def update(self, stage: str, completed: int) -> None:
        pass

    def finish(self, stage: str) -> None:
        pass


def random_projection(dim: int, hidden: int, seed: int) -> np.ndarray:
    """A seeded (dim x hidden) matrix with orthonormal rows; saved in the index, never re-drawn."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((hidden, dim)))
    return q.T.astype(np.float32)


def build_index(
    corpus: str | Path | Iterable[Document],
    out_dir: str | Path,
    *,
    encoder: ColBERTEncoder | str | Path | None = None,
    settings: EncoderSettings | None = None,
    dtype: str = "float16",
    projection_dim: int | None = None,
    num_centroids: int | None = None,
    kmeans_sample: int = 131072,
    kmeans_iterations: int = 8,
    bm25_k1: float = 1.2,
    bm25_b: float = 0.75,
    stem: bool = True,
    chunk_size: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    progress: BuildProgress | None = None,
) -> Path:
    """Build a ColBERT-serve index from a corpus JSONL file (or an iterable of `Document`s).

    `encoder`: None for the embedded MiniLM, a checkpoint directory, or a loaded encoder.
    `dtype`: "float16" or "bfloat16" storage of the token embeddings.
    `progress` hears of each stage (`STAGES`) as it starts, advances and finishes.
    Returns the index directory.
    """
    if dtype not in emb.DTYPES:
        raise CorpusError(f"dtype must be one of {sorted(emb.DTYPES)}, got {dtype!r}")
    counts = {"chunk_size": chunk_size, "batch_size": batch_size, "num_centroids": num_centroids}
    for name, value in counts.items():
        if value is not None and value < 1:  # 0 would loop forever, fail deep inside, or mean "default"
            raise SettingsError(f"{name} must be at least 1, got {value}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise IndexExistsError(
            f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    started = time.perf_counter()
    report = progress or Silent()

    encoder_path: str | None = None
    if not isinstance(encoder, ColBERTEncoder):
        encoder_path = None if encoder is None else str(Path(encoder).resolve())
        encoder = ColBERTEncoder.load(encoder_path, settings=settings)
    elif settings is not None:
        encoder = encoder.with_settings(settings)
    projection = None
    if projection_dim is not None:
        if encoder.linear is not None:
            raise CorpusError("the encoder already has a linear projection; projection_dim must be None")
        if not 1 <= projection_dim <= encoder.hidden_size:  # orthonormal rows: at most hidden of them
            raise SettingsError(
                f"projection_dim must be in 1..{encoder.hidden_size} (the encoder width), "
                f"got {projection_dim}"
            )
        projection = random_projection(projection_dim, encoder.hidden_size, seed)
        encoder = ColBERTEncoder(encoder.model, encoder.tokenizer, encoder.settings, encoder.name, projection)

    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stats = _write_index(
            tmp,
            corpus,
            encoder,
            encoder_path,
            projection,
            dtype,
            num_centroids,
            kmeans_sample,
            kmeans_iterations,
            bm25_k1,
            bm25_b,
            stem,
            chunk_size,
            batch_size,
            seed,
            report,
        )
        stats["build_seconds"] = round(time.perf_counter() - started, 3)
        _finish_manifest(tmp, stats, report)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "built index %s: %d docs, %d tokens in %.1fs",
        out,
        stats["num_docs"],
        stats["num_tokens"],
        stats["build_seconds"],
    )
    return out


def _chunks(docs: Iterable[Document], size: int) -> Iterable[list[Document]]:
    chunk: list[Document] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _unique_ids(docs: Iterable[Document]) -> Iterable[Document]:
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen:
            raise CorpusError(f"duplicate document id {doc.id!r}")
        seen.add(doc.id)
        yield doc


def _write_index(
    tmp: Path,
    corpus: str | Path | Iterable[Document],
    encoder: ColBERTEncoder,
    encoder_path: str | None,
    projection: np.ndarray | None,
    dtype: str,
    num_centroids: int | None,
    kmeans_sample: int,
    kmeans_iterations: int,
    k1: float,
    b: float,
    stem: bool,
    chunk_size: int,
    batch_size: int,
    seed: int,
    progress: BuildProgress,
) -> dict:
    """Write every index file into `tmp`; returns the manifest fields (with a `files` list)."""
    docs = iter_corpus(corpus) if isinstance(corpus, str | Path) else _unique_ids(corpus)
    emb_file = emb.file_name(dtype)
    writer = emb.EmbeddingWriter(tmp / emb_file, encoder.dim, dtype)
    store = DocStoreWriter(tmp)
    terms = TermWriter(tmp / "bm25_terms.tmp", stem)
    done = 0
    if isinstance(corpus, str | Path):
        total: int | None = count_documents(corpus)
    else:
        total = len(corpus) if isinstance(corpus, Sized) else None
    progress.start(ENCODE, total, "docs")
    try:
        for chunk in _chunks(docs, chunk_size):
            texts = [d.full_text for d in chunk]
            for doc, vectors in zip(chunk, encoder.encode_documents(texts, batch_size=batch_size)):
                writer.add(vectors)
                store.add(doc)
                terms.add(doc.full_text)
            done += len(chunk)
            progress.update(ENCODE, done)
    finally:
        writer.close()
        store.close()
        terms.close()
    if done == 0:
        raise CorpusError("the corpus has no documents")
    progress.finish(ENCODE)

    doc_offsets = np.concatenate([[0], np.cumsum(writer.lengths, dtype=np.int64)])
    np.save(tmp / "doc_offsets.npy", doc_offsets)
    num_tokens = int(doc_offsets[-1])
    matrix = emb.open_matrix(tmp / emb_file, num_tokens, encoder.dim, dtype)

    # Centroids from a bounded random sample of token embeddings.
    k = num_centroids or default_num_centroids(num_tokens)
    k = max(1, min(k, num_tokens))
    rng = np.random.default_rng(seed)
    n_sample = min(num_tokens, max(kmeans_sample, k))
    sample_rows = np.sort(rng.choice(num_tokens, size=n_sample, replace=False))
    progress.start(KMEANS, kmeans_iterations, "iterations")
    centroids = spherical_kmeans(
        emb.as_float32(matrix[sample_rows], dtype),
        k,
        kmeans_iterations,
        seed,
        on_iteration=lambda i: progress.update(KMEANS, i),
    )
    np.save(tmp / "centroids.npy", centroids)
    progress.finish(KMEANS)

    progress.start(CODES, num_tokens, "tokens")
    codes = np.lib.format.open_memmap(tmp / "codes.npy", mode="w+", dtype=np.int32, shape=(num_tokens,))
    block = 65536
    for start in range(0, num_tokens, block):
        codes[start : start + block] = assign(emb.as_float32(matrix[start : start + block], dtype), centroids)
        progress.update(CODES, min(start + block, num_tokens))
    codes.flush()
    ivf_docs, ivf_offsets = build_inverted_file(codes, doc_offsets, k)
    del codes, matrix
    np.save(tmp / "ivf_docs.npy", ivf_docs)
    np.save(tmp / "ivf_offsets.npy", ivf_offsets)
    progress.finish(CODES)

    progress.start(BM25, done, "docs")  # bm25s builds its matrix in one call: no steps between
    bm25_files = build_bm25(terms, tmp, k1, b)
    (tmp / "bm25_terms.tmp").unlink()
    progress.update(BM25, done)
    progress.finish(BM25)

    files = [
        emb_file,
        "doc_offsets.npy",
        DOCS_FILE,
        OFFSETS_FILE,
        "centroids.npy",
        "codes.npy",
        "ivf_docs.npy",
        "ivf_offsets.npy",
        *bm25_files,
    ]
    if projection is not None:
        np.save(tmp / "projection.npy", projection)
        files.append("projection.npy")
    return {
        "num_docs": done,
        "num_tokens": num_tokens,
        "num_centroids": k,
        "dim": encoder.dim,
        "dtype": dtype,
        "encoder": {
            "name": encoder.name,
            "path": encoder_path,
            "hidden_size": encoder.hidden_size,
            "projection": "projection.npy" if projection is not None else None,
            "settings": encoder.settings.to_json(),
        },
        "bm25": {
            "k1": k1,
            "b": b,
            "stem": stem,
            "analyzer": "word2+stopwords-en" + ("+s-stem" if stem else ""),
        },
        "files": files,
    }


def _finish_manifest(directory: Path, stats: dict, progress: BuildProgress) -> None:
    """The manifest, with every file's sha256: reading the whole index once more."""
    names = stats.pop("files")
    progress.start(MANIFEST, len(names), "files")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **stats,
        "files": file_entries(directory, names, on_file=lambda n: progress.update(MANIFEST, n)),
    }
    write_manifest(directory, manifest)
    progress.finish(MANIFEST)
