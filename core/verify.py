"""Verifiers: turn the target's logits over [pending, d1..dk] into accepted tokens + one bonus token.

``logits[i]`` is the target's prediction for the token after input i, so draft token ``d_{i+1}``
is checked against ``logits[i]`` and the bonus token comes from ``logits[n_accepted]``."""

from __future__ import annotations

import abc

import numpy as np

from .interfaces import Draft
from .sampling import Sampler


class Verifier(abc.ABC):
    @abc.abstractmethod
    def verify(self, logits: np.ndarray, draft: Draft) -> list[int]:
        """Return the accepted prefix of ``draft.tokens`` followed by one token drawn from the target."""


class GreedyVerifier(Verifier):
    """Lossless for greedy decoding: the output is the target's own argmax sequence."""

    def verify(self, logits: np.ndarray, draft: Draft) -> list[int]:
        best = np.argmax(logits, axis=-1)
        out: list[int] = []
        for i, tok in enumerate(draft.tokens):
            if int(best[i]) != tok:
                break
            out.append(tok)
        out.append(int(best[len(out)]))
        return out


class SpeculativeSamplingVerifier(Verifier):
    """Rejection sampling (Leviathan et al. 2023, Chen et al. 2023): accept d with probability
    min(1, p(d)/q(d)); on rejection draw from norm(max(p - q, 0)).  The output tokens are
    distributed exactly as sampling from the processed target distribution p."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def verify(self, logits: np.ndarray, draft: Draft) -> list[int]:
        s = self.sampler
        out: list[int] = []
        for i, tok in enumerate(draft.tokens):
            p = s.probs(logits[i])
            if draft.probs is None:  # deterministic proposal: q is a point mass on tok
                q = np.zeros_like(p)
                q[tok] = 1.0
            else:
                q = np.asarray(draft.probs[i], dtype=np.float64)
            if q[tok] > 0 and s.uniform() * q[tok] < p[tok]:
                out.append(tok)
                continue
            residual = np.maximum(p - q, 0.0)
            total = residual.sum()
            out.append(s.sample(residual / total if total > 0 else p))
            return out
        out.append(s.sample(s.probs(logits[len(draft.tokens)])))
        return out
