"""All verification: chains (greedy, speculative sampling) and token trees (greedy, sampling) turn the
target's logits into accepted tokens + one bonus token, losslessly.

``logits[i]`` is the target's prediction for the token after input i, so draft token ``d_{i+1}``
is checked against ``logits[i]`` and the bonus token comes from ``logits[n_accepted]``."""

from __future__ import annotations

import numpy as np

from .interfaces import Draft, DraftTree, Verifier
from .sampling import Sampler


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


def verify_tree_greedy(logits, tree: DraftTree) -> tuple[list[int], list[int]]:
    """Longest root-to-node path whose tokens are the target's argmax at each step, plus the bonus
    token.  ``logits[i]`` belongs to node i (0 = the root).  Returns (tokens, path of node indices)."""
    children: dict[int, dict[int, int]] = {}
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents, strict=True), start=1):
        children.setdefault(p, {})[tok] = i
    cur, out, path = 0, [], [0]
    while True:
        best = int(np.argmax(logits[cur]))
        out.append(best)
        nxt = children.get(cur, {}).get(best)
        if nxt is None:
            return out, path
        path.append(nxt)
        cur = nxt


def verify_tree_sampling(logits, tree: DraftTree, sampler: Sampler) -> tuple[list[int], list[int]]:
    """Lossless tree verification for sampling.  At each node the children are deterministic
    candidates (the drafter's top-k): candidate c is accepted with probability p(c) under the
    target's processed distribution p, else p(c) is set to 0 and p renormalised before the next
    candidate; when none is accepted a token is drawn from what remains.  This is sampling from p,
    one candidate at a time, so the output is distributed exactly as the target's sampling."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents, start=1):
        children.setdefault(p, []).append(i)
    cur, out, path = 0, [], [0]
    while True:
        p = np.array(sampler.probs(logits[cur]), dtype=np.float64)
        nxt = None
        for c in children.get(cur, []):
            tok = tree.tokens[c - 1]
            total = p.sum()
            if p[tok] > 0 and sampler.uniform() * total < p[tok]:
                nxt = c
                break
            p[tok] = 0.0
        if nxt is None:
            out.append(sampler.sample(p / p.sum()))
            return out, path
        out.append(tree.tokens[nxt - 1])
        path.append(nxt)
        cur = nxt
