"""EAGLE-3 heads: the SpecForge checkpoint format, the torch head against a straightforward
implementation of the equations, and greedy / sampling losslessness of the eagle3 drafter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from specrun.decode import SpeculativeDecoder
from specrun.drafters import Eagle3Drafter
from specrun.eagle3 import Eagle3Checkpoint
from specrun.errors import SpecrunError
from specrun.interfaces import DraftHead, HeadOutput, StepOutput
from specrun_kit.headfile import save_head, vocab_map

from .test_lossless import PROMPTS, plain_greedy
from .test_sampling import DRAFT, BigramTarget

H, HEADS, KV, HD, INTER, V = 64, 4, 2, 16, 128, 49152


def make_head(folder: Path, *, draft_vocab: int = 3000, aux_ids=(0, 1, 2), seed: int = 0, bf16: bool = False,
              with_embed: bool = False, vocab: int = V, layers_in: int = 3, scale: float = 0.3) -> Path:
    """A random-weight head written exactly as SpecForge does (names, shapes, dtypes)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * scale

    used = torch.sort(torch.randperm(vocab, generator=g)[:draft_vocab]).values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[used] = True
    tensors = {
        "fc.weight": w(H, layers_in * H),
        "midlayer.hidden_norm.weight": 1 + w(H) / 3,
        "midlayer.input_layernorm.weight": 1 + w(H) / 3,
        "midlayer.post_attention_layernorm.weight": 1 + w(H) / 3,
        "midlayer.self_attn.q_proj.weight": w(HEADS * HD, 2 * H),
        "midlayer.self_attn.k_proj.weight": w(KV * HD, 2 * H),
        "midlayer.self_attn.v_proj.weight": w(KV * HD, 2 * H),
        "midlayer.self_attn.o_proj.weight": w(H, HEADS * HD),
        "midlayer.mlp.gate_proj.weight": w(INTER, H),
        "midlayer.mlp.up_proj.weight": w(INTER, H),
        "midlayer.mlp.down_proj.weight": w(H, INTER),
        "norm.weight": 1 + w(H) / 3,
        "lm_head.weight": w(draft_vocab, H),
    }
    if with_embed:
        tensors["embed_tokens.weight"] = w(vocab, H)
    if bf16:
        tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    tensors["d2t"] = (used - torch.arange(draft_vocab)).to(torch.int64)
    tensors["t2d"] = t2d
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": H, "num_attention_heads": HEADS, "num_key_value_heads": KV, "intermediate_size": INTER,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "vocab_size": vocab, "draft_vocab_size": draft_vocab, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    if aux_ids is not None:
        config["eagle_aux_hidden_state_layer_ids"] = list(aux_ids)  # vLLM's numbering: inputs of these layers
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory) -> Path:
    return make_head(tmp_path_factory.mktemp("head") / "h")


@pytest.fixture(scope="module")
def target(tiny_models, torch_backend):
    return torch_backend.load_target(str(tiny_models["llama"]), device="cpu", aux_hidden_layers=(0, 1, 2))


# ------------------------------------------------------------------------------------ format


