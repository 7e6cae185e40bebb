"""EAGLE-3 drafting: chains (top-1 or sampled per step) and EAGLE-2/3 dynamic trees with a head in
the SpecForge / SGLang / vLLM format (``specrun.eagle3``), run by any backend that loads heads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..eagle3 import Eagle3Config, check_target_compat
from ..errors import SpecrunError
from ..interfaces import Backend, Draft, Drafter, DraftHead, DraftTree
from ..models import ModelConfig
from ..sampling import Sampler

#: an eagle3 chain stops at the first step whose top draft probability is below this (0.2 was the
#: best of 0.1/0.2/0.3 at k=3 and k=5 on 6 MT-bench prompts with the shipped head; 0: always k)
DEFAULT_MIN_PROB = 0.2
HEADS_DIR = Path(__file__).parent.parent / "heads"  # heads shipped with the package, one folder per model id


def bundled_head(target: str | None) -> Path | None:
    """The EAGLE-3 head shipped for a named model (``None``: the default model), if any."""
    from ..models import DEFAULT_MODEL

    name = target or DEFAULT_MODEL
    if "/" in name or name.startswith("."):  # a folder path: no bundled head is assumed
        return None
    folder = HEADS_DIR / name
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


def is_head(folder: str) -> bool:
    """Whether ``folder`` holds an EAGLE-3 head (its config names a draft vocabulary or an Eagle3
    architecture) rather than a draft model."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and ("draft_vocab_size" in raw or any("eagle3" in str(a).lower() for a in raw.get("architectures") or []))


def head_folder(draft: str | None, target: str | None) -> str:
    """The head to draft with: ``draft``, else the one shipped for ``target``."""
    head = draft or bundled_head(target)
    if head is None:
        raise SpecrunError(f"no EAGLE-3 head ships for '{target or 'the default model'}'; pass --draft DIR "
                           "(an EAGLE-3 head in the SpecForge format, e.g. from `specrun train-draft`)")
    return str(head)


def head_aux_layers(draft: str, config: ModelConfig) -> tuple[int, ...]:
    """The target layers whose hidden states the head reads, checked against the target, before
    anything loads."""
    hconf = Eagle3Config.load(draft)
    check_target_compat(hconf, config.vocab_size, config.hidden_size, config.num_layers, draft)
    return tuple(sorted(set(hconf.aux_layers_for(config.num_layers))))


def load_eagle3_drafter(backend: Backend, draft: str, model_dir: Path, config: ModelConfig, *, device: str,
                        precision: str | None, options: dict | None, min_prob: float | None = None,
                        tree_topk: int = 4) -> Eagle3Drafter:
    """The head in ``draft`` run by ``backend``; ``min_prob`` None: ``DEFAULT_MIN_PROB``."""
    head = backend.load_eagle3_head(draft, str(model_dir), device=device, precision=precision, options=options)
    return Eagle3Drafter(head, num_target_layers=config.num_layers, target_vocab_size=config.vocab_size,
                         tree_topk=tree_topk, min_prob=DEFAULT_MIN_PROB if min_prob is None else min_prob)


