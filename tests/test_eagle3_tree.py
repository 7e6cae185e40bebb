"""EAGLE-2/3 dynamic trees: the torch target's tree forward against plain path-by-path runs, the
cache compaction after verification, and greedy losslessness of tree decoding."""

from __future__ import annotations

import numpy as np
import pytest

from specrun.decode import SpeculativeDecoder, TreeSpeculativeDecoder
from specrun.drafters import Eagle3Drafter
from specrun.interfaces import Draft, Drafter, DraftTree
from specrun.verify import verify_tree_greedy

from .test_eagle3 import make_head
from .test_lossless import PROMPTS, plain_greedy

PREFIX = [5, 17, 300, 42, 9, 1200, 77]
#           root a    b    c    d    e    f
TOKENS = [31, 400, 401, 402, 403, 404, 405]
PARENTS = [-1, 0, 0, 1, 1, 2, 3]


def path_of(node):
    path = []
    while node >= 0:
        path.append(node)
        node = PARENTS[node]
    return path[::-1]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_forward_tree_equals_each_path_run_alone(arch, tiny_models, torch_backend):
    target = torch_backend.load_target(str(tiny_models[arch]), device="cpu", aux_hidden_layers=(1,))
    target.reset(32)
    target.forward(PREFIX)
    out = target.forward_tree(TOKENS, PARENTS)
    assert out.logits.shape[0] == len(TOKENS) and out.hidden_states.shape[0] == len(TOKENS)
    for node in range(len(TOKENS)):
        target.reset(32)
        ref = target.forward(PREFIX + [TOKENS[i] for i in path_of(node)])
        assert np.abs(out.logits[node] - ref.logits[-1]).max() < 1e-4, node
        assert np.abs(out.hidden_states[node] - ref.hidden_states[-1]).max() < 1e-4, node
    # keep a path, continue, compare with a fresh run of prefix + path
    target.reset(32)
    target.forward(PREFIX)
    target.forward_tree(TOKENS, PARENTS)
    keep = path_of(6)  # root, a, c, f
    target.keep(keep)
    assert target.length == len(PREFIX) + len(keep)
    cont = target.forward([77, 8]).logits
    target.reset(32)
    fresh = target.forward(PREFIX + [TOKENS[i] for i in keep] + [77, 8]).logits[-2:]
    assert np.abs(cont - fresh).max() < 1e-4


def test_verify_tree_greedy_picks_the_longest_matching_path():
    V = 10
    tree = DraftTree([4, 5, 6, 7], [0, 0, 1, 2])  # nodes 1..4
    logits = np.zeros((5, V))
    logits[0, 5] = logits[2, 7] = logits[4, 9] = 1  # root -> 5 (node 2) -> 7 (node 4) -> bonus 9
    assert verify_tree_greedy(logits, tree) == ([5, 7, 9], [0, 2, 4])
    logits[0] = 0
    logits[0, 3] = 1
    assert verify_tree_greedy(logits, tree) == ([3], [0])


@pytest.fixture(scope="module")
def setup(tiny_models, torch_backend, tmp_path_factory):
    folder = tiny_models["llama"]
    hd = make_head(tmp_path_factory.mktemp("treehead") / "h", seed=11)
    head = torch_backend.load_eagle3_head(str(hd), str(folder), device="cpu")
    target = torch_backend.load_target(str(folder), device="cpu", aux_hidden_layers=(0, 1, 2))
    return target, head


