"""Retrieval's hot loops as C on AVX-512 CPUs: the query encoder (`cpu_bert.c`), MaxSim
(`cpu_maxsim.c`), the centroid stage and BM25's sum of term columns (`cpu_centroids.c`), and a
hybrid query's candidates, MaxSim, fusion and top k in one call (`cpu_hybrid.c`).

Each C file names the PyTorch code it replaces and how its numbers are computed; both sum every
output in an order fixed by the data alone, so a query's answer does not depend on the batch it
is served in. The library is compiled on first use with the machine's C compiler into plait's
kernel cache (named by the sources' and flags' hash) and loaded with ctypes, whose calls release
the GIL: two search threads run the kernels on two cores at once. Where there is no compiler,
the CPU lacks AVX512-BF16 or F16C, the build fails, or `PLAIT_CPU_RETRIEVAL=0`, `library()` is
None and retrieval keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from plait.paths import cache_dir

SOURCES = tuple(
    Path(__file__).with_name(f"cpu_{name}.c") for name in ("bert", "maxsim", "centroids", "hybrid")
)
HEADERS = (Path(__file__).with_name("cpu_ranking.h"),)
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "f16c", "fma"})
"""What the kernels execute, as /proc/cpuinfo names it."""
COMPILE = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c"]
ENV = "PLAIT_CPU_RETRIEVAL"
MAX_QUERY_TOKENS = 32
"""`maxsim` keeps a query's tokens in 4 groups of 8 lanes."""

_state: dict[str, ctypes.CDLL | None] = {}
_lock = threading.Lock()


def machine_fits() -> bool:
    """Linux on x86-64 with every flag in `CPU_FLAGS`."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return set(line.partition(":")[2].split()) >= CPU_FLAGS


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None where they cannot run (see the module)."""
    lib = _state.get("lib", _state)  # read without the lock once decided: searches call this often
    if lib is not _state:
        return lib
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]


def reset() -> None:
    """Forget the verdict of `library()` (tests switch `PLAIT_CPU_RETRIEVAL`)."""
    with _lock:
        _state.clear()


