"""Prompt lookup first, a model-backed drafter where lookup finds nothing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..interfaces import Draft, Drafter
from ..sampling import Sampler
from .ngram import NgramDrafter


class LookupFirstDrafter(Drafter):
    """Prompt lookup when the sequence repeats itself (its last ``min_ngram``+ tokens occurred
    before), else a model-backed drafter (an EAGLE-3 head), else (the model drafted nothing: paused
    where its drafts do not pay, or unsure of its first token) lookup of a shorter match.  Small
    models loop and quote: over 256 tokens of MT-bench, lookup drafts were accepted far more often than the shipped head's; the head
    drafts where lookup finds nothing.  The model drafter still sees every accepted token (its
    cache stays in step); the choice reads the sequence only, so verification stays lossless."""

    def __init__(self, model: Drafter, *, min_ngram: int = 2, max_ngram: int = 3, min_prob: float | None = None):
        self.model = model
        self.lookup = NgramDrafter(max_ngram=max_ngram, min_ngram=min_ngram, min_prob=min_prob)
        # where the model drafts nothing (paused by PayingDrafter, or unsure of its first token):
        # shorter matches, as the ngram drafter alone would draft them
        self.short = NgramDrafter(max_ngram=min_ngram - 1, min_ngram=1, min_prob=min_prob) if min_ngram > 1 else None
        self._from_lookup: NgramDrafter | None = None
        self.name = f"{model.name}+ngram"
        self.aux_hidden_layers = model.aux_hidden_layers

    @property
    def runs_on(self) -> str:
        return self.model.runs_on

    def start(self, prompt: Sequence[int], capacity: int) -> None:
        self.lookup.start(prompt, capacity)
        if self.short is not None:
            self.short.start(prompt, capacity)
        self.model.start(prompt, capacity)
        self._from_lookup = None

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        # lookup's continuation as far as it is worth drafting; where it has none (or none worth
        # drafting: its matches keep failing here) the model drafts; where the model drafts nothing,
        # a shorter match
        self._from_lookup = None
        draft = self.lookup.propose(tokens, k, sampler)
        if draft.tokens:
            self._from_lookup = self.lookup
            return draft
        draft = self.model.propose(tokens, k, sampler)
        if draft.tokens or self.short is None:
            return draft
        short = self.short.propose(tokens, k, sampler)
        if short.tokens:
            self._from_lookup = self.short
        return short

    def accepted(self, tokens: Sequence[int], n_accepted: int, hidden_states: np.ndarray | None = None) -> None:
        if self._from_lookup is not None:
            self._from_lookup.accepted(tokens, n_accepted, hidden_states)
        self.model.accepted(tokens, n_accepted, hidden_states)