def test_load_save_load_is_bit_identical(tmp_path, tiny_models):
    src = make_head(tmp_path / "bf16", bf16=True, seed=3)
    a = Eagle3Checkpoint.load(src, tiny_models["llama"])
    # bf16 values are read exactly (as torch converts them)
    from safetensors.torch import load_file

    raw = load_file(str(src / "model.safetensors"))
    assert np.array_equal(a.tensors["fc.weight"], raw["fc.weight"].float().numpy())
    save_head(a, tmp_path / "copy")
    b = Eagle3Checkpoint.load(tmp_path / "copy", tiny_models["llama"])
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert t.dtype == b.tensors[name].dtype and np.array_equal(t, b.tensors[name]), name
    assert b.tensors["d2t"].dtype == np.int64 and b.tensors["t2d"].dtype == np.bool_
    assert a.config == b.config
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 3000
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]  # inputs (vLLM); the embedding has no SpecForge id
    assert "eagle_aux_hidden_state_layer_ids" not in cfg.get("eagle_config", {})
    # no embedding saved: it comes from the target
    assert a.embed_from_target and np.array_equal(a.embed, b.embed)
    # saved as bf16 (how SpecForge ships heads): the bf16 source comes back bit for bit, and f32
    # weights are rounded to nearest even
    save_head(a, tmp_path / "as-bf16", dtype="bf16")
    back = Eagle3Checkpoint.load(tmp_path / "as-bf16").tensors
    # the config names the dtype the weights are in (servers loading with dtype=auto read it)
    assert cfg["torch_dtype"] == "float32"
    assert json.loads((tmp_path / "as-bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(np.array_equal(t, back[n]) for n, t in a.tensors.items())
    f32 = make_head(tmp_path / "f32", seed=4)
    c = Eagle3Checkpoint.load(f32)
    save_head(c, tmp_path / "rounded", dtype="bf16")
    r = Eagle3Checkpoint.load(tmp_path / "rounded")
    w = c.tensors["fc.weight"]
    assert np.array_equal(r.tensors["fc.weight"], torch.from_numpy(w).to(torch.bfloat16).float().numpy())
    assert not np.array_equal(r.tensors["fc.weight"], w)
    assert (tmp_path / "rounded" / "model.safetensors").stat().st_size < 0.6 * (f32 / "model.safetensors").stat().st_size
    save_head(b, tmp_path / "copy2")
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (tmp_path / "copy2" / "model.safetensors").read_bytes()


def test_own_embedding_is_used(tmp_path, tiny_models):
    ck = Eagle3Checkpoint.load(make_head(tmp_path / "e", with_embed=True), tiny_models["llama"])
    assert not ck.embed_from_target and np.array_equal(ck.embed, ck.tensors["embed_tokens.weight"])


def test_wrong_shapes_and_vocab_are_refused(tmp_path, tiny_models, torch_backend):
    from safetensors.torch import load_file, save_file

    good = make_head(tmp_path / "good")
    bad = make_head(tmp_path / "bad")
    t = load_file(str(bad / "model.safetensors"))
    t["midlayer.self_attn.q_proj.weight"] = torch.zeros(HEADS * HD, H)  # input width H instead of 2H
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(SpecrunError, match=r"q_proj.weight has shape \[64, 64\], the config implies \[64, 128\]"):
        torch_backend.load_eagle3_head(str(bad), str(tiny_models["llama"]), device="cpu")
    t.pop("midlayer.self_attn.q_proj.weight")
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(SpecrunError, match="missing tensor"):
        Eagle3Checkpoint.load(bad)
    other = make_head(tmp_path / "v", vocab=1000, draft_vocab=100)
    with pytest.raises(SpecrunError, match=r"vocabulary \(1000 tokens\) differs from the target's \(49152\)"):
        Eagle3Checkpoint.load(other, tiny_models["llama"])
    deep = make_head(tmp_path / "deep", aux_ids=(0, 1, 7))
    with pytest.raises(SpecrunError, match=r"layer\(s\) \[7\] do not exist"):
        Eagle3Checkpoint.load(deep, tiny_models["llama"])
    cfg = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(SpecrunError, match="not an EAGLE-3 head"):
        Eagle3Checkpoint.load(good)
    (good / "model.safetensors").write_bytes(b"\x00" * 3)
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecrunError, match="truncated"):
        Eagle3Checkpoint.load(good)
    with pytest.raises(SpecrunError, match="does not exist"):
        Eagle3Checkpoint.load(tmp_path / "nowhere")


def test_vocab_map_rule():
    counts = np.array([5, 0, 9, 9, 1, 7])
    d2t, t2d = vocab_map(counts, 3)
    used = np.arange(3) + d2t
    assert used.tolist() == [2, 3, 5]  # the three most frequent, ascending
    assert t2d.tolist() == [False, False, True, True, False, True]


# ------------------------------------------------------------------------------------ forward parity


def reference_head(ck: Eagle3Checkpoint, tokens, hiddens, from_target) -> tuple[np.ndarray, np.ndarray]:
    """The NOTES equations, written out plainly: full causal attention over the whole chain."""
    W = {k: torch.from_numpy(v).double() for k, v in ck.tensors.items() if k not in ("d2t", "t2d")}
    emb = torch.from_numpy(ck.embed).double()

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)

    def rope(x, pos):  # x [T, heads, hd]
        inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD))
        ang = pos[:, None].double() * inv[None]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
        x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    T = len(tokens)
    logits, outs, keys, vals = [], [], [], []
    prev = None
    for t in range(T):
        if from_target[t]:
            h = W["fc.weight"] @ torch.from_numpy(hiddens[t]).double()
        else:
            h = prev
        x = torch.cat([rms(emb[tokens[t]], W["midlayer.input_layernorm.weight"]), rms(h, W["midlayer.hidden_norm.weight"])])
        pos = torch.tensor([t])
        q = rope((W["midlayer.self_attn.q_proj.weight"] @ x).view(1, HEADS, HD), pos)[0]
        keys.append(rope((W["midlayer.self_attn.k_proj.weight"] @ x).view(1, KV, HD), pos)[0])
        vals.append((W["midlayer.self_attn.v_proj.weight"] @ x).view(KV, HD))
        K, Vv = torch.stack(keys), torch.stack(vals)  # [t+1, KV, HD]
        heads = []
        for hh in range(HEADS):
            g = hh // (HEADS // KV)
            w = torch.softmax(K[:, g] @ q[hh] / math.sqrt(HD), 0)
            heads.append(w @ Vv[:, g])
        r = h + W["midlayer.self_attn.o_proj.weight"] @ torch.cat(heads)
        y = rms(r, W["midlayer.post_attention_layernorm.weight"])
        mlp = W["midlayer.mlp.down_proj.weight"] @ (
            torch.nn.functional.silu(W["midlayer.mlp.gate_proj.weight"] @ y) * (W["midlayer.mlp.up_proj.weight"] @ y)
        )
        out = r + mlp
        logits.append(W["lm_head.weight"] @ rms(out, W["norm.weight"]))
        outs.append(out)
        prev = out
    return torch.stack(logits).numpy(), torch.stack(outs).numpy()


