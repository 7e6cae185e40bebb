"""A small draft model sharing the target's tokenizer, run by any backend's Target."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import SpecrunError
from ..interfaces import Draft, Drafter, Target
from ..sampling import Sampler


class ModelDrafter(Drafter):
    """A small causal LM sharing the target's tokenizer, run by any backend's ``Target``."""

    name = "model"

    def __init__(self, model: Target, target_vocab_size: int):
        if model.info.vocab_size != target_vocab_size:
            raise SpecrunError(
                f"the draft model's vocabulary ({model.info.vocab_size} tokens) differs from the target's "
                f"({target_vocab_size}); use a draft model that shares the target's tokenizer"
            )
        self.model = model
        self.cached: list[int] = []

    @property
    def runs_on(self) -> str:
        m = self.model
        return f"{m.backend}/{m.device}/{m.precision}"

    def start(self, prompt: Sequence[int], capacity: int) -> None:
        self.model.reset(capacity)
        self.cached = []

    def _feed(self, new: Sequence[int]) -> np.ndarray:
        out = self.model.forward(new)
        self.cached.extend(new)
        return out.logits[-1]

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        self._sync(tokens)
        logits = self._feed(list(tokens[len(self.cached) :]))
        proposal: list[int] = []
        probs: list[np.ndarray] = []
        for i in range(k):
            if sampler is None:
                tok = int(np.argmax(logits))
            else:
                p = sampler.probs(logits)
                tok = sampler.sample(p)
                probs.append(p)
            proposal.append(tok)
            if i + 1 < k:
                logits = self._feed([tok])
        return Draft(proposal, np.stack(probs) if probs else None)

    def _sync(self, tokens: Sequence[int]) -> None:
        """Roll the draft cache back to the longest prefix it shares with ``tokens`` (keeping >= 1 token to feed)."""
        limit = min(len(self.cached), len(tokens) - 1)
        n = 0
        while n < limit and self.cached[n] == tokens[n]:
            n += 1
        if n < len(self.cached):
            self.model.rollback(n)
            del self.cached[n:]

    def accepted(self, tokens: Sequence[int], n_accepted: int, hidden_states: np.ndarray | None = None) -> None:
        self._sync(tokens)
