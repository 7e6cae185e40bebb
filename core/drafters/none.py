"""Plain decoding through the speculative loop: the baseline."""

from __future__ import annotations

from collections.abc import Sequence

from ..interfaces import Draft, Drafter
from ..sampling import Sampler


class NoDrafter(Drafter):
    """Proposes nothing: the loop degenerates to plain decoding (the baseline)."""

    name = "none"

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        return Draft([])