@pytest.mark.parametrize("depth,topk,nodes", [(3, 2, 6), (5, 4, 16), (2, 8, 30)])
def test_tree_decoding_is_lossless(setup, depth, topk, nodes):
    target, head = setup
    drafter = Eagle3Drafter(head, num_target_layers=3, tree_topk=topk)
    prompt = PROMPTS[depth % len(PROMPTS)]
    ref = plain_greedy(target, prompt, 25)
    dec = TreeSpeculativeDecoder(target, drafter, depth, nodes)
    out = [t for c in dec.generate(prompt, 25) for t in c]
    assert out == ref
    assert dec.stats.drafted > 0 and dec.stats.stop_reason == "length"
    assert max(1, dec.stats.drafted // dec.stats.target_calls) <= nodes


def test_tree_with_one_child_per_node_is_the_chain(setup):
    target, head = setup
    prompt = PROMPTS[0]
    chain = SpeculativeDecoder(target, Eagle3Drafter(head, num_target_layers=3), 4)
    a = [t for c in chain.generate(prompt, 30) for t in c]
    tree = TreeSpeculativeDecoder(target, Eagle3Drafter(head, num_target_layers=3, tree_topk=1), 4, 4)
    b = [t for c in tree.generate(prompt, 30) for t in c]
    assert a == b
    assert (chain.stats.target_calls, chain.stats.accepted) == (tree.stats.target_calls, tree.stats.accepted)


class OracleTree(Drafter):
    """A tree holding the true continuation on one branch (corrupted now and then) and wrong
    siblings: partial acceptance through a non-first branch."""

    name = "oracle-tree"

    def __init__(self, truth, prompt_len, seed):
        self.truth, self.p, self.rng = truth, prompt_len, np.random.default_rng(seed)

    def propose(self, tokens, k, sampler):
        return Draft([])

    def propose_tree(self, tokens, depth, max_nodes):
        pos = len(tokens) - self.p
        chain = list(self.truth[pos : pos + depth])
        toks, parents, prev = [], [], 0
        for tok in chain:
            if len(toks) + 2 > max_nodes:
                break
            toks.append((tok + 1) % 49152)  # a wrong sibling first
            parents.append(prev)
            good = tok if self.rng.random() > 0.2 else (tok + 2) % 49152
            toks.append(good)
            parents.append(prev)
            prev = len(toks)
        return DraftTree(toks, parents)


def test_tree_lossless_with_partial_acceptance(setup):
    target, _ = setup
    prompt = PROMPTS[1]
    ref = plain_greedy(target, prompt, 40)
    dec = TreeSpeculativeDecoder(target, OracleTree(ref, len(prompt), 0), 4, 8)
    out = [t for c in dec.generate(prompt, 40) for t in c]
    assert out == ref
    s = dec.stats
    assert 0 < s.accepted < s.drafted and s.acceptance_length > 1.5
    assert s.accepted_per_position[0] >= s.accepted_per_position[-1]


def test_pipeline_tree_option(tiny_models, tmp_path):
    from specrun.errors import SpecrunError
    from specrun.pipeline import Pipeline

    hd = make_head(tmp_path / "h", seed=4)
    folder = str(tiny_models["llama"])
    ref = Pipeline.load(folder, drafter="none", backend="openvino").generate("Hi there", max_new_tokens=12)
    pipe = Pipeline.load(folder, drafter="eagle3", draft=str(hd), tree=(3, 3, 8), backend="openvino")
    got = pipe.generate("Hi there", max_new_tokens=12)
    assert got.token_ids == ref.token_ids and got.stats.drafter == "eagle3-tree"
    with pytest.raises(SpecrunError, match="tree drafting needs --drafter eagle3"):
        Pipeline.load(folder, drafter="ngram", tree=(3, 3, 8))


class ToyTreeTarget:
    """test_sampling's bigram target with hidden states and token-tree verification."""

    def __new__(cls, table):
        from specrun.interfaces import StepOutput

        from .test_sampling import BigramTarget

        class T(BigramTarget):
            def forward(self, tokens, *, all_logits=True):
                out = super().forward(tokens, all_logits=all_logits)
                return StepOutput(out.logits, np.zeros((len(tokens), 3), np.float32))

            def forward_tree(self, tokens, parents):
                self.base = len(self.cache)
                self.cache.extend(tokens)
                return StepOutput(self.table[np.asarray(tokens)], np.zeros((len(tokens), 3), np.float32))

            def keep(self, indices):
                nodes = self.cache[self.base :]
                del self.cache[self.base :]
                self.cache.extend(nodes[i] for i in indices)

        return T(table)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_tree_sampling_matches_target_distribution(temperature, top_p):
    from specrun.sampling import SamplingParams

    from .test_eagle3 import ToyHead
    from .test_sampling import DRAFT, PROMPT, TARGET, chi_square_pvalue, exact_joint

    n = 2000
    target = ToyTreeTarget(TARGET)
    counts: dict = {}
    accepted = 0
    for seed in range(n):
        drafter = Eagle3Drafter(ToyHead(DRAFT), num_target_layers=3, target_vocab_size=4, tree_topk=2)
        dec = TreeSpeculativeDecoder(target, drafter, 3, 5)
        seq = tuple(t for c in dec.generate(PROMPT, 4, SamplingParams(temperature, 0, top_p, seed)) for t in c)
        counts[seq] = counts.get(seq, 0) + 1
        accepted += dec.stats.accepted
    assert accepted > n // 4  # trees were used, and accepted
    assert chi_square_pvalue(counts, exact_joint(SamplingParams(temperature, 0, top_p)), n) > 1e-3


def test_auto_drafter_follows_draft(tiny_models, tiny_draft, tmp_path):
    """--drafter auto with --draft: a head drafts (prompt lookup first, or a tree with --tree), a
    draft model drafts as 'model'; the draft is never ignored, and output stays plain greedy's."""
    from specrun.pipeline import Pipeline

    hd = make_head(tmp_path / "h", seed=5)
    folder = str(tiny_models["llama"])
    ref = Pipeline.load(folder, drafter="none", backend="openvino").generate("Hi there", max_new_tokens=12).token_ids
    for draft, tree, name in ((hd, None, "eagle3+ngram"), (hd, (3, 3, 8), "eagle3-tree"), (tiny_draft, None, "model")):
        pipe = Pipeline.load(folder, draft=str(draft), tree=tree, backend="openvino")
        got = pipe.generate("Hi there", max_new_tokens=12)
        assert got.stats.drafter == name and got.token_ids == ref
