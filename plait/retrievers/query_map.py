"""Learning a query map: a (dim x dim) matrix M applied to query token embeddings only.

A tuned query token is M q, not normalised again, so MaxSim becomes sum_i |M q_i| max_j
cos(M q_i, d_j): a learnt similarity and a learnt weight per query token (MaxSim's untuned sum
weighs "of" like "myelin", where BM25 weighs terms by rarity), with the documents' stored
embeddings, centroids and codes left exactly as built. Why this and not fine-tuning the
encoder: on 2 CPU cores re-encoding SciFact's 5,183 abstracts alone takes minutes (a large
corpus hours), and training a 22M-parameter encoder on a few thousand pairs is slower still and
overfits; M has dim^2 parameters (147k at 384) and starts at the identity (or the base
version's map), where every score is what it was.

Loss: softmax cross-entropy of each query's passage against its hard negatives (the hybrid's
other top hits) and the other queries' passages in the batch (in-batch negatives), over MaxSim
scores averaged per query token and divided by a temperature; plus (`distill`) a cross-entropy
of those scores against the hybrid's own scores of the same candidates, which carry BM25's
term weights. A held-out tenth of the pairs picks the best epoch (the starting map included),
so no relevance judgments are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from plait.retrievers import embeddings as emb
from plait.retrievers.store import IndexStore
from plait.retrievers.synthetic import TrainingPair

#: Scores are mean cosines per query token; 0.05 spreads them over a softmax's useful range
#: (a passage 0.05 above a negative on average is e times likelier).
TEMPERATURE = 0.05
#: The hybrid's fused scores are sums of z-scores, a few units apart from top to bottom; at 0.25
#: the teacher is about as sure of its first hit as MaxSim's scores at `TEMPERATURE` (at 1.0 it
#: was much flatter, and pulling MaxSim towards it fought the cross-entropy: no loss fell).
TEACHER_TEMPERATURE = 0.25


@dataclass(frozen=True)
class TrainSettings:
    """Measured on SciFact (test qrels only to compare; README, "Tuning an index"): with 526
    kept SmolLM2 queries these settings took late-interaction nDCG@10 0.689 -> 0.691 and hybrid
    0.718 -> 0.721, with 1,648 to 0.685 and 0.715, and on the 809 train queries every variant
    stays within 0.004 of the untuned index. Twice the epochs at twice the rate fit the synthetic
    queries better (held-out loss 0.157 -> 0.119) and the real ones worse: SmolLM2's queries
    mostly restate titles. With a teacher at temperature 1 (flatter than MaxSim's scores) no
    loss fell."""

    epochs: int = 4
    batch_size: int = 32
    negatives: int = 8  # hard negatives per query (the first of the pair's hybrid negatives)
    learning_rate: float = 1e-3
    distill: float = 1.0  # weight of matching the hybrid's scores of each query's candidates
    heldout: float = 0.1  # the fraction of pairs that picks the best epoch
    seed: int = 0


@dataclass
class TrainReport:
    """What training did, for the manifest: losses per epoch and the epoch kept."""

    train_loss: list[float] = field(default_factory=list)
    heldout_loss: list[float] = field(default_factory=list)
    heldout_loss_before: float = float("nan")
    best_epoch: int = 0  # 0: the starting map was best
    steps: int = 0


def doc_block(store: IndexStore, docs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents' stored token embeddings, zero-padded: (docs, longest, dim) float32 and the
    (docs, longest) mask of real tokens."""
    starts = [int(store.doc_offsets[d]) for d in docs]
    ends = [int(store.doc_offsets[d + 1]) for d in docs]
    width = max(1, max(e - s for s, e in zip(starts, ends, strict=True)))
    out = torch.zeros(len(docs), width, store.dim)
    mask = torch.zeros(len(docs), width, dtype=torch.bool)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        out[i, : e - s] = torch.from_numpy(emb.as_float32(store.matrix[s:e], store.dtype))
        mask[i, : e - s] = True
    return out, mask


def padded(queries: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query token embeddings, zero-padded, and the mask of real tokens."""
    width = max(len(q) for q in queries)
    out = torch.zeros(len(queries), width, queries[0].shape[1])
    mask = torch.zeros(len(queries), width, dtype=torch.bool)
    for i, q in enumerate(queries):
        out[i, : len(q)] = torch.from_numpy(q)
        mask[i, : len(q)] = True
    return out, mask


def mapped(q: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Query tokens through the map, not normalised again: a token's length is its weight."""
    return q @ matrix.T


def mean_best(sim: torch.Tensor, q_mask: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """MaxSim averaged over each query's real tokens, from the similarities `sim` (Q, D, T, L)
    of query tokens to document tokens; `d_mask` (Q or 1, D, L) marks real document tokens."""
    best = sim.masked_fill(~d_mask[:, :, None, :], -2.0).max(dim=-1).values * q_mask[:, None, :]
    return best.sum(-1) / q_mask.sum(-1)[:, None]


def batch_loss(
    matrix: torch.Tensor,
    q: torch.Tensor,
    q_mask: torch.Tensor,
    docs: torch.Tensor,
    d_mask: torch.Tensor,
    teacher: torch.Tensor | None = None,
    distill: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of each query's passage. `docs` (queries, per query, L, dim) holds
    each query's passage then its hard negatives; the other queries' passages are negatives
    too (in-batch), scored without scoring anyone's hard negatives for everyone. With
    `distill`, plus that weight times the cross-entropy of the own block's scores against the
    hybrid's (`teacher`, the same shape, -inf where a document is padding)."""
    n = len(q)
    qm = mapped(q, matrix)
    own = mean_best(torch.einsum("qtk,qdlk->qdtl", qm, docs), q_mask, d_mask)  # (n, per query)
    cross = mean_best(torch.einsum("qtk,dlk->qdtl", qm, docs[:, 0]), q_mask, d_mask[None, :, 0])  # (n, n)
    cross = cross.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))  # i's own passage is in `own`
    logits = torch.cat([own, cross], dim=1) / TEMPERATURE
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    if teacher is not None and distill > 0:
        target = torch.softmax(teacher / TEACHER_TEMPERATURE, dim=1)
        loss = loss + distill * torch.nn.functional.cross_entropy(own / TEMPERATURE, target)
    return loss


def _batch_docs(
    store: IndexStore, pairs: Sequence[TrainingPair], negatives: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each pair's passage then `negatives` hard negatives (repeating the last when short),
    their mask, and the teacher's scores of them (-inf for a repeat)."""
    ids: list[int] = []
    teacher = torch.full((len(pairs), negatives + 1), float("-inf"))
    for i, p in enumerate(pairs):
        chosen = list(p.negatives[:negatives]) or [p.doc]
        ids += [p.doc, *chosen, *[chosen[-1]] * (negatives - len(chosen))]
        scores = p.teacher[: len(chosen) + 1] if p.negatives else p.teacher[:1]
        teacher[i, : len(scores)] = torch.tensor(scores)
    d, mask = doc_block(store, ids)
    shape = (len(pairs), negatives + 1)
    return d.view(*shape, *d.shape[1:]), mask.view(*shape, -1), teacher


def train_query_map(
    store: IndexStore,
    queries: Sequence[np.ndarray],
    pairs: Sequence[TrainingPair],
    start: np.ndarray,
    settings: TrainSettings,
    on_step: Callable[[int], None] = lambda step: None,
) -> tuple[np.ndarray, TrainReport]:
    """Learn M from `queries` (each query's untuned token embeddings) and `pairs` (its
    passage, its hard negatives), starting from `start`. Returns the best M and the report.
    Deterministic for a given seed and thread count."""
    s = settings
    rng = np.random.default_rng(s.seed)
    order = rng.permutation(len(pairs))
    n_held = round(len(pairs) * s.heldout) if len(pairs) >= 10 else 0
    held, train = order[:n_held], order[n_held:]
    torch.manual_seed(s.seed)
    m0 = torch.from_numpy(np.asarray(start, dtype=np.float32))
    matrix = torch.nn.Parameter(m0.clone())
    optimizer = torch.optim.Adam([matrix], lr=s.learning_rate)
    report = TrainReport()

    def loss_on(rows: np.ndarray, m: torch.Tensor) -> torch.Tensor:
        q, q_mask = padded([queries[i] for i in rows])
        d, d_mask, teacher = _batch_docs(store, [pairs[i] for i in rows], s.negatives)
        return batch_loss(m, q, q_mask, d, d_mask, teacher, s.distill)

    def heldout_loss(m: torch.Tensor) -> float:
        if not len(held):
            return float("nan")
        with torch.no_grad():
            losses = [
                float(loss_on(held[i : i + s.batch_size], m)) * len(held[i : i + s.batch_size])
                for i in range(0, len(held), s.batch_size)
            ]
        return sum(losses) / len(held)

    best, best_loss = m0.clone(), heldout_loss(m0)
    report.heldout_loss_before = best_loss
    for epoch in range(1, s.epochs + 1):
        shuffled = rng.permutation(train)
        total = 0.0
        for i in range(0, len(shuffled), s.batch_size):
            rows = shuffled[i : i + s.batch_size]
            loss = loss_on(rows, matrix)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            report.steps += 1
            on_step(report.steps)
        report.train_loss.append(total / max(len(shuffled), 1))
        current = heldout_loss(matrix.detach())
        report.heldout_loss.append(current)
        if not len(held) or current < best_loss:  # no held-out pairs: the last epoch
            best, best_loss, report.best_epoch = matrix.detach().clone(), current, epoch
    return best.numpy(), report
