"""The speculative loop: prefill, draft k, verify all k in ONE target call, accept, roll back, repeat."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import attrs

from .drafters import NoDrafter
from .errors import SpecrunError
from .interfaces import Draft, Drafter, DraftTree, Target
from .sampling import Sampler, SamplingParams
from .verify import (
    GreedyVerifier,
    SpeculativeSamplingVerifier,
    Verifier,
    verify_tree_greedy,
    verify_tree_sampling,
)


@attrs.define
class Stats:
    """Per-request statistics.  ``target_calls`` counts verification calls after the prefill;
    ``acceptance_length`` is the tokens they produced per call (1.0 for plain decoding)."""

    backend: str = ""
    device: str = ""
    precision: str = ""
    drafter: str = ""
    draft_runs_on: str = ""  # backend/device/precision of a model-backed drafter
    num_draft_tokens: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_per_position: list[int] = attrs.field(factory=list)
    accepted_per_position: list[int] = attrs.field(factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_seconds: float = 0.0
    decode_tokens: int = 0  # tokens produced by the verification calls (a final EOS included)
    stop_reason: str = ""
    exact_blocks: bool | None = None  # the target's Target.exact_blocks (False: output may differ from plain)

    @property
    def acceptance_length(self) -> float:
        return self.decode_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)]

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput: tokens after the first, per second of decoding."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.prefill_seconds

    def observe(self, drafted: int, accepted: int, levels: int, new: int, eos: bool) -> None:
        """One verification call: ``drafted`` tokens over ``levels`` draft positions, ``accepted``
        of them, ``new`` tokens kept (``eos``: an EOS came too).  The loop's only bookkeeping."""
        self.target_calls += 1
        self.drafted += drafted
        self.accepted += accepted
        for i in range(levels):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += i < accepted
        self.new_tokens += new
        self.decode_tokens += new + eos

    def as_dict(self) -> dict:
        d = attrs.asdict(self)
        for name in ("acceptance_length", "acceptance_rate", "acceptance_rate_per_position", "tokens_per_second", "time_to_first_token"):
            d[name] = getattr(self, name)
        return d


