"""Turning logits into distributions (temperature, top-k, top-p) and drawing from them.
The same processing is applied to the target and to the draft, so that rejection sampling
reproduces exactly the distribution the user asked for."""

from __future__ import annotations

import attrs
import numpy as np

from .errors import SpecrunError


@attrs.frozen
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if not (self.temperature >= 0):
            raise SpecrunError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SpecrunError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise SpecrunError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


class Sampler:
    """Holds the sampling parameters and the request's random generator."""

    def __init__(self, params: SamplingParams):
        if params.greedy:
            raise ValueError("Sampler is for temperature > 0")
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """[..., V] logits -> processed probabilities (float64 for exact rejection arithmetic)."""
        p = self.params
        x = np.asarray(logits, dtype=np.float64) / p.temperature
        if p.top_k and p.top_k < x.shape[-1]:
            kth = np.partition(x, -p.top_k, axis=-1)[..., -p.top_k][..., None]
            x = np.where(x < kth, -np.inf, x)
        probs = softmax(x)
        if p.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_p = np.take_along_axis(probs, order, axis=-1)
            cum = np.cumsum(sorted_p, axis=-1)
            # keep a token if the mass strictly before it is < top_p (always keeps the top token)
            keep_sorted = (cum - sorted_p) < p.top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(axis=-1, keepdims=True)
        return probs

    def sample(self, probs: np.ndarray) -> int:
        cdf = np.cumsum(probs)
        u = self.rng.random() * cdf[-1]
        return int(min(np.searchsorted(cdf, u, side="right"), len(probs) - 1))

    def uniform(self) -> float:
        return float(self.rng.random())
