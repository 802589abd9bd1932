"""Drafting with the checkpoint's own MTP head (Nemotron 3 Super; `models/nemotron_h_mtp.py`).

The head's state position t holds the pair (h[t], x[t+1]): the main model's hidden state at t
and the token after it. A row's pairs are filled as its hidden states and tokens become known:

* every main pass hands over the hidden states of the positions it kept (`observe`);
* a pair is computed once x[t+1] is known too (`catch_up`): after each prompt chunk (so a
  prompt block the prefix cache keeps holds the head's state beside the main layers'), and
  before drafting, where the last pair — h at the row's last fed token, with the token just
  chosen after it — gives the first drafted token;
* each further drafted token is one more head step on the head's own output and the previous
  draft (the one MTP layer reused), written past the row's filled pairs, where the next catch-up
  overwrites it.

Drafts only propose; verification decides what is kept, so the head's state never has to be
right for the output to be — only for drafts to be good. Drafts are the head's argmax, a
deterministic drafter as `verify_draft` assumes for sampled rows.
"""

import torch

from plait.backends.models.nemotron_h_config import MAMBA
from plait.backends.models.state import Batch
from plait.backends.runtime.sequence import Sequence
from plait.backends.runtime.state_pool import StatePool


class MTPDrafter:
    """Drafts for every row of a scheduler from the model's MTP head; the per-row progress
    (`Sequence.hidden`, `Sequence.mtp_cached`) lives on the rows."""

    def __init__(self, model: torch.nn.Module, pool: StatePool):
        head = getattr(model, "mtp", None)
        if head is None:
            raise ValueError(
                "speculative='mtp' needs a checkpoint with MTP layers (num_nextn_predict_layers > 0): "
                "this one has none; use speculative='ngram'"
            )
        if MAMBA in model.config.mtp_layer_types:
            raise ValueError(
                "speculative='mtp' needs MTP layers without Mamba sublayers: drafting past a row's end "
                "would overwrite Mamba state, which cannot be cut back"
            )
        self.model, self.pool = model, pool
        self.device = next(model.parameters()).device

    def observe(self, row: Sequence, hidden: torch.Tensor) -> None:
        """The main hidden states [n, H] of the row's next n positions (now in its state)."""
        row.hidden = hidden if row.hidden is None else torch.cat([row.hidden, hidden])

    def catch_up(self, slot: int, row: Sequence) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Compute the row's pairs whose next token is known; the last pair's (logits [V],
        head hidden [1, H]), or None when no pair was due."""
        tokens = row.prompt_ids + row.request.token_ids
        limit = min(row.cached, len(tokens) - 1)
        count = limit - row.mtp_cached
        if count <= 0 or row.hidden is None:
            return None
        ids = torch.tensor([tokens[row.mtp_cached + 1 : limit + 1]], device=self.device)
        batch = Batch(self.pool, slot, torch.tensor([row.mtp_cached], device=self.device))
        logits, head_hidden = self.model.mtp_forward(row.hidden[None, :count], ids, batch)
        row.hidden = row.hidden[count:]
        row.mtp_cached = limit
        return logits[0, -1], head_hidden[:, -1:]

    def propose(self, slot: int, row: Sequence, count: int) -> list[int]:
        """Up to `count` tokens to follow the row's one pending token."""
        count = min(count, self.pool.capacity - row.cached - 1)  # chained steps write past the row
        last = self.catch_up(slot, row)
        if last is None or row.mtp_cached != row.cached or count <= 0:
            return []
        logits, head_hidden = last
        draft = [int(logits.argmax())]
        for step in range(1, count):
            lens = torch.tensor([row.cached + step - 1], device=self.device)
            ids = torch.tensor([[draft[-1]]], device=self.device)
            logits, head_hidden = self.model.mtp_forward(head_hidden, ids, Batch(self.pool, slot, lens))
            draft.append(int(logits[0, -1].argmax()))
        return draft
