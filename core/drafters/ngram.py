"""N-gram prompt lookup, with a draft length that follows its own acceptance."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import SpecrunError
from ..interfaces import Draft, Drafter
from ..sampling import Sampler
from .gated import running_average

#: weight of the newest timing in the running average cost of a block size
COST_ALPHA = 0.2
#: a cost-cut draft is drafted whole after this many cut in a row; the wait doubles (up to
#: EXPLORE_MAX) while such explorations do not pay
EXPLORE_EVERY = 16
EXPLORE_MAX = 256
#: the pipeline's lookup drafts stop at the first position whose acceptance estimate is below this
DEFAULT_LOOKUP_MIN_PROB = 0.0


class SuffixIndex:
    """Prompt lookup's search: what followed the latest earlier occurrence of the longest suffix
    (``max_ngram`` down to ``min_ngram`` tokens) of a growing sequence.  The n-grams are indexed
    as tokens arrive (the sequence is still copied and compared, at C speed) instead of scanning
    all of it with NumPy every call: 16-20 us a call against 60-105 us at 100-800 tokens, measured on a ~11 ms llama.cpp step.
    A sequence that is not an extension of the one indexed (a new request, fewer tokens, other
    tokens) is re-indexed."""

    def __init__(self, max_ngram: int, min_ngram: int):
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self._seq: list[int] = []
        self._end: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest indexed occurrence

    def lookup(self, tokens: Sequence[int], k: int) -> tuple[list[int], int]:
        """(proposal of at most k tokens, matched suffix length; 0 and [] without a match)."""
        if k <= 0:
            return [], 0
        seq = tokens if isinstance(tokens, list) else np.asarray(tokens, dtype=np.int64).tolist()
        n_tok, done = len(seq), len(self._seq)
        if n_tok < done or seq[:done] != self._seq:
            self._seq, self._end, done = [], {}, 0
        end = self._end
        for p in range(max(done - 1, 0), n_tok - 1):  # n-grams ending at p < n_tok - 1 (not the suffix itself)
            for n in self.sizes:
                if p + 1 >= n:
                    end[tuple(seq[p + 1 - n : p + 1])] = p + 1
        self._seq = seq[:]
        for n in self.sizes:
            if n >= n_tok:
                continue
            e = end.get(tuple(seq[n_tok - n :]))
            if e is not None:
                return seq[e : e + k], n
        return [], 0


class NgramDrafter(Drafter):
    """Prompt lookup decoding: find the latest earlier occurrence of the last n tokens (n from
    ``max_ngram`` down to ``min_ngram``) and propose what followed it.

    With ``min_prob`` > 0 the draft stops at the first position whose estimated chance of being
    accepted is below it, as the eagle3 chain stops below a draft probability: lookup has no
    probabilities, so the estimate is this request's own record — of the lookup drafts that
    reached position i, the share accepted through i (a Beta(1, 1) prior; older outcomes fade by
    ``decay`` per verification, so a position cut off is tried again).  A prompt whose lookups keep
    failing drafts 0-1 tokens and runs like plain decoding; one that quotes itself drafts all k.
    The rule reads the accepted sequence only, so verification stays lossless.

    With ``paying`` (greedy only: the pipeline's default, ``--draft-gate``) the draft length is
    also chosen by cost: a block of T rows costs the target ``c(T)`` seconds, measured on its own
    calls (from ``propose`` to ``accepted``: verification included), and a draft of d
    tokens is expected to yield ``1 + sum of the acceptance estimates of its first d positions``
    tokens (the estimates above) — estimates kept per length of the matched suffix (a 3-token match predicts better than
    a 1-token one).  Each call drafts the d that maximizes expected tokens per second, 0 (a plain
    step) included, so where blocks are dear (llama.cpp's CPU kernels: a 5-token block costs ~3x
    a step) only likely drafts are verified, and where they are cheap (OpenVINO) all are.  The
    first draft is followed by a plain step (timing what drafting competes with); block sizes not
    yet timed count as costing what the cheapest timed one costs, so each is tried, and after 16 drafts in a row
    cut short one is verified whole, so the estimates that cut them are re-measured (the wait
    doubles, up to 256, while such drafts do not pay).  Block costs are the hardware's and carry
    over to the next request; acceptance records are the request's.  When sampling every draft is
    kept: the rule reads the clock, and a seed must give the same text."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, *, min_prob: float | None = None, decay: float = 0.9,
                 paying: bool = False, clock: Callable[[], float] = time.perf_counter):
        min_prob = DEFAULT_LOOKUP_MIN_PROB if min_prob is None else min_prob
        if not 1 <= min_ngram <= max_ngram:
            raise SpecrunError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}..{max_ngram}")
        if not 0.0 <= min_prob < 1.0:
            raise SpecrunError(f"the minimum acceptance estimate must be in [0, 1), got {min_prob}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.min_prob, self.decay = min_prob, decay
        self._tried = np.zeros(0)
        self._hit = np.zeros(0)
        self._last = 0  # length of the draft awaiting its verification
        self.paying, self.clock = paying, clock
        self.cost: dict[int, float] = {}  # rows of a target call -> running average seconds (kept across requests)
        self._by_match: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # matched suffix length -> (tried, hit)
        self._call: tuple[float, int, int, bool] | None = None  # (drafted at, rows, matched length, explored) awaiting accepted
        self.matched = 0  # suffix length of the latest proposal's match
        self._cut = 0  # consecutive drafts cut short by cost
        self._explore_every = EXPLORE_EVERY  # doubles while explorations do not pay
        self._index = SuffixIndex(max_ngram, min_ngram)

    def start(self, prompt: Sequence[int], capacity: int) -> None:
        self._tried, self._hit, self._last = np.zeros(0), np.zeros(0), 0
        self._by_match, self._call = {}, None
        self._index = SuffixIndex(self.max_ngram, self.min_ngram)

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        proposal, self.matched = self._index.lookup(tokens, k)
        if self.min_prob > 0 and proposal:
            proposal = proposal[: self.worth_drafting(len(proposal))]
        if self.paying and sampler is None:
            d = self.paying_length(len(proposal), self.matched)
            self._cut = self._cut + 1 if d < len(proposal) else 0
            explore = self._cut > self._explore_every
            if explore:  # now and then a whole draft, so estimates that kept drafts short are re-measured
                d, self._cut = len(proposal), 0
            proposal = proposal[:d]
            self._call = (self.clock(), len(proposal) + 1, self.matched, explore)
        else:
            self._call = None
        self._last = len(proposal)
        return Draft(proposal)

    def paying_length(self, n: int, matched: int) -> int:
        """The draft length (0..n) with the most expected tokens per second of target time."""
        if n == 0:
            return 0
        tried, hit = self._record(matched, n)
        expected = 1.0 + np.concatenate([[0.0], np.cumsum((hit[:n] + 1) / (tried[:n] + 2))])
        if self.cost and 1 not in self.cost:
            return 0  # one plain step, to time what drafting competes with
        cheapest = min(self.cost.values(), default=1.0)  # an untimed size counts as the cheapest timed one
        seconds = np.array([self.cost.get(d + 1, cheapest) for d in range(n + 1)])
        return int(np.argmax(expected / seconds))

    def _record(self, matched: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        tried, hit = self._by_match.get(matched, (np.zeros(0), np.zeros(0)))
        if len(tried) < n:
            tried, hit = np.pad(tried, (0, n - len(tried))), np.pad(hit, (0, n - len(hit)))
            self._by_match[matched] = (tried, hit)
        return tried, hit

    def worth_drafting(self, k: int) -> int:
        """How many of k draft positions have an estimated acceptance >= min_prob (a prefix)."""
        if len(self._tried) < k:
            self._tried = np.pad(self._tried, (0, k - len(self._tried)))
            self._hit = np.pad(self._hit, (0, k - len(self._hit)))
        estimate = (self._hit[:k] + 1) / (self._tried[:k] + 2)
        below = np.flatnonzero(estimate < self.min_prob)
        return int(below[0]) if len(below) else k

    def accepted(self, tokens: Sequence[int], n_accepted: int, hidden_states: np.ndarray | None = None) -> None:
        call, self._call = self._call, None
        if call is not None:
            start, rows, matched, explored = call
            seconds = self.clock() - start
            self.cost[rows] = running_average(self.cost.get(rows), seconds, COST_ALPHA)
            if rows > 1:
                tried, hit = self._record(matched, rows - 1)
                tried *= self.decay
                hit *= self.decay
                tried[: rows - 1] += 1
                hit[: min(n_accepted, rows - 1)] += 1
            if explored:  # it paid: tokens per second at least a plain step's
                paid = (1 + n_accepted) * self.cost.get(1, seconds) >= seconds
                self._explore_every = EXPLORE_EVERY if paid else min(2 * self._explore_every, EXPLORE_MAX)
        if not self._last or self.min_prob <= 0:
            self._last = 0
            return
        self._tried *= self.decay
        self._hit *= self.decay
        self._tried[: self._last] += 1
        self._hit[: min(n_accepted, self._last)] += 1
        self._last = 0
