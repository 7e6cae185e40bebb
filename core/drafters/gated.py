"""A model-backed drafter that drafts only while its drafts pay for themselves, by measurement."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..interfaces import Draft, Drafter, DraftTree
from ..sampling import Sampler

#: weight of the newest observation in the running averages (about the last 1/ALPHA calls count)
ALPHA = 0.2
#: a paused drafter drafts again after this many calls, to see whether it pays again; each retry
#: that finds it still not paying doubles the wait, up to RETRY_MAX
RETRY_EVERY = 8
RETRY_MAX = 64


class PayingDrafter(Drafter):
    """Wraps a model-backed drafter (an EAGLE-3 head, a draft model) and asks it to draft only while
    drafting is faster than plain decoding, on this hardware, for these prompts.

    It times each call from the wrapped drafter's ``propose`` to the verification's ``accepted``: a
    call the model drafted for (the model's forwards, the verification of a block) against a call
    that drafted nothing (a plain step), and counts the tokens each produced.  The model drafts
    while ``tokens per model call / seconds per model call`` is at least ``1 / seconds per plain
    step`` (running averages); otherwise the call drafts nothing, and after ``RETRY_EVERY`` such
    calls the model is tried again (the wait doubles, up to ``RETRY_MAX``, while the retries find it
    still not paying).  On a GPU with a large target a head costs a few percent of a step and keeps
    drafting; on a 2-core CPU with a 135M target a head forward costs ~10% of a step, and where its
    drafts are rarely accepted it pauses.

    A model that catches up lazily on the calls it skipped (``catch_up``: the EAGLE-3 head's one
    forward over every accepted token it has not seen) is charged for that catch-up per call it
    covers, as if it had caught up call by call, so a retry after a long pause is judged by what
    drafting costs when it goes on.  What was learnt carries over to the next request (the costs are
    the hardware's; the tokens are re-measured by each retry).

    Greedy only: the rule reads the clock, so the drafts differ between runs (greedy output does
    not: it is the target's own greedy sequence whatever is drafted).  When sampling, where a seed
    must give the same text every time, every call drafts as the wrapped drafter would."""

    def __init__(self, model: Drafter, *, clock: Callable[[], float] = time.perf_counter,
                 retry_every: int = RETRY_EVERY):
        self.model = model
        self.name = model.name
        self.aux_hidden_layers = model.aux_hidden_layers
        self.clock = clock
        self.retry_every = retry_every
        self.step_seconds: float | None = None  # a plain step (a call with no draft)
        self.call_seconds: float | None = None  # a call the model drafted for, its drafting included
        self.call_tokens: float | None = None  # tokens such a call produced
        self._wait = retry_every  # paused calls before the next retry
        self._paused_for = 0
        self._since: int | None = None  # calls since the model last caught up (None: its next catch-up is the prompt's)
        self._retry = False  # the model is being retried on this call
        self._call: tuple[float, float, bool, int] | None = None  # (start, drafted by, model ran, tokens drafted)
        self.calls_drafted = self.calls_paused = 0

    @property
    def runs_on(self) -> str:
        return self.model.runs_on

    def __getattr__(self, name: str):  # the wrapped drafter's own attributes (its head, its config)
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def start(self, prompt: Sequence[int], capacity: int) -> None:
        self._paused_for, self._since, self._call = 0, None, None
        self.calls_drafted = self.calls_paused = 0
        self.model.start(prompt, capacity)

    def pays(self) -> bool:
        """Whether the model's drafts have been faster than plain steps (True until both are known)."""
        if self.step_seconds is None or self.call_seconds is None or self.call_tokens is None:
            return True
        return self.call_tokens / self.call_seconds >= 1.0 / self.step_seconds

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        if sampler is not None:
            self._call = None
            return self.model.propose(tokens, k, sampler)
        t0 = self.clock()
        pays = self.pays()
        run = pays or self._paused_for >= self._wait
        if run and self.step_seconds is None and self.call_seconds is not None and self._paused_for == 0:
            run = False  # one plain step to measure what drafting competes with
        if not run:
            self._paused_for += 1
            self.calls_paused += 1
            self._call = (t0, t0, False, 0)
            return Draft([])
        self._retry = not pays
        self._paused_for = 0
        self.calls_drafted += 1
        catch_up = getattr(self.model, "catch_up", None)
        if catch_up is not None:  # charged per call it covers: what catching up call by call costs
            catch_up()
            t1 = self.clock()
            covered = self._since
            t0 = t1 if covered is None else t1 - (t1 - t0) / max(covered, 1)
            self._since = 0
        draft = self.model.propose(tokens, k, sampler)
        self._call = (t0, self.clock(), True, len(draft))
        return draft

    def propose_tree(self, tokens: Sequence[int], depth: int, max_nodes: int) -> DraftTree | None:
        self._call = None
        return self.model.propose_tree(tokens, depth, max_nodes)

    def accepted(self, tokens: Sequence[int], n_accepted: int, hidden_states: np.ndarray | None = None) -> None:
        call, self._call = self._call, None
        if self._since is not None:
            self._since += 1
        if call is not None:
            start, drafted_by, ran, drafted = call
            now = self.clock()
            if not drafted:  # the target ran one row: a plain step's cost (a head's forwards before it left out)
                self.step_seconds = running_average(self.step_seconds, now - drafted_by)
            if ran:
                self.call_seconds = running_average(self.call_seconds, now - start)
                self.call_tokens = running_average(self.call_tokens, 1.0 + n_accepted)
            if self._retry:
                self._wait = self.retry_every if self.pays() else min(2 * self._wait, RETRY_MAX)
                self._retry = False
        self.model.accepted(tokens, n_accepted, hidden_states)


def running_average(old: float | None, new: float, alpha: float = ALPHA) -> float:
    """An exponential running average (``new`` alone when there is no ``old``)."""
    return new if old is None else old + alpha * (new - old)