def test_head_forward_matches_reference(head_dir, tiny_models, torch_backend):
    head = torch_backend.load_eagle3_head(str(head_dir), str(tiny_models["llama"]), device="cpu")
    ck = Eagle3Checkpoint.load(head_dir, tiny_models["llama"])
    rng = np.random.default_rng(0)
    n_real, n_draft = 9, 3
    tokens = [int(t) for t in rng.integers(0, V, n_real + n_draft)]
    hid = rng.normal(size=(n_real, 3 * H)).astype(np.float32)
    head.reset(4)  # also exercises growth
    a = head.forward(tokens[:5], hid[:5])
    b = head.forward(tokens[5:n_real], hid[5:n_real])
    logits, outs = [a.logits, b.logits], [a.hidden, b.hidden]
    prev = b.hidden[-1]
    for t in tokens[n_real:]:
        o = head.forward([t], prev[None], from_target=False)
        logits.append(o.logits)
        outs.append(o.hidden)
        prev = o.hidden[-1]
    hiddens = list(hid) + [None] * n_draft
    ref_l, ref_o = reference_head(ck, tokens, hiddens, [True] * n_real + [False] * n_draft)
    assert np.abs(np.concatenate(logits) - ref_l).max() < 1e-3 * max(1.0, np.abs(ref_l).max())
    assert np.abs(np.concatenate(outs) - ref_o).max() < 1e-3 * max(1.0, np.abs(ref_o).max())
    # rollback then redo equals the first pass
    head.rollback(5)
    again = head.forward(tokens[5:n_real], hid[5:n_real])
    assert np.abs(again.logits - b.logits).max() < 1e-5


# ------------------------------------------------------------------------------------ greedy losslessness


def run(target, drafter, prompt, k, n=40):
    dec = SpeculativeDecoder(target, drafter, k)
    out = [t for chunk in dec.generate(prompt, n) for t in chunk]
    return out, dec.stats


