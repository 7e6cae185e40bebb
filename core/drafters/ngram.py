"""N-gram prompt lookup, with a draft length that follows its own acceptance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import SpecrunError
from ..interfaces import Draft, Drafter
from ..sampling import Sampler

#: the pipeline's lookup drafts stop at the first position whose acceptance estimate is below this
DEFAULT_LOOKUP_MIN_PROB = 0.0


class NgramDrafter(Drafter):
    """Prompt lookup decoding: find the latest earlier occurrence of the last n tokens (n from
    ``max_ngram`` down to ``min_ngram``) and propose what followed it.

    With ``min_prob`` > 0 the draft stops at the first position whose estimated chance of being
    accepted is below it, as the eagle3 chain stops below a draft probability: lookup has no
    probabilities, so the estimate is this request's own record — of the lookup drafts that
    reached position i, the share accepted through i (a Beta(1, 1) prior; older outcomes fade by
    ``decay`` per verification, so a position cut off is tried again).  A prompt whose lookups keep
    failing drafts 0-1 tokens and runs like plain decoding; one that quotes itself drafts all k.
    The rule reads the accepted sequence only, so verification stays lossless."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, *, min_prob: float | None = None, decay: float = 0.9):
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

    def start(self, prompt: Sequence[int], capacity: int) -> None:
        self._tried, self._hit, self._last = np.zeros(0), np.zeros(0), 0

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        """What followed the latest earlier occurrence of the longest matching suffix (<= k tokens)."""
        arr = np.asarray(tokens, dtype=np.int64)
        n_tok = len(arr)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            pattern = arr[-n:]
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # starts 0 .. n_tok-1-n
            hits = np.flatnonzero((windows == pattern).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                proposal = arr[start : start + k].tolist()
                if proposal:
                    return proposal
        return []

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        proposal = self.lookup(tokens, k)
        if self.min_prob > 0 and proposal:
            proposal = proposal[: self.worth_drafting(len(proposal))]
        self._last = len(proposal)
        return Draft(proposal)

    def worth_drafting(self, k: int) -> int:
        """How many of k draft positions have an estimated acceptance >= min_prob (a prefix)."""
        if len(self._tried) < k:
            self._tried = np.pad(self._tried, (0, k - len(self._tried)))
            self._hit = np.pad(self._hit, (0, k - len(self._hit)))
        estimate = (self._hit[:k] + 1) / (self._tried[:k] + 2)
        below = np.flatnonzero(estimate < self.min_prob)
        return int(below[0]) if len(below) else k

    def accepted(self, tokens: Sequence[int], n_accepted: int, hidden_states: np.ndarray | None = None) -> None:
        if not self._last or self.min_prob <= 0:
            self._last = 0
            return
        self._tried *= self.decay
        self._hit *= self.decay
        self._tried[: self._last] += 1
        self._hit[: min(n_accepted, self._last)] += 1
        self._last = 0
