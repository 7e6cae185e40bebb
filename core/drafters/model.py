"""A small draft model sharing the target's tokenizer, run by any backend's Target."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import SpecrunError
from ..interfaces import Backend, Draft, Drafter, Target
from ..models import ModelConfig, resolve_model
from ..sampling import Sampler
from ..tokenizer import load_tokenizer, vocabulary_difference

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_vocab(draft_vocab_size: int, target_vocab_size: int) -> None:
    if draft_vocab_size != target_vocab_size:
        raise SpecrunError(f"the draft model's vocabulary ({draft_vocab_size} tokens) differs from the target's "
                           f"({target_vocab_size}); use a draft model that shares the target's tokenizer")


def load_model_drafter(backend: Backend, draft: str | None, model_dir: Path, config: ModelConfig, *, device: str,
                       precision: str | None, options: dict | None):
    """(drafter, the target's tokenizer) for ``--drafter model --draft DRAFT``, after checking,
    before loading anything, that the draft shares the target's vocabulary and tokenizer (the same
    token texts at the same ids: a draft with another tokenizer of the same size would propose ids
    that mean other text, and be accepted silently at a lower rate)."""
    if not draft:
        raise SpecrunError("the 'model' drafter needs --draft PATH (a small model sharing the target's tokenizer)")
    draft_dir = resolve_model(draft)
    check_vocab(ModelConfig.load(draft_dir).vocab_size, config.vocab_size)
    if not any((draft_dir / f).exists() for f in _TOKENIZER_FILES):
        raise SpecrunError(f"the draft model {draft_dir} has no tokenizer to compare with the target's; if it "
                           f"shares the target's tokenizer, copy the target's tokenizer files into it")
    tok = load_tokenizer(model_dir)
    differs = vocabulary_difference(tok, load_tokenizer(draft_dir))
    if differs:
        raise SpecrunError(f"the draft model {draft_dir} has another tokenizer than the target {model_dir} "
                           f"({differs}); use a draft model that shares the target's tokenizer")
    model = backend.load_target(str(draft_dir), device=device, precision=precision, options=options)
    return ModelDrafter(model, config.vocab_size), tok


class ModelDrafter(Drafter):
    """A small causal LM sharing the target's tokenizer, run by any backend's ``Target``."""

    name = "model"

    def __init__(self, model: Target, target_vocab_size: int):
        check_vocab(model.info.vocab_size, target_vocab_size)
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
