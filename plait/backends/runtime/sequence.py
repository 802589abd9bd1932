"""A request while the scheduler runs it: what the scheduler keeps for itself, apart from the
caller's `Request`.

A running sequence sits in a slot of the state pool with `cached` tokens in it and `pending`
tokens not yet computed (the prompt at first, then the token it just sampled and any tokens a
grammar forces after it). Its output flows through an incremental detokenizer into the
request's results and stream.
"""

from dataclasses import dataclass, field

import torch

from plait.backends.grammar.constraint import TokenConstraint
from plait.backends.runtime.detokenizer import IncrementalDetokenizer
from plait.backends.runtime.drafting import Drafter, DraftLength
from plait.backends.runtime.request import Request
from plait.backends.runtime.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    request: Request
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    pending: list[int]
    block_hashes: list[int] = field(default_factory=list)
    cached: int = 0
    forced_prefix: int = 0
    """Tokens the grammar forced after the prompt before anything was sampled (ChatAdapter's
    first field marker): known at admission, they run as prompt tokens, in the prompt's passes
    or a pass of their own alike. As generated tokens they ran on a quantised model's 4-bit
    weights when a pass boundary fell between them and the prompt, else on its bf16 prompt
    weights, so what the prefix cache restored decided a greedy answer."""
    order: int = -1
    """When it was first admitted (-1: not yet). The newest running sequence is the first to be
    preempted; a preempted one keeps its place, ahead of everything admitted after it."""
    drafter: Drafter | None = None
    draft_length: DraftLength | None = None
    draft: list[int] = field(default_factory=list)
    """Tokens guessed to follow `pending` this step (speculative decoding): fed after it in one
    pass and kept as far as the model agrees with them."""
    replay: bool = False
    """`pending` starts with tokens a speculative pass already fed and then took back (the
    fixed-size state was restored to before them): they are fed again as the decode steps
    they stand for."""
    rides_along: bool = False
    """A plain decode row fed in this step's verify pass, padded to its width, instead of in a
    decode pass of its own (when one pass costs less than two)."""
    hidden: torch.Tensor | None = None
    """Main hidden states of positions `mtp_cached ..` not yet paired in the MTP head's state."""
    mtp_cached: int = 0
    """Positions of the MTP head's state filled for this row (see runtime/mtp_drafting.py)."""
    forks: list["Sequence"] = field(default_factory=list)
    """Samples of the same prompt that wait, in slots of their own with nothing pending, for
    this row's prefill to end, then start from a copy of its state (`Scheduler.submit_group`)."""

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def constraint(self) -> TokenConstraint | None:
        return self.request.constraint

    @property
    def finished(self) -> bool:
        return self.request.done

    def restart(self) -> None:
        """Forget the cached state (the sequence was preempted to free memory): every token fed
        so far is pending again and is recomputed when the sequence is admitted again. The
        grammar, the random generator and the text so far carry on as they were."""
        self.pending = self.request.prompt_ids + self.request.token_ids
        self.cached = 0
        self.draft, self.replay, self.rides_along = [], False, False
        self.hidden, self.mtp_cached = None, 0

    def append_output(self, tokens: list[int]) -> bool:
        """New output tokens (stop ids excluded) into the results and the stream; True when a
        stop string has ended the text."""
        request = self.request
        request.token_ids.extend(tokens)
        request.usage.completion_tokens = len(request.token_ids)
        request.publish(self.detokenizer.add(tokens))
        return self.detokenizer.stopped

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.request.done:
            return
        if error is None:
            self.request.publish(self.detokenizer.finish())
        self.request.text = self.detokenizer.text
        self.request.finish(reason, error)
