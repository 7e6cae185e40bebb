"""PayingDrafter: a model-backed drafter drafts only while its drafts measure faster than plain steps.

Time here is a fake clock that the target and the drafter advance by what their work would cost,
so the tests decide nothing by the machine's speed."""

from __future__ import annotations

import pytest

from specrun.decode import SpeculativeDecoder
from specrun.drafters import PayingDrafter
from specrun.interfaces import Draft, Drafter
from specrun.sampling import SamplingParams

from .test_lossless import PROMPTS, plain_greedy

STEP = 10.0  # a 1-token step
ROW = 1.0  # each further row of a verification block
HEAD = 3.0  # a model drafter's work per call


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedTarget:
    """The tiny target, advancing the clock by what a call of that many rows costs."""

    def __init__(self, inner, clock: Clock):
        self.inner, self.clock = inner, clock

    def forward(self, tokens, **kw):
        self.clock.now += STEP + ROW * (len(tokens) - 1)
        return self.inner.forward(tokens, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Oracle(Drafter):
    """Drafts the target's greedy continuation, right (``right``) or off by one token id, and costs HEAD."""

    name = "oracle"

    def __init__(self, truth: list[int], prompt_len: int, clock: Clock, right: bool):
        self.truth, self.p, self.clock, self.right = truth, prompt_len, clock, right
        self.proposed = 0

    def propose(self, tokens, k, sampler):
        self.clock.now += HEAD
        self.proposed += 1
        pos = len(tokens) - self.p
        prop = list(self.truth[pos : pos + k])
        return Draft(prop if self.right else [(t + 1) % 49152 for t in prop])


@pytest.fixture(scope="module")
def target(tiny_models, torch_backend):
    return torch_backend.load_target(str(tiny_models["qwen3"]), device="cpu")


def decode(target, right: bool, n: int = 80, sampling=None):
    prompt = PROMPTS[0]
    ref = plain_greedy(target, prompt, n)
    clock = Clock()
    oracle = Oracle(ref, len(prompt), clock, right)
    gated = PayingDrafter(oracle, clock=clock)
    dec = SpeculativeDecoder(TimedTarget(target, clock), gated, 4)
    out = [t for chunk in dec.generate(prompt, n, sampling) for t in chunk]
    return out, ref, gated, oracle, dec.stats


def test_drafts_that_never_pay_are_paused_and_retried_less_and_less(target):
    out, ref, gated, oracle, stats = decode(target, right=False)
    assert out == ref  # lossless whatever is drafted
    assert gated.calls_paused > 4 * gated.calls_drafted  # mostly plain steps
    assert oracle.proposed == gated.calls_drafted >= 3  # it was tried again, and again
    # the waits double: 8, 16, 32 ... paused calls between retries, not one retry every 8 calls
    assert gated.calls_drafted < stats.target_calls / 8


def test_drafts_that_pay_keep_drafting(target):
    out, ref, gated, oracle, stats = decode(target, right=True)
    assert out == ref
    assert gated.calls_paused <= 1  # at most the one plain step that measures what drafting competes with
    assert stats.acceptance_length > 4


def test_sampling_never_pauses(target):
    """The rule reads the clock; a seed must give the same text every run, so sampling drafts every call."""
    sampling = SamplingParams(temperature=0.8, seed=3)
    _, _, gated, oracle, stats = decode(target, right=False, n=30, sampling=sampling)
    assert gated.calls_paused == 0 and oracle.proposed == stats.target_calls - 1  # the last call has one token left: no draft


def test_the_pipeline_gates_model_drafters_unless_told_not_to(tiny_models, tmp_path):
    from specrun.pipeline import Pipeline

    from .test_eagle3 import make_head

    folder, head = str(tiny_models["llama"]), str(make_head(tmp_path / "h"))
    on = Pipeline.load(folder, backend="torch_cuda", drafter="eagle3", draft=head)
    off = Pipeline.load(folder, backend="torch_cuda", drafter="eagle3", draft=head, draft_gate=False)
    lookup = Pipeline.load(folder, backend="torch_cuda", drafter="eagle3+ngram", draft=head)
    assert isinstance(on.drafter, PayingDrafter) and not isinstance(off.drafter, PayingDrafter)
    assert isinstance(lookup.drafter.model, PayingDrafter)
    assert on.generate("Hello there", max_new_tokens=12).token_ids == off.generate("Hello there", max_new_tokens=12).token_ids


def test_a_lazy_catch_up_is_charged_per_call_it_covers_and_what_was_learnt_carries_over():
    """A retry after n paused calls catches up on all n in one go; the gate charges that call what
    catching up call by call costs (1/n of it), and the next request starts from what was learnt."""
    clock = Clock()

    class Lazy(Drafter):
        name = "lazy"
        pending = 0

        def catch_up(self):
            clock.now += 4.0 * self.pending  # a forward over the calls it has not seen
            self.pending = 0

        def propose(self, tokens, k, sampler):
            self.catch_up()
            clock.now += 1.0
            return Draft([7])

        def accepted(self, tokens, n_accepted, hidden_states=None):
            self.pending += 1

    gated = PayingDrafter(Lazy(), clock=clock)

    def call(accept: int) -> bool:
        drafted = bool(gated.propose([1, 2, 3], 4, None).tokens)
        clock.now += STEP + ROW * drafted
        gated.accepted([1, 2, 3], accept if drafted else 0)
        return drafted

    gated.start([1], 16)
    gated.accepted([1, 2], 0)  # after the prefill: the first catch-up is the prompt's, not charged
    assert call(0) and gated.call_seconds == 1.0 + STEP + ROW  # drafted, nothing accepted
    assert not call(0)  # the one plain step that measures what drafting competes with
    assert gated.step_seconds == STEP and not gated.pays()
    paused = [call(0) for _ in range(7)]  # with the measuring step: 8 paused calls, then a retry
    assert not any(paused) and gated.calls_paused == 8
    before = gated.call_seconds
    assert call(1)  # the retry: it catches up on 9 calls (36 s of forwards), charged 4 s
    assert gated.call_seconds == pytest.approx(before + 0.2 * (4.0 + 1.0 + STEP + ROW - before))
    assert gated.call_tokens == pytest.approx(1.0 + 0.2 * 1.0)
    gated.start([1], 16)  # a new request: still known not to pay, so it starts paused
    gated.accepted([1, 2], 0)
    assert not call(0) and gated.calls_paused == 1


def test_lookup_first_falls_back_to_a_one_token_match_where_the_model_drafts_nothing():
    """eagle3+ngram: a 2-3 token match first, else the model, else (the model paused or unsure)
    a 1-token match, as prompt lookup alone would draft."""
    from specrun.drafters import LookupFirstDrafter

    class Fixed(Drafter):
        name = "fixed"

        def __init__(self, draft):
            self.draft = draft

        def propose(self, tokens, k, sampler):
            return Draft(list(self.draft))

    tokens = [5, 6, 7, 9, 5]  # "5" occurred before (then 6, 7, 9); "9 5" did not
    assert LookupFirstDrafter(Fixed([])).propose(tokens, 3, None).tokens == [6, 7, 9]
    assert LookupFirstDrafter(Fixed([42])).propose(tokens, 3, None).tokens == [42]
    assert LookupFirstDrafter(Fixed([42])).propose([*tokens, 6], 3, None).tokens == [7, 9, 5]  # "5 6" matches
    assert LookupFirstDrafter(Fixed([]), min_ngram=1).short is None


class Costs:
    """A target whose calls cost ``cost(rows)`` on the fake clock."""

    def __init__(self, inner, clock: Clock, cost):
        self.inner, self.clock, self.cost = inner, clock, cost

    def forward(self, tokens, **kw):
        self.clock.now += self.cost(len(tokens))
        return self.inner.forward(tokens, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def paying_lookup(target, prompt, cost, n=60, sampling=None):
    from specrun.drafters import NgramDrafter

    clock = Clock()
    drafter = NgramDrafter(paying=True, clock=clock)
    dec = SpeculativeDecoder(Costs(target, clock, cost), drafter, 4)
    out = [t for chunk in dec.generate(prompt, n, sampling) for t in chunk]
    return out, dec.stats, drafter


def cycle_target():
    """A toy LM that counts 0..7 and wraps: prompt lookup drafts it right from the second lap."""
    import numpy as np

    from .test_sampling import BigramTarget

    return BigramTarget(np.log(np.full((8, 8), 0.01) + 0.9 * np.roll(np.eye(8), 1, axis=1)))


def test_paying_lookup_drafts_whole_where_blocks_are_cheap_and_none_where_they_cannot_pay():
    """Lookup drafts that are always right: with blocks that cost a step (OpenVINO-like) the paying
    lookup drafts all plain lookup does but for the one plain step that times what drafting competes
    with; where every further row costs 1.5 steps no draft can pay, so once
    the block sizes are timed it takes plain steps, exploring now and then — output identical."""
    from specrun.drafters import NgramDrafter

    prompt = list(range(8)) + [0, 1]
    full = SpeculativeDecoder(cycle_target(), NgramDrafter(), 4)
    ref = [t for c in full.generate(prompt, 200) for t in c]
    cheap_out, cheap, _ = paying_lookup(cycle_target(), prompt, lambda rows: STEP, n=200)
    dear_out, dear, drafter = paying_lookup(cycle_target(), prompt, lambda rows: STEP * (1.5 * rows - 0.5), n=200)
    assert cheap_out == ref and dear_out == ref
    assert full.stats.drafted > 100 and cheap.drafted >= full.stats.drafted - 4  # one plain step, to time it
    assert dear.drafted < full.stats.drafted / 5  # 10 to time the sizes, then explorations ever further apart
    assert drafter.cost[1] == pytest.approx(STEP) and set(drafter.cost) == {1, 2, 3, 4, 5}  # every size timed


def test_paying_lookup_keeps_drafts_that_are_accepted_even_when_blocks_cost_more():
    """The choice is expected tokens per second: a match whose drafts are always accepted keeps
    drafting all 4 where 5 rows cost 2 steps (~4.4 expected tokens for 2 steps' time) and none where
    every further row costs 1.5 steps."""
    from specrun.drafters import NgramDrafter

    seq = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    cheap = {1: 1.0, 2: 1.2, 3: 1.5, 4: 1.8, 5: 2.0}
    dear = {1: 1.0, 2: 2.5, 3: 4.0, 4: 5.5, 5: 6.0}
    for costs, want in ((cheap, 4), (dear, 0)):
        d = NgramDrafter(paying=True, clock=Clock())
        d.start(seq, 64)
        for _ in range(6):  # a record of every draft accepted
            d.cost = dict(cheap)
            drafted = d.propose(seq, 4, None).tokens
            d.accepted(seq, len(drafted))
        d.cost = dict(costs)
        assert len(d.propose(seq, 4, None).tokens) == want


def test_paying_lookup_drafts_everything_when_sampling():
    """Sampling never reads the clock: a seed gives the same text however fast the hardware is."""
    prompt = list(range(8)) + [0, 1]
    params = SamplingParams(temperature=0.8, seed=3)
    a, sa, _ = paying_lookup(cycle_target(), prompt, lambda rows: STEP * rows * 2, n=60, sampling=params)
    b, sb, _ = paying_lookup(cycle_target(), prompt, lambda rows: STEP, n=60, sampling=params)
    assert a == b and sa.drafted == sb.drafted > 0


def test_the_suffix_index_answers_what_a_scan_of_the_whole_sequence_answers():
    """propose() looks up through an incremental index; it must match a full scan as the
    sequence grows, and after it shrinks (a new request) or changes (another conversation)."""
    import numpy as np

    from specrun.drafters import NgramDrafter
    from specrun.drafters.ngram import SuffixIndex

    class Scan:  # the definition, one NumPy scan of the whole sequence per call
        def __init__(self, max_n: int, min_n: int):
            self.max_n, self.min_n, self.matched = max_n, min_n, 0

        def lookup(self, tokens, k: int) -> list[int]:
            arr, self.matched = np.asarray(tokens, dtype=np.int64), 0
            for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
                windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
                hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
                if len(hits) and k > 0:
                    self.matched = n
                    return arr[int(hits[-1]) + n : int(hits[-1]) + n + k].tolist()
            return []

    rng = np.random.default_rng(7)
    for max_n, min_n in ((3, 1), (3, 3), (2, 1)):
        scan, index = Scan(max_n, min_n), SuffixIndex(max_n, min_n)
        seq: list[int] = []
        for step in range(400):
            if step % 97 == 96:  # a shorter sequence, then one that differs inside the indexed part
                seq = seq[: len(seq) // 2]
            elif step % 131 == 130 and seq:
                seq[len(seq) // 3] += 1
            elif step % 37 == 36 and len(seq) > 3:  # a recent token changed: n-grams indexed from it are stale
                seq[-3] = (seq[-3] + 1) % 6
            seq += [int(t) for t in rng.integers(0, 6, rng.integers(1, 4))]  # small vocabulary: many matches
            for k in (1, 4):
                want = scan.lookup(seq, k)
                got, matched = index.lookup(list(seq), k)
                assert got == want, (step, k)
                assert matched == scan.matched
    assert index.lookup([5], 4) == ([], 0)
    assert index.lookup([1, 2, 1], 0) == ([], 0)
    assert index.lookup(np.array([1, 2, 1, 2]), 4) == ([1, 2], 2)  # arrays as lists

    # the drafter's propose() goes through the index (and start() resets it)
    d, scan = NgramDrafter(3, 1), Scan(3, 1)
    for prompt, want in (([4, 5, 6, 4, 5], [6, 4]), ([9, 8, 9], [8, 9])):
        d.start(prompt, 64)
        assert d.propose(prompt, 2, None).tokens == scan.lookup(prompt, 2) == want
        assert d.matched == scan.matched > 0