@pytest.mark.parametrize(
    "aux_ids,prompts,ks",
    [((0, 1, 2), PROMPTS[:2], (1, 3, 5)), (None, PROMPTS[2:], (2, 4))],  # None: default (2, L//2, L-3) = (2, 1, 0) here
)
def test_eagle3_greedy_is_lossless(tmp_path, aux_ids, prompts, ks, tiny_models, torch_backend):
    folder = tiny_models["llama"]
    hd = make_head(tmp_path / "h", aux_ids=aux_ids, seed=5)
    head = torch_backend.load_eagle3_head(str(hd), str(folder), device="cpu")
    drafter = Eagle3Drafter(head, num_target_layers=3, target_vocab_size=V)
    assert drafter.aux_hidden_layers == (0, 1, 2)
    target = torch_backend.load_target(str(folder), device="cpu", aux_hidden_layers=drafter.aux_hidden_layers)
    for prompt in prompts:
        ref = plain_greedy(target, prompt, 30)
        for k in ks:
            out, stats = run(target, drafter, prompt, k, 30)
            assert out == ref, f"k={k} diverged"
            assert stats.drafted > 0 and stats.drafter == "eagle3"


class ScriptedHead(DraftHead):
    """A numpy head that knows the target's greedy continuation for some steps (then errs):
    exercises acceptance of long prefixes, the cache bookkeeping and the d2t mapping."""

    def __init__(self, real: DraftHead, truth: dict[tuple, int]):
        self.real, self.truth = real, truth
        self.config, self.d2t = real.config, real.d2t
        self.backend = self.device = self.precision = "x"
        self.seq: list[int] = []

    def reset(self, capacity):
        self.real.reset(capacity)
        self.seq = []

    @property
    def length(self):
        return self.real.length

    def rollback(self, length):
        self.real.rollback(length)
        del self.seq[length:]

    def forward(self, tokens, hidden, *, from_target=True, positions=None, mask=None):
        out = self.real.forward(tokens, hidden, from_target=from_target)
        self.seq.extend(tokens)
        logits = out.logits.copy()
        ids = np.arange(len(self.d2t)) + self.d2t
        for i in range(len(tokens)):
            nxt = self.truth.get(tuple(self.seq[: len(self.seq) - len(tokens) + i + 1]))
            if nxt is not None and len(self.seq) % 5 != 0 and nxt in set(ids.tolist()):
                logits[i, int(np.searchsorted(ids, nxt))] = 1e4
        return HeadOutput(logits, out.hidden)


def test_eagle3_lossless_with_partial_acceptance(tmp_path, tiny_models, torch_backend, target):
    hd = make_head(tmp_path / "h", seed=2, draft_vocab=40000)
    real = torch_backend.load_eagle3_head(str(hd), str(tiny_models["llama"]), device="cpu")
    prompt = PROMPTS[0]
    ref = plain_greedy(target, prompt, 40)
    # the head sees (token t+1) at entry t: the prefix ending with token t+1 -> greedy token t+2
    full = prompt + ref
    truth = {tuple(full[1 : i + 1]): full[i + 1] for i in range(len(prompt), len(full) - 1)}
    drafter = Eagle3Drafter(ScriptedHead(real, truth), num_target_layers=3)
    out, stats = run(target, drafter, prompt, 4, 40)
    assert out == ref
    assert 0 < stats.accepted < stats.drafted
    assert stats.acceptance_length > 1.5
    # stopping a chain at a token the head is unsure of: the unsteered entries (a random head
    # over 40,000 tokens) are no longer drafted, so fewer tokens are drafted and fewer rejected
    drafter = Eagle3Drafter(ScriptedHead(real, truth), num_target_layers=3, min_prob=0.5)
    out, short = run(target, drafter, prompt, 4, 40)
    assert out == ref
    assert short.drafted < stats.drafted
    assert short.accepted / short.drafted > stats.accepted / stats.drafted


