"""Turning logits into distributions (temperature, top-k, top-p) and drawing from them.
The same processing is applied to the target and to the draft, so that rejection sampling
reproduces exactly the distribution the user asked for."""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np

from .errors import SpecrunError

#: the smallest temperature that samples: below it, logits / temperature overflow (``-t 1e-320``
#: gives inf - inf = NaN probabilities) and the distribution is greedy in all but name anyway
MIN_TEMPERATURE = 1e-3


@attrs.frozen
class SamplingParams:
    """Sampling values, checked here once for every caller (CLI, bench, library): a bad value is a
    SpecrunError naming it, never NaN probabilities or a traceback from the random generator."""

    temperature: float = 0.0  # 0 = greedy, else >= MIN_TEMPERATURE
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        t = _number(self.temperature, "temperature")
        if not math.isfinite(t):
            raise SpecrunError(f"temperature must be a finite number (0 = greedy), got {self.temperature}")
        if t < 0:
            raise SpecrunError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if 0 < t < MIN_TEMPERATURE:
            raise SpecrunError(f"temperature {self.temperature} is too small to sample with: use 0 for greedy decoding "
                               f"or at least {MIN_TEMPERATURE}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SpecrunError(f"top-k must be an integer >= 0 (0 = off), got {self.top_k}")
        top_p = _number(self.top_p, "top-p")
        if not (0 < top_p <= 1):
            raise SpecrunError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise SpecrunError(f"the seed must be an integer >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(value, name: str) -> float:
    if isinstance(value, bool):
        raise SpecrunError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SpecrunError(f"{name} must be a number, got {value!r}") from None


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """The stop strings, checked: each a non-empty string (an empty one would match everywhere, and
    used to make streaming drop characters)."""
    if isinstance(stop, str):
        stop = (stop,)
    out = tuple(stop)
    for s in out:
        if not isinstance(s, str):
            raise SpecrunError(f"stop strings must be text, got {s!r}")
        if not s:
            raise SpecrunError("a stop string is empty; give non-empty text to --stop (or leave it out)")
    return out


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
