"""N-gram prompt lookup."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import SpecrunError
from ..interfaces import Draft, Drafter
from ..sampling import Sampler


class NgramDrafter(Drafter):
    """Prompt lookup decoding: find the latest earlier occurrence of the last n tokens (n from
    ``max_ngram`` down to ``min_ngram``) and propose what followed it."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise SpecrunError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}..{max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
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
                    return Draft(proposal)
        return Draft([])