def check_num_draft_tokens(k: int) -> int:
    """The one check of k (draft tokens per target call), wherever it enters."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SpecrunError(f"--num-draft-tokens must be >= 1 (the draft tokens k must be >= 1 per target call), got {k!r}")
    return k


def check_prompt_text(text: str) -> str:
    """The one check that a prompt's text is there (before tokenizing; an empty id list is
    refused by ``SpeculativeDecoder.check_length``)."""
    if not text.strip():
        raise SpecrunError("the prompt is empty; give some text")
    return text


def make_verifier(params: SamplingParams) -> tuple[Verifier, Sampler | None]:
    if params.greedy:
        return GreedyVerifier(), None
    sampler = Sampler(params)
    return SpeculativeSamplingVerifier(sampler), sampler


class SpeculativeDecoder:
    """Drives one target and one drafter.  Knows nothing of the backends behind them."""

    def __init__(
        self,
        target: Target,
        drafter: Drafter,
        num_draft_tokens: int = 4,
        verifier_factory: Callable[[SamplingParams], tuple[Verifier, Sampler | None]] = make_verifier,
    ):
        self.target, self.drafter, self.k = target, drafter, check_num_draft_tokens(num_draft_tokens)
        self.verifier_factory = verifier_factory
        self.stats = Stats()

    def within_block(self, n: int) -> int:
        """At most ``n`` draft tokens, and no more than the target verifies in one call at its best
        (``Target.block_rows`` rows: the last accepted token and ``block_rows - 1`` drafts)."""
        rows = getattr(self.target, "block_rows", None)
        return n if not rows else max(min(n, rows - 1), 0)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise SpecrunError("the prompt is empty; give some text")
        if max_new_tokens < 1:
            raise SpecrunError(f"max new tokens must be >= 1, got {max_new_tokens}")
        limit = self.target.info.context_length
        if prompt_len + max_new_tokens > limit:
            raise SpecrunError(
                f"prompt ({prompt_len} tokens) + max new tokens ({max_new_tokens}) exceeds the model's context "
                f"limit of {limit} tokens; shorten the prompt or lower --max-new-tokens"
            )

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> Iterator[list[int]]:
        """Yield lists of newly accepted token ids as they are accepted (EOS is not yielded)."""
        sampling = sampling or SamplingParams()
        self.check_length(len(prompt), max_new_tokens)
        verifier, sampler = self.verifier_factory(sampling)
        t, d = self.target, self.drafter
        s = self.stats = self._new_stats(len(prompt))
        limit = t.info.context_length
        capacity = min(len(prompt) + max_new_tokens + self._block_room() + 1, limit)
        eos = set(eos_token_ids)

        prepare = getattr(t, "prepare", None)  # optional (targets need not subclass Target)
        if prepare is not None:
            prepare(1 if isinstance(d, NoDrafter) else 1 + self._block_room())
        t0 = time.perf_counter()
        t.reset(capacity)
        d.start(prompt, capacity)
        out = t.forward(list(prompt), all_logits=False)
        first = verifier.verify(out.logits[-1:], Draft([]))
        tokens = list(prompt) + first
        d.accepted(tokens, 0, out.hidden_states)
        s.prefill_seconds = time.perf_counter() - t0
        if first[0] in eos:
            s.stop_reason = "eos"
            return
        s.new_tokens = 1
        yield first

        t_dec = time.perf_counter()
        try:
            while True:
                remaining = max_new_tokens - s.new_tokens
                if remaining <= 0:
                    s.stop_reason = "length"
                    return
                accepted, drafted, levels = self._step(tokens, remaining, limit, verifier, sampler)
                new = accepted[:remaining]
                stop = next((i for i, tok in enumerate(new) if tok in eos), None)
                if stop is not None:
                    new = new[:stop]
                s.observe(drafted, len(accepted) - 1, levels, len(new), stop is not None)
                if new:
                    yield new
                if stop is not None:
                    s.stop_reason = "eos"
                    return
        finally:
            s.decode_seconds = time.perf_counter() - t_dec
            if not s.stop_reason:
                s.stop_reason = "stopped"

    stats_suffix = ""  # appended to the drafter's name in the statistics

    def _new_stats(self, prompt_len: int) -> Stats:
        t, d = self.target, self.drafter
        k_max = 0 if isinstance(d, NoDrafter) else self.k
        return Stats(
            backend=t.backend, device=t.device, precision=t.precision, drafter=d.name + self.stats_suffix, draft_runs_on=d.runs_on,
            exact_blocks=getattr(t, "exact_blocks", None),
            num_draft_tokens=k_max, prompt_tokens=prompt_len,
            drafted_per_position=[0] * k_max, accepted_per_position=[0] * k_max,
        )

    def _block_room(self) -> int:
        """Cache rows a verification block may add beyond the accepted tokens."""
        return self.k

    def _step(self, tokens: list[int], remaining: int, limit: int, verifier: Verifier, sampler: Sampler | None):
        """Draft, verify in ONE target call, keep the accepted cache entries and extend ``tokens``.
        Returns (accepted tokens + bonus, tokens drafted, draft positions to count)."""
        t, d, s = self.target, self.drafter, self.stats
        # never draft past what is needed, nor past the context limit
        k = self.within_block(min(len(s.drafted_per_position), remaining - 1, limit - len(tokens)))
        td = time.perf_counter()
        draft = d.propose(tokens, k, sampler) if k > 0 else Draft([])
        s.draft_seconds += time.perf_counter() - td
        base = t.length  # == len(tokens) - 1: the last token is not yet in the cache
        out = t.forward([tokens[-1], *draft.tokens])
        accepted = verifier.verify(out.logits, draft)
        n = len(accepted) - 1
        t.rollback(base + 1 + n)
        tokens.extend(accepted)
        td = time.perf_counter()  # the drafter catching up on the accepted tokens is drafting time too
        d.accepted(tokens, n, None if out.hidden_states is None else out.hidden_states[: n + 1])
        s.draft_seconds += time.perf_counter() - td
        return accepted, len(draft), len(draft)


class TreeSpeculativeDecoder(SpeculativeDecoder):
    """EAGLE-2/3 dynamic trees for greedy decoding: the drafter proposes a token tree (at most
    ``depth`` levels, ``max_nodes`` nodes), the target verifies it in ONE call with a tree attention
    mask (``Target.forward_tree``), the longest matching path is accepted and only its cache
    entries are kept (``Target.keep``).  Greedy output is the target's own greedy sequence; with
    sampling the tree is verified by ``verify_tree_sampling``, which keeps the target's distribution."""

    stats_suffix = "-tree"

    def __init__(self, target: Target, drafter: Drafter, depth: int = 5, max_nodes: int = 16):
        super().__init__(target, drafter, depth)
        if max_nodes < 1:
            raise SpecrunError(f"the tree needs at least one node, got {max_nodes}")
        self.max_nodes = max_nodes

    def _block_room(self) -> int:
        return self.max_nodes

    def _step(self, tokens: list[int], remaining: int, limit: int, verifier: Verifier, sampler: Sampler | None):
        t, d, s = self.target, self.drafter, self.stats
        depth = min(self.k, remaining - 1)
        nodes = self.within_block(min(self.max_nodes, limit - len(tokens)))
        td = time.perf_counter()
        tree = d.propose_tree(tokens, depth, nodes) if depth > 0 and nodes > 0 else None
        s.draft_seconds += time.perf_counter() - td
        if tree is None or len(tree) == 0:
            tree = DraftTree([], [])
        out = t.forward_tree([tokens[-1], *tree.tokens], [-1, *tree.parents])
        if sampler is None:
            accepted, path = verify_tree_greedy(out.logits, tree)
        else:
            accepted, path = verify_tree_sampling(out.logits, tree, sampler)
        t.keep(path)
        tokens.extend(accepted)
        td = time.perf_counter()
        d.accepted(tokens, len(accepted) - 1, None if out.hidden_states is None else out.hidden_states[path])
        s.draft_seconds += time.perf_counter() - td
        return accepted, len(tree), max(tree.depths, default=0)