def test_the_head_catches_up_lazily_in_one_forward(head_dir, tiny_models, torch_backend, target):
    """accepted() only keeps the rows; the next proposal runs the head once over all of them, and
    drafts what a head that caught up call by call drafts."""
    prompt = PROMPTS[0]
    ref = plain_greedy(target, prompt, 12)
    seq = prompt + ref
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((len(seq), 3 * target.info.hidden_size)).astype(np.float32)

    def drafter():
        head = torch_backend.load_eagle3_head(str(head_dir), str(tiny_models["llama"]), device="cpu")
        d = Eagle3Drafter(head, num_target_layers=3)
        calls = []
        real = head.forward
        head.forward = lambda toks, hid, **kw: calls.append((len(toks), kw.get("from_target", True))) or real(toks, hid, **kw)
        d.start(prompt, 64)
        return d, calls

    lazy, calls = drafter()
    ends = [len(prompt) + 1, len(prompt) + 3, len(prompt) + 4, len(prompt) + 7]  # four verifications
    last = 0
    for end in ends:
        lazy.accepted(seq[:end], end - last - 1, hidden[last : end - 1])
        last = end - 1
    assert calls == []  # nothing ran yet
    got = lazy.propose(seq[: ends[-1]], 3, None)
    assert calls[0] == (ends[-1] - 1, True)  # one forward over every kept row
    assert all(not from_target for _, from_target in calls[1:])  # then the chain
    eager, _ = drafter()
    last = 0
    for end in ends:
        eager.accepted(seq[:end], end - last - 1, hidden[last : end - 1])
        eager.catch_up()  # as before: a forward per verification
        last = end - 1
    assert eager.propose(seq[: ends[-1]], 3, None).tokens == got.tokens
    with pytest.raises(SpecrunError, match="out of step"):
        lazy.accepted(seq[: ends[-1] + 2], 0, hidden[: 1])


def test_min_prob_is_checked(head_dir, tiny_models, torch_backend):
    from specrun.errors import SpecrunError

    head = torch_backend.load_eagle3_head(str(head_dir), str(tiny_models["llama"]), device="cpu")
    with pytest.raises(SpecrunError, match="minimum draft probability"):
        Eagle3Drafter(head, num_target_layers=3, min_prob=1.5)


# ------------------------------------------------------------------------------------ pipeline and CLI


def test_cli_generate_with_eagle3(head_dir, tiny_models):
    from click.testing import CliRunner

    from specrun.cli import main

    args = ["generate", "Hello there", "--target", str(tiny_models["llama"]), "-n", "16", "--json", "--backend", "openvino"]
    plain = CliRunner().invoke(main, [*args, "--drafter", "none"])
    # --no-draft-gate: the random head drafts every call, though its drafts never pay
    spec = CliRunner().invoke(main, [*args, "--drafter", "eagle3", "--draft", str(head_dir), "-k", "3", "--no-draft-gate"])
    assert spec.exit_code == 0, spec.output
    a, b = json.loads(plain.stdout), json.loads(spec.stdout)
    assert b["token_ids"] == a["token_ids"]
    assert b["stats"]["drafter"] == "eagle3" and b["stats"]["drafted"] > 0
    missing = CliRunner().invoke(main, [*args, "--drafter", "eagle3"])
    assert missing.exit_code == 2 and "no EAGLE-3 head ships for" in missing.stderr and "--draft DIR" in missing.stderr
    auto = CliRunner().invoke(main, args)  # --drafter auto: no head ships for a local folder -> ngram
    assert auto.exit_code == 0 and json.loads(auto.stdout)["stats"]["drafter"] == "ngram"
    nowhere = CliRunner().invoke(main, [*args, "--drafter", "eagle3", "--draft", str(head_dir) + "-missing"])
    assert nowhere.exit_code == 2 and "does not exist" in nowhere.stderr and "Traceback" not in nowhere.output


def test_backend_without_eagle3_support_is_a_clear_error(head_dir, tiny_models):
    from specrun.interfaces import Backend

    class Bare(Backend):
        name = "bare"

        def availability(self): ...
        def devices(self): return ["cpu"]
        def precisions(self, device): return ["f32"]
        def load_target(self, *a, **k): ...

    with pytest.raises(SpecrunError, match="backend 'bare' cannot run EAGLE-3 heads"):
        Bare().load_eagle3_head(str(head_dir), str(tiny_models["llama"]), device="cpu")


# ------------------------------------------------------------------------------------ sampling losslessness


class HiddenBigram(BigramTarget):
    """test_sampling's bigram target, also returning (zero) hidden states for the EAGLE-3 drafter."""

    def forward(self, tokens, *, all_logits=True):
        out = super().forward(tokens, all_logits=all_logits)
        return StepOutput(out.logits, np.zeros((len(tokens), 3), np.float32))


