"""Greedy speculative decoding is token-for-token the target's own greedy decoding, for every drafter."""

from __future__ import annotations

import numpy as np
import pytest

from specrun.decode import SpeculativeDecoder
from specrun.drafters import ModelDrafter, NgramDrafter, NoDrafter
from specrun.errors import SpecrunError
from specrun.interfaces import Draft, Drafter

PROMPTS = [
    [5, 17, 300, 42, 9, 1200, 77, 8, 8, 613, 2000, 31],
    [100, 101, 102, 103, 100, 101, 102, 103, 100, 101],
    [7] * 3 + [4000, 4001, 7, 7, 7, 4000],
]


def run(target, drafter, prompt, k, n=40):
    dec = SpeculativeDecoder(target, drafter, k)
    out = [t for chunk in dec.generate(prompt, n) for t in chunk]
    return out, dec.stats


def plain_greedy(target, prompt, n=40):
    """Reference: argmax one token at a time, straight on the target."""
    target.reset(len(prompt) + n + 1)
    logits = target.forward(prompt).logits[-1]
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = target.forward([tok]).logits[0]
    return out


class NoisyOracle(Drafter):
    """Proposes the true greedy continuation with some tokens corrupted: exercises partial acceptance."""

    name = "oracle"

    def __init__(self, truth: list[int], prompt_len: int, seed: int):
        self.truth, self.p, self.rng = truth, prompt_len, np.random.default_rng(seed)

    def propose(self, tokens, k, sampler):
        pos = len(tokens) - self.p
        prop = list(self.truth[pos : pos + k])
        for i in range(len(prop)):
            if self.rng.random() < 0.25:
                prop[i] = (prop[i] + 1) % 49152
        return Draft(prop)


@pytest.fixture(scope="module")
def target(tiny_models, torch_backend):
    return torch_backend.load_target(str(tiny_models["qwen3"]), device="cpu")


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("pi", range(len(PROMPTS)))
def test_every_drafter_is_lossless(target, tiny_draft, torch_backend, k, pi):
    prompt = PROMPTS[pi]
    ref = plain_greedy(target, prompt)
    draft_model = torch_backend.load_target(str(tiny_draft), device="cpu")
    drafters = [NoDrafter(), NgramDrafter(), ModelDrafter(draft_model, 49152), NoisyOracle(ref, len(prompt), pi)]
    for drafter in drafters:
        out, stats = run(target, drafter, prompt, k)
        assert out == ref, f"{drafter.name} k={k} diverged"
        assert stats.new_tokens == len(ref)
        if drafter.name == "oracle":
            assert 0 < stats.accepted < stats.drafted  # both branches were exercised


def test_draft_equal_to_target_accepts_everything(tiny_models, torch_backend):
    folder = str(tiny_models["llama"])
    target = torch_backend.load_target(folder, device="cpu")
    drafter = ModelDrafter(torch_backend.load_target(folder, device="cpu"), 49152)
    out, stats = run(target, drafter, PROMPTS[0], 4, n=41)
    assert out == plain_greedy(target, PROMPTS[0], 41)
    assert stats.accepted == stats.drafted
    assert stats.acceptance_length == pytest.approx(5.0)
    assert stats.acceptance_rate_per_position == [1.0] * 4


def test_stats_count_positions(target):
    prompt = PROMPTS[0]
    ref = plain_greedy(target, prompt)
    out, s = run(target, NoisyOracle(ref, len(prompt), 3), prompt, 4)
    assert sum(s.drafted_per_position) == s.drafted
    assert sum(s.accepted_per_position) == s.accepted
    # a position is only accepted when all before it were
    assert all(a >= b for a, b in zip(s.accepted_per_position, s.accepted_per_position[1:], strict=False))
    assert s.decode_tokens == len(out) - 1
    assert s.acceptance_length == pytest.approx((len(out) - 1) / s.target_calls)


def test_draft_seconds_count_the_drafter_catching_up(target):
    """A drafter's work after verification (an EAGLE-3 head's forward over the accepted tokens) is
    drafting time: the stats count it, not only propose()."""
    import time

    prompt = PROMPTS[0]
    ref = plain_greedy(target, prompt)

    class SlowToCatchUp(NoisyOracle):
        calls = 0

        def accepted(self, tokens, n_accepted, hidden_states=None):
            SlowToCatchUp.calls += 1
            time.sleep(0.002)

    _, s = run(target, SlowToCatchUp(ref, len(prompt), 3), prompt, 4)
    assert SlowToCatchUp.calls == s.target_calls + 1  # after the prefill and after every verification call
    assert s.draft_seconds >= 0.002 * s.target_calls


