"""Speculative sampling reproduces the target's distribution (a chi-square test with fixed seeds),
and the same test catches a wrong acceptance rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from specrun.decode import SpeculativeDecoder
from specrun.drafters import ModelDrafter, NgramDrafter
from specrun.errors import SpecrunError
from specrun.interfaces import ModelInfo, StepOutput, Target
from specrun.sampling import Sampler, SamplingParams
from specrun.verify import SpeculativeSamplingVerifier

V = 4
ALPHA = 1e-3  # false-alarm rate of each test: a correct sampler fails it with probability 0.1%


class BigramTarget(Target):
    """A toy LM whose next-token logits depend only on the last token: exact probabilities are known."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self.info = ModelInfo(len(table), 10_000, 1, 1)
        self.backend, self.device, self.precision = "toy", "cpu", "f64"
        self.cache: list[int] = []

    def reset(self, capacity):
        self.cache = []

    @property
    def length(self):
        return len(self.cache)

    def forward(self, tokens, *, all_logits=True):
        self.cache.extend(tokens)
        logits = self.table[np.asarray(tokens)]
        return StepOutput(logits if all_logits else logits[-1:])

    def rollback(self, length):
        del self.cache[length:]


TARGET = np.log(np.array([[0.50, 0.30, 0.15, 0.05], [0.10, 0.20, 0.30, 0.40], [0.25, 0.25, 0.25, 0.25], [0.70, 0.10, 0.10, 0.10]]))
DRAFT = np.log(np.array([[0.05, 0.15, 0.30, 0.50], [0.60, 0.20, 0.10, 0.10], [0.10, 0.10, 0.70, 0.10], [0.05, 0.05, 0.10, 0.80]]))
PROMPT = [0, 3, 1, 3]  # the ngram drafter finds [3 -> 1, 3] etc. in it
N_NEW = 4


def exact_joint(params: SamplingParams) -> dict[tuple[int, ...], float]:
    p = Sampler(params).probs(TARGET)  # processed target distribution, row = previous token
    out = {}
    for seq in itertools.product(range(V), repeat=N_NEW):
        prob, prev = 1.0, PROMPT[-1]
        for tok in seq:
            prob *= p[prev, tok]
            prev = tok
        out[seq] = prob
    return out


def sample_counts(drafter_factory, params: SamplingParams, n: int, verifier_factory=None) -> dict:
    counts: dict[tuple[int, ...], int] = {}
    target = BigramTarget(TARGET)
    for seed in range(n):
        kwargs = {"verifier_factory": verifier_factory} if verifier_factory else {}
        dec = SpeculativeDecoder(target, drafter_factory(), 3, **kwargs)
        seq = tuple(t for chunk in dec.generate(PROMPT, N_NEW, SamplingParams(params.temperature, params.top_k, params.top_p, seed)) for t in chunk)
        counts[seq] = counts.get(seq, 0) + 1
    return counts