class Eagle3Drafter(Drafter):
    """Chain drafting with an EAGLE-3 head: top-1 (or a sample) per step, up to k steps.

    The head's cache holds one entry per final position t (token t+1, target hidden at t); the
    entries of a draft (fed with the head's own outputs) are speculative and are rolled back
    when the target's verification arrives.

    The head catches up lazily: ``accepted`` only keeps the accepted tokens and their target
    hidden states; the head runs over everything kept in ONE forward when it is next asked to
    draft.  Where another drafter drafts most calls (``eagle3+ngram`` while prompt lookup finds
    its continuations) the head then costs nothing on those calls, and a forward over several
    calls' rows costs about what one call's does (its weights are read once)."""

    name = "eagle3"

    def __init__(self, head: DraftHead, *, num_target_layers: int, target_vocab_size: int | None = None,
                 tree_topk: int = 4, min_prob: float = 0.0):
        cfg = head.config
        if not 0.0 <= min_prob < 1.0:
            raise SpecrunError(f"the minimum draft probability must be in [0, 1), got {min_prob}")
        if target_vocab_size is not None and target_vocab_size != cfg.vocab_size:
            raise SpecrunError(f"the head's vocabulary ({cfg.vocab_size} tokens) differs from the target's ({target_vocab_size})")
        self.head = head
        self.config = cfg
        self.tree_topk = tree_topk
        # a chain stops at the first step whose top draft probability is below this: drafts that
        # would likely be rejected are not verified (lossless: the rule reads the draft
        # distribution only, not the sampled token nor the target)
        self.min_prob = min_prob
        wanted = cfg.aux_layers_for(num_target_layers)
        self.aux_hidden_layers = tuple(sorted(set(wanted)))
        # the target returns the unique layers in layer order; the head wants ``wanted``'s order
        self._perm = np.array([self.aux_hidden_layers.index(i) for i in wanted])
        self._identity = list(self._perm) == list(range(len(self.aux_hidden_layers)))
        self.d2t_ids = np.arange(len(head.d2t), dtype=np.int64) + np.asarray(head.d2t, dtype=np.int64)
        self.final = 0  # head cache entries that are final
        self.known = 0  # positions whose target hidden states the drafter holds: final + pending
        self._pending_tokens: list[int] = []  # accepted, not yet run through the head
        self._pending_hidden: list[np.ndarray] = []
        self.logits: np.ndarray | None = None  # draft logits after the last final entry
        self.hidden: np.ndarray | None = None

    @property
    def runs_on(self) -> str:
        h = self.head
        return f"{h.backend}/{h.device}/{h.precision}"

    def target_hidden(self, rows: np.ndarray) -> np.ndarray:
        """Target hidden states (unique layers, layer order) -> the head's fc input order."""
        if self._identity:
            return rows
        T = rows.shape[0]
        n = len(self.aux_hidden_layers)
        return rows.reshape(T, n, -1)[:, self._perm].reshape(T, -1)

    def start(self, prompt: Sequence[int], capacity: int) -> None:
        self.head.reset(capacity + 1)
        self.final = self.known = 0
        self._pending_tokens, self._pending_hidden = [], []
        self.logits = self.hidden = None

    def accepted(self, tokens: Sequence[int], n_accepted: int, hidden_states: np.ndarray | None = None) -> None:
        if hidden_states is None:
            raise SpecrunError("the target backend returned no hidden states; the eagle3 drafter needs a backend with the 'hidden_states' capability")
        m = len(hidden_states)
        first = len(tokens) - 1 - m
        if first != self.known:
            raise SpecrunError(f"eagle3 drafter out of step: it holds {self.known} positions, the target reports rows from {first}")
        # kept, not run: the head catches up when it is next asked to draft (a copy: a backend may
        # reuse its output buffers)
        self._pending_tokens += list(tokens[first + 1 :])
        self._pending_hidden.append(np.array(hidden_states, np.float32))
        self.known = len(tokens) - 1
        self.logits = self.hidden = None

    def catch_up(self) -> None:
        """Run the head over the accepted tokens it has not seen, in one forward."""
        if not self._pending_tokens:
            return
        rows = self._pending_hidden[0] if len(self._pending_hidden) == 1 else np.concatenate(self._pending_hidden)
        self.head.rollback(self.final)
        out = self.head.forward(self._pending_tokens, self.target_hidden(rows))
        self._pending_tokens, self._pending_hidden = [], []
        self.final = self.known
        self.logits, self.hidden = out.logits[-1], out.hidden[-1]

    def _choose(self, logits: np.ndarray, sampler: Sampler | None) -> tuple[int, np.ndarray | None]:
        if sampler is None:
            return int(self.d2t_ids[int(np.argmax(logits))]), None
        full = np.full(self.config.vocab_size, -np.inf, dtype=np.float64)
        full[self.d2t_ids] = logits
        p = sampler.probs(full)
        return sampler.sample(p), p

    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        if k <= 0:
            return Draft([])
        self.catch_up()
        if self.logits is None:
            return Draft([])
        self.head.rollback(self.final)
        logits, hidden = self.logits, self.hidden
        proposal: list[int] = []
        probs: list[np.ndarray] = []
        for i in range(k):
            tok, p = self._choose(logits, sampler)
            # the rule reads the head's top probability, never the sampled token: stopping on the
            # sampled token's own probability would bias which tokens are proposed (not lossless)
            if self.min_prob > 0.0:
                top = float(p.max()) if p is not None else 1.0 / float(np.exp(logits.astype(np.float64) - logits.max()).sum())
                if top < self.min_prob:
                    break
            proposal.append(tok)
            if p is not None:
                probs.append(p)
            if i + 1 < k:
                out = self.head.forward([tok], hidden[None], from_target=False)
                logits, hidden = out.logits[-1], out.hidden[-1]
        return Draft(proposal, np.stack(probs) if probs else None)

    def propose_tree(self, tokens: Sequence[int], depth: int, max_nodes: int) -> DraftTree | None:
        """EAGLE-2 dynamic tree: the root's top-k children; then, level by level, the k frontier
        nodes with the best cumulative log-probability are expanded (one head call per level, with
        a tree mask) into their top-k children; finally the ``max_nodes`` best nodes are kept
        (ordered by score, then depth, so every kept node's parent is kept too)."""
        if depth <= 0 or max_nodes <= 0:
            return None
        self.catch_up()
        if self.logits is None:
            return None
        F = self.final
        self.head.rollback(F)
        K = max(1, self.tree_topk)
        tok: list[int] = []  # target ids of nodes 1..; index 0 = the root
        parent: list[int] = [-1]
        score: list[float] = [0.0]
        level: list[int] = [0]
        slot: dict[int, int] = {}  # node -> head cache entry (expanded nodes)
        outs: dict[int, np.ndarray] = {0: self.hidden}
        tok.append(-1)

        def add_children(node: int, logits: np.ndarray) -> list[int]:
            lp = logits.astype(np.float64) - logits.max()
            lp = lp - np.log(np.exp(lp).sum())
            best = np.argpartition(-lp, min(K, len(lp) - 1))[:K] if K < len(lp) else np.arange(len(lp))
            best = best[np.argsort(-lp[best], kind="stable")]
            made = []
            for b in best:
                tok.append(int(self.d2t_ids[b]))
                parent.append(node)
                score.append(score[node] + float(lp[b]))
                level.append(level[node] + 1)
                made.append(len(tok) - 1)
            return made

        frontier = add_children(0, self.logits)
        for dpt in range(1, depth):
            expand = sorted(frontier, key=lambda i: -score[i])[:K]
            base = self.head.length
            T = len(expand)
            mask = np.zeros((T, base + T), dtype=np.bool_)
            mask[:, :F] = True
            for j, node in enumerate(expand):
                mask[j, base + j] = True
                a = parent[node]
                while a > 0:
                    mask[j, slot[a]] = True
                    a = parent[a]
            hidden = np.stack([outs[parent[node]] for node in expand])
            out = self.head.forward([tok[n] for n in expand], hidden, from_target=False,
                                    positions=[F + dpt - 1] * T, mask=mask)
            frontier = []
            for j, node in enumerate(expand):
                slot[node] = base + j
                outs[node] = out.hidden[j]
                frontier += add_children(node, out.logits[j])
        self.head.rollback(F)
        ranked = sorted(range(1, len(tok)), key=lambda i: (-score[i], level[i], i))[:max_nodes]
        ranked.sort(key=lambda i: (level[i], -score[i], i))
        index = {0: 0} | {node: j + 1 for j, node in enumerate(ranked)}
        return DraftTree([tok[n] for n in ranked], [index[parent[n]] for n in ranked])