def test_eos_stops_and_is_not_emitted(target):
    prompt = PROMPTS[0]
    ref = plain_greedy(target, prompt)
    eos = ref[10]
    first = ref.index(eos)
    out, s = run_eos(target, prompt, eos)
    assert out == ref[:first]
    assert s.stop_reason == "eos"


def run_eos(target, prompt, eos):
    dec = SpeculativeDecoder(target, NgramDrafter(), 4)
    out = [t for chunk in dec.generate(prompt, 40, eos_token_ids=[eos]) for t in chunk]
    return out, dec.stats


def test_draft_vocabulary_mismatch_is_refused(tmp_path, torch_backend):
    from .conftest import make_tiny_model

    small = make_tiny_model(tmp_path / "v", "llama", vocab_size=1000)
    with pytest.raises(SpecrunError, match=r"vocabulary \(1000 tokens\) differs from the target's \(49152\)"):
        ModelDrafter(torch_backend.load_target(str(small), device="cpu"), 49152)


def test_bad_lengths(target):
    dec = SpeculativeDecoder(target, NoDrafter(), 2)
    with pytest.raises(SpecrunError, match="context limit of 512"):
        list(dec.generate([3] * 500, 20))
    with pytest.raises(SpecrunError, match="prompt is empty"):
        list(dec.generate([], 5))
    with pytest.raises(SpecrunError, match="k must be >= 1"):
        SpeculativeDecoder(target, NoDrafter(), 0)


def test_ngram_drafter_finds_latest_match():
    d = NgramDrafter(max_ngram=2)
    assert d.propose([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], 3, None).tokens == [4, 8, 1]
    assert d.propose([1, 2, 3], 3, None).tokens == []
    assert d.propose([5, 6, 5], 2, None).tokens == [6, 5]


def test_ngram_draft_length_follows_its_acceptance():
    """With min_prob, lookup drafts shrink where they keep failing and stay whole where they are
    accepted; a cut position is tried again once old failures fade."""
    seq = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    d = NgramDrafter(min_prob=0.3)
    d.start(seq, 64)
    assert len(d.propose(seq, 4, None).tokens) == 4  # no record yet: the prior (0.5) drafts all
    lengths = []
    for _ in range(12):  # nothing ever accepted
        d.accepted(seq, 0)
        lengths.append(len(d.propose(seq, 4, None).tokens))
    assert lengths[2] == 0 and 0 in lengths[-3:] and max(lengths[-3:]) <= 1
    d.start(seq, 64)
    for _ in range(12):  # everything accepted
        assert len(d.propose(seq, 4, None).tokens) == 4
        d.accepted(seq, 4)
    assert NgramDrafter().propose(seq, 4, None).tokens == [4, 5, 6, 7]  # min_prob 0: the plain lookup


@pytest.mark.parametrize("min_prob", [0.2, 0.5])
def test_adaptive_ngram_stays_lossless(target, min_prob):
    """On the prompt whose lookups do draft (and are rejected: a random model), cutting them keeps
    the output; at 0.5 the cut removes most drafts."""
    prompt = PROMPTS[2]
    out, stats = run(target, NgramDrafter(min_prob=min_prob), prompt, 4)
    full = run(target, NgramDrafter(), prompt, 4)[1]
    assert out == plain_greedy(target, prompt)
    assert full.drafted > 0 and stats.drafted <= full.drafted
    if min_prob == 0.5:
        assert stats.drafted < full.drafted


def test_the_loop_drafts_no_more_than_the_target_verifies_at_once(target):
    """A target whose exact kernels stop at block_rows rows gets at most block_rows - 1 draft tokens
    a call (openvino on CPUs whose compressed-weight kernels agree only within 2-4 rows)."""
    prompt = PROMPTS[0]
    ref = plain_greedy(target, prompt)
    target.block_rows = 3
    try:
        out, stats = run(target, NoisyOracle(ref, len(prompt), 0), prompt, 6)
    finally:
        del target.block_rows
    assert out == ref
    assert min(stats.drafted_per_position[:2]) > 0 and stats.drafted_per_position[2:] == [0] * 4
    assert run(target, NoisyOracle(ref, len(prompt), 0), prompt, 6)[1].drafted_per_position[2] > 0  # unlimited again