def chi_square_pvalue(counts: dict, expected_p: dict, n: int) -> float:
    seqs = [s for s, p in expected_p.items() if p > 0]
    assert set(counts) <= set(seqs), "a sequence the target cannot produce was sampled"
    obs = np.array([counts.get(s, 0) for s in seqs], dtype=float)
    exp = np.array([expected_p[s] for s in seqs]) * n
    # pool rare cells so the chi-square approximation holds (expected >= 5)
    rare = exp < 5
    if rare.any():
        obs = np.append(obs[~rare], obs[rare].sum())
        exp = np.append(exp[~rare], exp[rare].sum())
    return float(sps.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def model_drafter():
    return ModelDrafter(BigramTarget(DRAFT), V)


CASES = [
    ("model", model_drafter, SamplingParams(temperature=1.0)),
    ("model", model_drafter, SamplingParams(temperature=0.7, top_k=3, top_p=0.9)),
    ("ngram", NgramDrafter, SamplingParams(temperature=1.3, top_p=0.95)),
]
N = 3000


@pytest.mark.parametrize("name,factory,params", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_speculative_sampling_matches_target_distribution(name, factory, params):
    counts = sample_counts(factory, params, N)
    assert chi_square_pvalue(counts, exact_joint(params), N) > ALPHA


class ResidualIgnoringVerifier(SpeculativeSamplingVerifier):
    """A deliberately wrong rule: on rejection, draw from p instead of norm(max(p - q, 0))."""

    def verify(self, logits, draft):
        s = self.sampler
        out = []
        for i, tok in enumerate(draft.tokens):
            p = s.probs(logits[i])
            q = draft.probs[i]
            if s.uniform() * q[tok] < p[tok]:
                out.append(tok)
                continue
            out.append(s.sample(p))
            return out
        out.append(s.sample(s.probs(logits[len(draft.tokens)])))
        return out


def test_the_same_test_fails_for_a_wrong_acceptance_rule():
    params = SamplingParams(temperature=1.0)

    def wrong(p):
        sampler = Sampler(p)
        return ResidualIgnoringVerifier(sampler), sampler

    counts = sample_counts(model_drafter, params, N, verifier_factory=wrong)
    assert chi_square_pvalue(counts, exact_joint(params), N) < ALPHA


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=1.0, seed=123)
    target = BigramTarget(TARGET)
    runs = []
    for _ in range(2):
        dec = SpeculativeDecoder(target, model_drafter(), 3)
        runs.append([t for c in dec.generate(PROMPT, 30, params) for t in c])
    assert runs[0] == runs[1]


def test_processing_top_k_top_p():
    s = Sampler(SamplingParams(temperature=1.0, top_k=2))
    p = s.probs(np.log(np.array([0.1, 0.5, 0.3, 0.1])))
    assert p == pytest.approx([0, 0.625, 0.375, 0])
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7))
    p = s.probs(np.log(np.array([0.1, 0.5, 0.3, 0.1])))
    assert p == pytest.approx([0, 0.625, 0.375, 0])  # 0.5 < 0.7, so 0.3 is kept too
    s = Sampler(SamplingParams(temperature=0.5))
    p = s.probs(np.log(np.array([0.2, 0.8])))
    assert p == pytest.approx([0.2**2 / (0.2**2 + 0.8**2), 0.8**2 / (0.2**2 + 0.8**2)])


@pytest.mark.parametrize(
    "kwargs,msg",
    [({"temperature": -1}, "temperature must be >= 0"), ({"top_p": 0}, r"top-p must be in \(0, 1\]"),
     ({"top_p": 1.5}, "top-p"), ({"top_k": -2}, "top-k must be an integer >= 0"),
     ({"temperature": float("inf")}, "temperature must be a finite number"),
     ({"temperature": float("nan")}, "temperature must be a finite number"),
     ({"temperature": 1e-320}, "too small to sample with: use 0 for greedy decoding or at least 0.001"),
     ({"top_p": float("nan")}, "top-p must be in"), ({"top_k": 1.5}, "top-k must be an integer"),
     ({"seed": -1}, "seed must be an integer >= 0"), ({"temperature": "hot"}, "temperature must be a number")],
)
def test_bad_sampling_parameters(kwargs, msg):
    with pytest.raises(SpecrunError, match=msg):
        SamplingParams(**kwargs)


def test_smallest_temperature_gives_finite_probabilities():
    """At MIN_TEMPERATURE the processed distribution is still a distribution (below it, logits /
    temperature overflowed to inf - inf = NaN)."""
    from specrun.sampling import MIN_TEMPERATURE

    p = Sampler(SamplingParams(temperature=MIN_TEMPERATURE, seed=0)).probs(np.array([30.0, 29.9, -40.0]))
    assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0) and p[0] > 0.99


def test_empty_stop_strings_are_refused():
    from specrun.sampling import check_stop_strings

    assert check_stop_strings(["ab", "c"]) == ("ab", "c")
    with pytest.raises(SpecrunError, match="a stop string is empty"):
        check_stop_strings(["ab", ""])