def _load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if os.environ.get(ENV, "1") == "0" or cc is None or not machine_fits():
        return None
    code = b"".join(s.read_bytes() for s in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(code + " ".join(COMPILE).encode())
    target = cache_dir("kernels") / f"cpu_retrieval-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        # Written under a temporary name and renamed: a concurrent or interrupted build never
        # leaves a partial library where another process would load it.
        fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        try:
            subprocess.run(
                [cc, *COMPILE, "-fPIC", "-shared", "-o", partial, *map(str, SOURCES), "-lm"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(partial, target)
        except (OSError, subprocess.SubprocessError):
            Path(partial).unlink(missing_ok=True)
            return None
    lib = ctypes.CDLL(str(target))
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.plait_bert_new.argtypes, lib.plait_bert_new.restype = [ptr, f32, ptr], ptr
    lib.plait_bert_free.argtypes = [ptr]
    lib.plait_bert_forward.argtypes, lib.plait_bert_forward.restype = [ptr, ptr, ptr, ptr, i32, ptr, i32], i32
    lib.plait_maxsim.argtypes, lib.plait_maxsim.restype = [ptr, i32, i32, ptr, ptr, ptr, i32, ptr, i32], i32
    lib.plait_centroid_scores.argtypes = [ptr, i32, i32, ptr, i32, ptr]
    candidates = lib.plait_centroid_candidates
    candidates.argtypes, candidates.restype = (
        [ptr, i32, i32, i32, i32, i32, ptr, ptr, ptr, ptr, i32, ptr],
        i32,
    )
    lib.plait_bm25_scores.argtypes = [ptr, i32, ptr, ptr, ptr, i32, ptr]
    hybrid = lib.plait_hybrid
    hybrid.argtypes = [ptr, i32, i32, ptr, i32, ptr, i32, i32, ptr, ptr, i32, ctypes.c_double, i32, ptr, ptr]
    hybrid.restype = i32
    return lib


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A linear map's (out, in) weight as the encoder kernel reads it: rounded to bf16 (nearest
    even), each 16 outputs' weights interleaved by pairs of inputs, (out/16, in/2, 16, 2)."""
    n, k = weight.shape
    pairs = weight.detach().to(torch.bfloat16).reshape(n // 16, 16, k // 2, 2)
    return pairs.permute(0, 2, 1, 3).contiguous()


class BertKernel:
    """The C encoder and the tensors it points into (kept alive here).

    `tensors`: "word", "position", "type0", "norm.weight", "norm.bias" (fp32), then per layer
    l f"{l}.{name}" for name in `LAYER_TENSORS`: the four linear maps' weights as `pack_bf16`
    gives them (qkv: query, key and value weights stacked) with fp32 biases, and both norms.
    """

    LAYER_TENSORS = (
        "qkv.weight",
        "qkv.bias",
        "attn_out.weight",
        "attn_out.bias",
        "attn_norm.weight",
        "attn_norm.bias",
        "intermediate.weight",
        "intermediate.bias",
        "output.weight",
        "output.bias",
        "out_norm.weight",
        "out_norm.bias",
    )

    def __init__(
        self,
        lib: ctypes.CDLL,
        dims: tuple[int, int, int, int, int],
        eps: float,
        tensors: dict[str, torch.Tensor],
    ):
        """`dims`: layers, hidden, heads, intermediate, positions."""
        self.lib, self.hidden, self.positions = lib, dims[1], dims[4]
        self.tensors = {name: t.contiguous() for name, t in tensors.items()}
        names = ["word", "position", "type0", "norm.weight", "norm.bias"]
        names += [f"{layer}.{name}" for layer in range(dims[0]) for name in self.LAYER_TENSORS]
        pointers = (ctypes.c_void_p * len(names))(*(self.tensors[n].data_ptr() for n in names))
        self.handle = lib.plait_bert_new((ctypes.c_int * 5)(*dims), eps, pointers)
        if not self.handle:
            raise MemoryError("the C encoder could not allocate its model")

    def __del__(self) -> None:
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.lib.plait_bert_free(handle)

    def forward(self, seqs: list[list[int]], attended: list[int], normalize: bool) -> torch.Tensor:
        """Last hidden states of the packed tokens of `seqs`, (tokens, hidden) fp32, each
        sequence attending to its first `attended[i]` tokens; L2-normalised with `normalize`."""
        ids = np.fromiter((t for seq in seqs for t in seq), dtype=np.int64)
        lengths = np.array([len(s) for s in seqs], dtype=np.int32)
        attended_arr = np.asarray(attended, dtype=np.int32)
        out = torch.empty(len(ids), self.hidden)
        status = self.lib.plait_bert_forward(
            self.handle,
            ids.ctypes.data,
            lengths.ctypes.data,
            attended_arr.ctypes.data,
            len(seqs),
            out.data_ptr(),
            int(normalize),
        )
        if status != 0:
            raise ValueError(
                f"the C encoder refused the batch: a sequence past {self.positions} positions, "
                "one attending to none of its tokens, or no memory for scratch"
            )
        return out


def maxsim(
    lib: ctypes.CDLL,
    query: np.ndarray,
    matrix: torch.Tensor,
    doc_offsets: np.ndarray,
    docs: np.ndarray,
    bf16: bool = False,
) -> np.ndarray:
    """MaxSim scores (float32) of `query` (tokens <= 32, dim) against `docs`, whose rows of the
    fp16 `matrix` (the index's mapped embeddings) are `doc_offsets[d]:doc_offsets[d + 1]`.
    `bf16`: products of the query and rows rounded to bf16, summed in fp32 (`cpu_maxsim.c`)."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    offsets = np.ascontiguousarray(doc_offsets, dtype=np.int64)
    cands = np.ascontiguousarray(docs, dtype=np.int64)
    dim = matrix.shape[1]
    if not fits_maxsim(matrix, q):
        raise ValueError("the C MaxSim needs fp16 rows, at most 32 query tokens and a dim in 32s")
    scores = np.empty(len(cands), dtype=np.float32)
    if len(cands) == 0:
        return scores
    status = lib.plait_maxsim(
        q.ctypes.data,
        len(q),
        dim,
        matrix.data_ptr(),
        offsets.ctypes.data,
        cands.ctypes.data,
        len(cands),
        scores.ctypes.data,
        int(bf16),
    )
    if status != 0:
        raise MemoryError("the C MaxSim could not allocate its scratch")
    return scores


def fits_maxsim(matrix: torch.Tensor, query: np.ndarray) -> bool:
    """The C MaxSim's shapes: fp16 rows, 1 to 32 query tokens, a dim in 32s (a bf16 row is
    converted 32 dimensions at a time) that the query shares."""
    dim = matrix.shape[1]
    return (
        matrix.dtype == torch.float16
        and 0 < len(query) <= MAX_QUERY_TOKENS
        and query.ndim == 2
        and query.shape[1] == dim
        and dim % 32 == 0
    )


def centroid_candidates(
    lib: ctypes.CDLL,
    qc: torch.Tensor,
    n: int,
    nprobe: int,
    refine_factor: int,
    ivf: tuple[np.ndarray, np.ndarray],
    codes: np.ndarray,
    doc_offsets: np.ndarray,
) -> np.ndarray:
    """Up to `n` documents (int64, best first) for the query whose centroid scores are `qc`
    (tokens <= 32, centroids; fp32): probe, shortlist and refine as `cpu_centroids.c` says.
    `ivf`: (ivf_docs int32, ivf_offsets int64); `codes`: int32 per token row."""
    scores = qc.detach().to(torch.float32).contiguous()
    tokens, centroids = scores.shape
    if not 0 < tokens <= MAX_QUERY_TOKENS:
        raise ValueError("the C centroid stage takes 1 to 32 query tokens")
    ivf_docs = np.ascontiguousarray(ivf[0], dtype=np.int32)
    ivf_offsets = np.ascontiguousarray(ivf[1], dtype=np.int64)
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    offsets = np.ascontiguousarray(doc_offsets, dtype=np.int64)
    out = np.empty(max(n, 0), dtype=np.int64)
    if n <= 0:
        return out
    found = lib.plait_centroid_candidates(
        scores.data_ptr(),
        tokens,
        centroids,
        min(nprobe, centroids),
        n,
        refine_factor,
        ivf_docs.ctypes.data,
        ivf_offsets.ctypes.data,
        codes.ctypes.data,
        offsets.ctypes.data,
        len(offsets) - 1,
        out.ctypes.data,
    )
    if found < 0:
        raise MemoryError("the C centroid stage could not allocate its scratch")
    return out[:found]


def bm25_scores(
    lib: ctypes.CDLL,
    ids: np.ndarray,
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    num_docs: int,
) -> np.ndarray:
    """Every document's BM25 score (float32) for the term `ids` (int32): the sum, term after
    term, of their columns of the CSC matrix (`data` float32, `indices` int32, `indptr` int64,
    all contiguous; every id and index in range: `BM25Stage` checks them at open)."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    out = np.empty(num_docs, dtype=np.float32)
    lib.plait_bm25_scores(
        ids.ctypes.data,
        len(ids),
        data.ctypes.data,
        indices.ctypes.data,
        indptr.ctypes.data,
        num_docs,
        out.ctypes.data,
    )
    return out


def hybrid(
    lib: ctypes.CDLL,
    sparse: np.ndarray,
    n: int,
    centroid_docs: np.ndarray,
    query: np.ndarray,
    matrix: torch.Tensor,
    doc_offsets: np.ndarray,
    bf16: bool,
    alpha: float,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` (documents int64, fused scores float64), best first, of a hybrid search, as
    `cpu_hybrid.c` computes them: the `n` best of every document's BM25 score `sparse` (float32)
    with the `centroid_docs`, each scored by MaxSim (as `maxsim` takes `query`, `matrix`,
    `doc_offsets` and `bf16`; shapes `fits_maxsim`), fused with weight `alpha` on BM25."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    if not fits_maxsim(matrix, q):
        raise ValueError("the C hybrid stage needs fp16 rows, at most 32 query tokens and a dim in 32s")
    sparse = np.ascontiguousarray(sparse, dtype=np.float32)
    cents = np.ascontiguousarray(centroid_docs, dtype=np.int64)
    offsets = np.ascontiguousarray(doc_offsets, dtype=np.int64)
    docs, scores = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.float64)
    found = lib.plait_hybrid(
        sparse.ctypes.data,
        len(sparse),
        n,
        cents.ctypes.data,
        len(cents),
        q.ctypes.data,
        len(q),
        q.shape[1],
        matrix.data_ptr(),
        offsets.ctypes.data,
        int(bf16),
        alpha,
        k,
        docs.ctypes.data,
        scores.ctypes.data,
    )
    if found < 0:
        raise MemoryError("the C hybrid stage could not allocate its scratch")
    return docs[:found], scores[:found]


CENTROID_PANEL = 64
"""`centroid_scores` reads the centroids in panels of this many."""


def pack_centroids(centroids: np.ndarray) -> torch.Tensor:
    """The (n, dim) centroids as `centroid_scores` reads them: (n / 64, dim, 64) fp32, each
    panel's 64 centroids side by side (n a multiple of 64)."""
    n, dim = centroids.shape
    table = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    return table.reshape(n // CENTROID_PANEL, CENTROID_PANEL, dim).permute(0, 2, 1).contiguous()


def centroid_scores(lib: ctypes.CDLL, tokens: np.ndarray, packed: torch.Tensor) -> torch.Tensor:
    """(tokens, centroids) fp32 scores of every token against the `pack_centroids` panels."""
    t = np.ascontiguousarray(tokens, dtype=np.float32)
    panels, dim, width = packed.shape
    if t.ndim != 2 or t.shape[1] != dim or width != CENTROID_PANEL or packed.data_ptr() % 64:
        raise ValueError("the C centroid product needs (tokens, dim) queries and 64-byte aligned panels")
    out = torch.empty(len(t), panels * width)
    if len(t):
        lib.plait_centroid_scores(
            t.ctypes.data, len(t), dim, packed.data_ptr(), panels * width, out.data_ptr()
        )
    return out
