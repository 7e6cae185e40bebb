"""Drafters that need no particular backend: none (plain decoding), n-gram prompt lookup, and a
small draft model run by any backend's Target."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import SpecrunError
from .interfaces import Draft, Drafter, Target
from .sampling import Sampler


class NoDrafter(Drafter):
    """Proposes nothing: the loop degenerates to plain decoding (the baseline)."""

    name = "none"

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        return Draft([])


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


class LookupFirstDrafter(Drafter):
    """Prompt lookup when the sequence repeats itself (its last ``min_ngram``+ tokens occurred
    before), else a model-backed drafter (an EAGLE-3 head).  Small models loop and quote: over 256
    tokens of MT-bench, lookup drafts were accepted far more often than the shipped head's; the head
    drafts where lookup finds nothing.  The model drafter still sees every accepted token (its
    cache stays in step); the choice reads the sequence only, so verification stays lossless."""

    def __init__(self, model: Drafter, *, min_ngram: int = 2, max_ngram: int = 3):
        self.model = model
        self.lookup = NgramDrafter(max_ngram=max_ngram, min_ngram=min_ngram)
        self.name = f"{model.name}+ngram"
        self.aux_hidden_layers = model.aux_hidden_layers

    @property
    def runs_on(self) -> str:
        return self.model.runs_on

    def start(self, prompt: Sequence[int], capacity: int) -> None:
        self.model.start(prompt, capacity)

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        draft = self.lookup.propose(tokens, k, sampler)
        return draft if len(draft.tokens) else self.model.propose(tokens, k, sampler)

    def accepted(self, tokens: Sequence[int], n_accepted: int, hidden_states: np.ndarray | None = None) -> None:
        self.model.accepted(tokens, n_accepted, hidden_states)