class ToyHead(DraftHead):
    """Draft logits depend on the entry's token only (a bigram table); the draft vocabulary
    misses target token 1, so the drafter must put zero probability there."""

    def __init__(self, table: np.ndarray):
        from specrun.eagle3 import Eagle3Config

        self.config = Eagle3Config(hidden_size=1, num_heads=1, num_kv_heads=1, head_dim=1, intermediate_size=1,
                                   vocab_size=4, draft_vocab_size=3, target_hidden_size=1, aux_layer_ids=(0, 1, 2))
        self.ids = np.array([0, 2, 3])
        self.d2t = self.ids - np.arange(3)
        self.table = table
        self.backend = self.device = self.precision = "toy"
        self.n = 0

    def reset(self, capacity):
        self.n = 0

    @property
    def length(self):
        return self.n

    def rollback(self, length):
        assert 0 <= length <= self.n
        self.n = length

    def forward(self, tokens, hidden, *, from_target=True, positions=None, mask=None):
        self.n += len(tokens)
        return HeadOutput(self.table[np.asarray(tokens)][:, self.ids], np.zeros((len(tokens), 1), np.float32))


@pytest.mark.parametrize("temperature,top_p,min_prob", [(1.0, 1.0, 0.0), (0.8, 0.9, 0.0), (1.0, 1.0, 0.7)])
def test_eagle3_sampling_matches_target_distribution(temperature, top_p, min_prob):
    """Lossless sampling, also when chains stop early on low draft probability (the stopping
    rule reads the draft only, so the output distribution is still the target's)."""
    from specrun.sampling import SamplingParams

    from .test_sampling import PROMPT, TARGET, chi_square_pvalue, exact_joint

    n = 2000
    params = SamplingParams(temperature=temperature, top_p=top_p)
    target = HiddenBigram(TARGET)
    counts: dict = {}
    accepted = 0
    for seed in range(n):
        drafter = Eagle3Drafter(ToyHead(DRAFT), num_target_layers=3, target_vocab_size=4, min_prob=min_prob)
        dec = SpeculativeDecoder(target, drafter, 3)
        seq = tuple(t for c in dec.generate(PROMPT, 4, SamplingParams(temperature, 0, top_p, seed)) for t in c)
        counts[seq] = counts.get(seq, 0) + 1
        accepted += dec.stats.accepted
    assert accepted > 0
    assert chi_square_pvalue(counts, exact_joint(params), n) > 1e-3


def test_min_prob_stops_on_the_heads_top_probability():
    """ToyHead after token 0: top probability 0.59 (0.30/0.85 ... 0.50/0.85 over its vocabulary);
    after token 3: 0.84.  With min_prob 0.7 a chain stops at the step after a 0; the sampling test
    above uses this threshold, so its chains do stop early."""
    from specrun.sampling import Sampler, SamplingParams

    for sampler in (None, Sampler(SamplingParams(temperature=1.0, seed=0))):
        for first, cut in ((3, 0.7), (0, 0.7), (0, 0.5)):
            drafter = Eagle3Drafter(ToyHead(DRAFT), num_target_layers=3, target_vocab_size=4, min_prob=cut)
            drafter.start([first], 8)
            drafter.accepted([first, first], 1, np.zeros((1, 3), np.float32))
            draft = drafter.propose([first, first], 3, sampler)
            top = 0.59 if first == 0 else 0.84
            assert (len(draft.tokens) == 0) == (top < cut), (first, cut, draft.tokens)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_lookup_first_uses_both_drafters_and_stays_lossless(temperature):
    """eagle3+ngram: prompt lookup where the text repeats (a 4-token vocabulary: often), the head
    elsewhere; the head's cache follows every accepted token either way.  Greedy output equals
    plain decoding; sampling reproduces the target's distribution."""
    from specrun.drafters import LookupFirstDrafter, NoDrafter
    from specrun.sampling import SamplingParams

    from .test_sampling import PROMPT, TARGET, chi_square_pvalue, exact_joint

    target = HiddenBigram(TARGET)
    used = {"lookup": 0, "head": 0}
    counts: dict = {}
    n = 1 if temperature == 0 else 1500
    for seed in range(n):
        eagle = Eagle3Drafter(ToyHead(DRAFT), num_target_layers=3, target_vocab_size=4)
        drafter = LookupFirstDrafter(eagle, min_ngram=2)
        assert drafter.name == "eagle3+ngram" and drafter.aux_hidden_layers == eagle.aux_hidden_layers
        lookup, head = drafter.lookup.propose, eagle.propose

        def count(name, fn):
            def wrapped(*a):
                d = fn(*a)
                used[name] += bool(len(d.tokens))
                return d
            return wrapped

        drafter.lookup.propose, eagle.propose = count("lookup", lookup), count("head", head)
        dec = SpeculativeDecoder(target, drafter, 3)
        params = SamplingParams(temperature, 0, 1.0, seed) if temperature else None
        seq = tuple(t for c in dec.generate(PROMPT, 12 if not temperature else 4, params) for t in c)
        counts[seq] = counts.get(seq, 0) + 1
    assert used["lookup"] > 0 and used["head"] > 0, used
    if temperature == 0:
        plain = SpeculativeDecoder(target, NoDrafter(), 1)
        assert list(seq) == [t for c in plain.generate(PROMPT, 12) for t in c]
    else:
        assert chi_square_pvalue(counts, exact_joint(SamplingParams(temperature=temperature)), n) > 1e-3


def test_head_on_another_backend_than_the_target(head_dir, tiny_models):
    """--draft-backend: the head runs on its own backend (numpy crosses the boundary)."""
    from specrun.pipeline import Pipeline
    from specrun.plugins import load_registry
    from specrun_torch_cuda.backend import TorchBackend

    from .conftest import register_backend_for_tests

    class OtherTorch(TorchBackend):
        name = "other_torch"

    reg = load_registry(["torch_cuda"])
    register_backend_for_tests(reg, OtherTorch())
    folder = str(tiny_models["llama"])
    ref = Pipeline.load(folder, drafter="none", registry=reg).generate("Hi", max_new_tokens=10)
    pipe = Pipeline.load(folder, drafter="eagle3", draft=str(head_dir), draft_backend="other_torch", registry=reg)
    assert pipe.drafter.head.backend == "other_torch" and pipe.target.backend == "torch_cuda"
    assert pipe.generate("Hi", max_new_tokens=10).token_ids == ref.token_ids


def test_aux_layer_ids_follow_specforge_and_vllm_conventions(tmp_path):
    """SpecForge / SGLang number the captured tensors by the layer whose output they are
    (default [1, L//2-1, L-4]); vLLM by the layer whose input they are (default (2, L//2, L-3)):
    both name the same tensors, read and written both ways."""
    from specrun.eagle3 import aux_ids_from_config, default_aux_layers
    from specrun.errors import SpecrunError
    from specrun_kit.headfile import aux_ids_to_config

    L = 30
    specforge = [1, L // 2 - 1, L - 4]
    assert aux_ids_from_config({"eagle_config": {"eagle_aux_hidden_state_layer_ids": specforge}}) == default_aux_layers(L)
    assert aux_ids_from_config({"eagle_aux_hidden_state_layer_ids": [2, 15, 27]}) == (2, 15, 27)
    both = aux_ids_to_config(default_aux_layers(L), {})
    assert both == {"eagle_aux_hidden_state_layer_ids": [2, 15, 27], "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 14, 26]}}
    assert aux_ids_from_config(both) == (2, 15, 27)
    with pytest.raises(SpecrunError, match="name other layers"):
        aux_ids_from_config({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, 15, 27]},
                             "eagle_aux_hidden_state_layer_ids": [2, 15, 27]})
    with pytest.raises(SpecrunError, match="list of layer numbers"):
        aux_ids_from_config({"eagle_aux_hidden_state_layer_ids": "2,15"})
    # the shipped head reads the inputs of layers 2, 15, 27, and says so in both conventions
    from specrun.drafters import bundled_head

    shipped = json.loads((bundled_head(None) / "config.json").read_text())
    assert shipped["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == specforge
    assert aux_ids_from_config(shipped) == (2, 15, 27)

