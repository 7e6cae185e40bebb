"""The openvino backend: f32 parity with torch, bf16/int8 self-consistency and losslessness, the IR
cache (reuse, corruption), devices, mixed-backend drafting, missing openvino."""

from __future__ import annotations

import numpy as np
import pytest

from specrun.decode import SpeculativeDecoder
from specrun.drafters import ModelDrafter, NgramDrafter, NoDrafter
from specrun.errors import SpecrunError

from .conftest import ARCHS

pytest.importorskip("openvino")

from specrun_openvino.backend import OpenVinoBackend, to_bf16_bits  # noqa: E402

NEEDS_BF16 = pytest.mark.skipif(
    "BF16" not in OpenVinoBackend()._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
    reason="this CPU does not compute bf16 (OpenVINO would run f32)",
)
PROMPT = [5, 17, 300, 42, 9, 1200, 77, 8, 8, 613, 2000, 31, 5, 17, 300, 42, 9, 1200, 77, 8]


@pytest.fixture(scope="module")
def ov_backend():
    return OpenVinoBackend()


@pytest.fixture
def cache(tmp_path, monkeypatch, default_model_dir):
    monkeypatch.setenv("SPECRUN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def pieces(target, ids):
    target.reset(64)
    return np.concatenate([target.forward(ids[:7]).logits, target.forward(ids[7:8]).logits, target.forward(ids[8:]).logits])


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_matches_torch(arch, tiny_models, torch_backend, ov_backend):
    folder = str(tiny_models[arch])
    ref = torch_backend.load_target(folder, device="cpu")
    ref.reset(64)
    want = ref.forward(PROMPT).logits
    got = pieces(ov_backend.load_target(folder, device="cpu", precision="f32"), PROMPT)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3


def test_precision_is_explicit_and_reported(tiny_models, ov_backend):
    precisions = ov_backend.precisions("cpu")
    assert {"f32", "int8", "int4"} <= set(precisions)
    has_bf16 = "BF16" in ov_backend._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert ("bf16" in precisions) == has_bf16 and precisions[0] == ("bf16" if has_bf16 else "f32")
    folder = str(tiny_models["llama"])
    for p in [x for x in ("f32", "bf16") if x in precisions]:
        t = ov_backend.load_target(folder, device="cpu", precision=p)
        assert t.precision == p
        assert t.compute_precision in ("f32", "bf16", "f16")
    default = ov_backend.load_target(folder, device="cpu")
    assert default.precision == precisions[0]


@NEEDS_BF16
@pytest.mark.parametrize("precision", ["bf16"])
def test_low_precision_is_lossless_against_itself(precision, tiny_models, ov_backend):
    folder = str(tiny_models["qwen2"])
    target = ov_backend.load_target(folder, device="cpu", precision=precision)
    dec = SpeculativeDecoder(target, NoDrafter(), 4)
    plain = [t for c in dec.generate(PROMPT, 24) for t in c]
    draft = ModelDrafter(ov_backend.load_target(folder, device="cpu", precision=precision), 49152)
    for drafter in (NgramDrafter(), draft):
        dec = SpeculativeDecoder(target, drafter, 3)
        assert [t for c in dec.generate(PROMPT, 24) for t in c] == plain
    # and the numbers moved: this really ran at another precision than f32
    f32 = ov_backend.load_target(folder, device="cpu", precision="f32")
    assert np.abs(pieces(target, PROMPT) - pieces(f32, PROMPT)).max() > 1e-4


def test_rollback_then_continue(tiny_models, ov_backend):
    t = ov_backend.load_target(str(tiny_models["mistral"]), device="cpu", precision="f32")
    t.reset(64)
    t.forward(PROMPT[:10])
    t.forward([1000, 1001, 1002])
    t.rollback(10)
    cont = t.forward(PROMPT[10:]).logits
    fresh = pieces(t, PROMPT)[10:]
    assert np.abs(cont - fresh).max() < 1e-4


def test_hidden_states_match_torch(tiny_models, torch_backend, ov_backend):
    folder = str(tiny_models["llama"])
    a = ov_backend.load_target(folder, device="cpu", precision="f32", aux_hidden_layers=(0, 2))
    b = torch_backend.load_target(folder, device="cpu", aux_hidden_layers=(0, 2))
    a.reset(32)
    b.reset(32)
    ha, hb = a.forward(PROMPT, all_logits=False).hidden_states, b.forward(PROMPT, all_logits=False).hidden_states
    assert ha.shape == hb.shape == (len(PROMPT), 2 * 64)
    assert np.abs(ha - hb).max() < 1e-3


def test_devices(tiny_models, ov_backend):
    assert "cpu" in ov_backend.devices()
    if "npu" not in ov_backend.devices():
        with pytest.raises(SpecrunError, match=r"device 'npu' is not present for backend 'openvino'; present: cpu"):
            ov_backend.load_target(str(tiny_models["llama"]), device="npu")
    if "gpu" not in ov_backend.devices():
        with pytest.raises(SpecrunError, match="present: cpu"):
            ov_backend.load_target(str(tiny_models["llama"]), device="GPU")
    with pytest.raises(SpecrunError, match="unknown device 'tpu'"):
        ov_backend.load_target(str(tiny_models["llama"]), device="tpu")


def test_ir_cache_reuse_and_corruption(cache, tiny_models, ov_backend):
    folder = str(tiny_models["qwen3"])
    xml = ov_backend.ir_path(folder, "f32", ())
    marker = xml.parent / "specrun-complete.json"
    stamp = marker.stat().st_mtime_ns
    assert ov_backend.ir_path(folder, "f32", ()) == xml and marker.stat().st_mtime_ns == stamp  # reused
    weights = xml.with_suffix(".bin")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a partial file
    t = ov_backend.load_target(folder, device="cpu", precision="f32")  # detected and rebuilt
    assert marker.stat().st_mtime_ns != stamp
    t.reset(32)
    assert np.isfinite(t.forward(PROMPT).logits).all()


def test_mixed_backends(tiny_models, tiny_draft, torch_backend, ov_backend):
    target_dir, draft_dir = str(tiny_models["llama"]), str(tiny_draft)
    for tb, db in ((torch_backend, ov_backend), (ov_backend, torch_backend)):
        target = tb.load_target(target_dir, device="cpu", precision="f32")
        plain = [t for c in SpeculativeDecoder(target, NoDrafter(), 3).generate(PROMPT, 20) for t in c]
        drafter = ModelDrafter(db.load_target(draft_dir, device="cpu", precision="f32"), 49152)
        dec = SpeculativeDecoder(target, drafter, 3)
        assert [t for c in dec.generate(PROMPT, 20) for t in c] == plain
        assert dec.stats.drafted > 0


def test_missing_openvino_is_unavailable(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    avail = OpenVinoBackend().availability()
    assert not avail.available and "openvino cannot be imported" in avail.reason
    assert avail.install_hint == "pip install 'specrun[openvino]'"


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_compressed_weights_are_self_consistent_and_lossless(precision, tiny_models, ov_backend):
    """nncf-compressed weights load (the load-time guard passes), report their precision, agree
    between a block and single steps, and speculative greedy output equals plain greedy."""
    folder = str(tiny_models["qwen2"])
    target = ov_backend.load_target(folder, device="cpu", precision=precision)
    assert target.precision == precision
    target.reset(32)
    block = target.forward(PROMPT[:8]).logits
    target.reset(32)
    steps = np.stack([target.forward([t]).logits[0] for t in PROMPT[:8]])
    assert (block.argmax(-1) == steps.argmax(-1)).mean() >= 0.75
    plain = [t for c in SpeculativeDecoder(target, NoDrafter(), 4).generate(PROMPT, 24) for t in c]
    spec = [t for c in SpeculativeDecoder(target, NgramDrafter(), 4).generate(PROMPT, 24) for t in c]
    assert spec == plain


def test_guard_refuses_a_runtime_that_computes_single_steps_wrongly(tiny_models, ov_backend):
    """What OpenVINO 2026.4 did with the tied-embedding graph: 1-token steps disagree with a
    block.  The guard turns that into a one-line refusal instead of wrong text."""
    from specrun_openvino import backend as ovb

    target = ov_backend.load_target(str(tiny_models["qwen2"]), device="cpu", precision="f32")
    real = target._execute
    rng = np.random.default_rng(0)

    def broken(ids, *a):
        logits, new_kv, hidden = real(ids, *a)
        if len(ids) <= 2:
            logits = rng.normal(size=logits.shape).astype(np.float32)
        return logits, new_kv, hidden

    target._execute = broken
    with pytest.raises(SpecrunError, match="computes f32 weights wrongly.*onnx_cpu"):
        ovb._check_small_blocks(target, "cpu")


@NEEDS_BF16
@pytest.mark.slow
def test_default_model_f32_parity_and_bf16_lossless(default_model_dir, torch_backend, ov_backend):
    ids = PROMPT
    ref = torch_backend.load_target(str(default_model_dir), device="cpu")
    ref.reset(64)
    want = ref.forward(ids).logits
    got = pieces(ov_backend.load_target(str(default_model_dir), device="cpu", precision="f32"), ids)
    assert np.abs(got - want).max() < 1e-3
    for precision in ("bf16", "int8"):
        t = ov_backend.load_target(str(default_model_dir), device="cpu", precision=precision)
        plain = [x for c in SpeculativeDecoder(t, NoDrafter(), 4).generate(ids, 24) for x in c]
        spec = [x for c in SpeculativeDecoder(t, NgramDrafter(), 4).generate(ids, 24) for x in c]
        assert spec == plain, precision


@pytest.mark.parametrize("precision", ["f32", "bf16", "int8", "int4"])
def test_block_logits_are_bit_identical_to_single_steps(precision, tiny_models, ov_backend):
    """The graph is batch-invariant: a token's logits do not depend on the block it runs in (the
    reason greedy speculative output equals plain output at every precision).  Blocks of 2..5
    tokens re-run over a cache filled by single steps give the same bits."""
    if precision not in ov_backend.precisions("cpu"):
        pytest.skip(f"this CPU does not compute {precision}")
    target = ov_backend.load_target(str(tiny_models["llama"]), device="cpu", precision=precision)
    rng = np.random.default_rng(1)
    toks = [int(x) for x in rng.integers(3, target.info.vocab_size, 60)]  # 80 rows: the buffer grows past 64
    target.reset(16)
    target.forward(PROMPT)
    steps = np.stack([target.forward([t]).logits[0] for t in toks])
    for T in (2, 3, 5):
        target.rollback(len(PROMPT))
        for t in toks:  # the cache rows made by single steps again
            target.forward([t])
        for i in reversed(range(0, len(toks) - T + 1, T)):  # backwards: each block reads step-made rows only
            target.rollback(len(PROMPT) + i)
            # stale rows from the block on hold junk: the block must use its own keys, not these
            junk = rng.normal(size=target._kv[:, :, :, len(PROMPT) + i :].shape).astype(np.float32)
            target._kv[:, :, :, len(PROMPT) + i :] = to_bf16_bits(junk) if target._kv.dtype == np.uint16 else junk
            np.testing.assert_array_equal(target.forward(toks[i : i + T]).logits, steps[i : i + T], err_msg=f"T={T} at {i}")
    # a token tree (root, two children, a grandchild under the second): the root row is the same
    # bits; rows whose ancestors sit in other cache rows than in a chain (a sibling took the row)
    # only agree to rounding — tree verification is not batch-invariant (README, openvino)
    target.rollback(len(PROMPT))
    for t in toks[:3]:
        target.forward([t])
    target.rollback(len(PROMPT))
    out = target.forward_tree([toks[0], 7, toks[1], toks[2]], [-1, 0, 0, 2]).logits
    np.testing.assert_array_equal(out[0], steps[0])
    if precision == "f32":
        np.testing.assert_allclose(out[[2, 3]], steps[1:3], atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_hidden_state_outputs_do_not_change_the_logits(precision, tiny_models, ov_backend):
    """The graph an EAGLE-3 drafter needs (hidden states of three layers out) computes the same
    logits, bit for bit, as the plain graph: otherwise `--drafter eagle3` and plain decoding would
    disagree at low precision (OpenVINO keeps an output's "tail" in f32, which without the graph's
    x @ I barrier was the whole residual stream)."""
    if precision not in ov_backend.precisions("cpu"):
        pytest.skip(f"this CPU does not compute {precision}")
    folder = str(tiny_models["llama"])
    plain = ov_backend.load_target(folder, device="cpu", precision=precision)
    aux = ov_backend.load_target(folder, device="cpu", precision=precision, aux_hidden_layers=(0, 1))
    rng = np.random.default_rng(2)
    toks = [int(x) for x in rng.integers(3, plain.info.vocab_size, 12)]
    got = []
    for t in (plain, aux):
        t.reset(64)
        got.append(np.concatenate([t.forward(PROMPT).logits] + [t.forward([x]).logits for x in toks]))
    np.testing.assert_array_equal(got[0], got[1])


def _as_f32(kv: np.ndarray) -> np.ndarray:
    """Cache rows as float32 (a bf16 cache holds bf16 bits as uint16)."""
    return (kv.astype(np.uint32) << 16).view(np.float32) if kv.dtype == np.uint16 else kv


@NEEDS_BF16
def test_bf16_cache_keeps_rotary_positions_exact(tiny_models, ov_backend):
    """At bf16 the cache is stored as bf16, but the rotary angles (position x frequency) must
    still be computed in f32: rounded to bf16 they are off by up to 1 radian at position 500 and
    the model degrades with context.  Layer-0 keys depend on the token and position only, so
    they are compared with the f32 target's position by position."""
    folder = str(tiny_models["llama"])
    rng = np.random.default_rng(3)
    ids = [int(x) for x in rng.integers(3, 40000, 500)]
    keys = []
    for precision in ("bf16", "f32"):
        t = ov_backend.load_target(folder, device="cpu", precision=precision)
        t.reset(512)
        t.forward(ids)
        keys.append(_as_f32(t._kv[0, 0, :, :500]))  # [kv_heads, positions, D]
    err = np.abs(keys[0] - keys[1]).max(axis=(0, 2)) / np.abs(keys[1]).max(axis=(0, 2))
    assert err[:50].max() < 0.02 and err[400:].max() < 0.02, (err[:50].max(), err[400:].max())


@pytest.mark.parametrize("precision", ["f32", "int8"])
def test_every_block_shape_scheme_keeps_blocks_exact(precision, tiny_models, ov_backend):
    """Each scheme the load-time probe may choose (static graphs per row count, or the dynamic graph
    padded to a ladder of row counts), forced on: blocks and single steps give the same bits, the
    static graphs are the ones that run, trees keep their paths, and greedy speculative output
    equals plain output."""
    from specrun_openvino.backend import LADDERS, _block_invariant

    target = ov_backend.load_target(str(tiny_models["llama"]), device="cpu", precision=precision)
    for static, ladder in LADDERS:
        if not ladder:
            continue
        target.static, target.ladder = static, ladder
        target._static, target._bound = {}, {}  # no graph left over from the previous scheme
        assert _block_invariant(target) and target.block_rows == ladder[-1]
        if static:
            assert set(ladder) <= set(target._static)  # every row count ran on its own static graph
        plain = [x for c in SpeculativeDecoder(target, NoDrafter(), 4).generate(PROMPT + PROMPT, 20) for x in c]
        spec = [x for c in SpeculativeDecoder(target, NgramDrafter(), 4).generate(PROMPT + PROMPT, 20) for x in c]
        assert len(plain) == 20 and spec == plain, (static, ladder)
        target.reset(16)
        target.forward(PROMPT)
        out = target.forward_tree([5, 7, 9], [-1, 0, 0])
        assert out.logits.shape[0] == 3
        target.keep([0, 2])
        assert target.length == len(PROMPT) + 2


def test_static_graphs_compute_what_the_dynamic_graph_computes(tiny_models, ov_backend):
    """The graphs compiled per row count are the same model: f32 logits of a decode continued on
    static graphs stay within rounding of the dynamic graph's."""
    target = ov_backend.load_target(str(tiny_models["llama"]), device="cpu", precision="f32")
    runs = []
    for static in (True, False):
        target.static, target.ladder = static, (1, 5, 8)
        target.reset(32)
        target.forward(PROMPT)
        runs.append(np.concatenate([target.forward([5, 9, 11]).logits, target.forward([3]).logits]))
    assert runs[0].shape == runs[1].shape and np.abs(runs[0] - runs[1]).max() < 1e-3


def test_the_batch_invariance_probe_runs_once_per_machine(tiny_models, ov_backend, monkeypatch):
    """The probe's verdict is remembered in the cache: a second load reuses it instead of running
    the ~40 probe forwards again, and gets the same block shape."""
    import specrun_openvino.backend as ob

    first = ov_backend.load_target(str(tiny_models["llama"]), device="cpu", precision="int8")
    assert ob._probe_file(first).is_file()

    def no_probe(target):
        raise AssertionError("probed again")

    monkeypatch.setattr(ob, "_block_invariant", no_probe)
    again = ov_backend.load_target(str(tiny_models["llama"]), device="cpu", precision="int8")
    assert (again.static, again.ladder) == (first.static, first.ladder)


def test_prepare_compiles_the_static_graphs_the_loop_will_use(tiny_models, ov_backend):
    """The loop announces its largest call before timing anything: plain decoding gets the 1-row
    graph only, a chain of 4 drafts the graphs up to the 5-row one, and nothing is compiled later."""
    from specrun_openvino.backend import LADDERS

    target = ov_backend.load_target(str(tiny_models["llama"]), device="cpu", precision="int8")
    target.static, target.ladder = LADDERS[0]
    target._static = {}
    list(SpeculativeDecoder(target, NoDrafter(), 4).generate(PROMPT, 8))
    assert sorted(target._static) == [1]
    target._static = {}
    decoder = SpeculativeDecoder(target, NgramDrafter(), 4)
    gen = decoder.generate(PROMPT + PROMPT, 16)
    next(gen)  # the prefill has run: everything the loop needs is compiled by now
    compiled = sorted(target._static)
    list(gen)
    assert compiled == [r for r in LADDERS[0][1] if r <= 5] == sorted(target._static)


def test_token_trees_run_on_the_static_graphs(tiny_models, ov_backend):
    """A tree within the ladder is padded to a ladder size and runs on that static graph: a
    chain-shaped tree gives single steps' bits, and keep() follows its path.  A larger tree passed
    to forward_tree directly (the loop keeps trees within block_rows) runs on a static graph of the
    next multiple of the top of the ladder, equal to rounding."""
    from specrun_openvino.backend import LADDERS

    target = ov_backend.load_target(str(tiny_models["llama"]), device="cpu", precision="f32")
    target.static, target.ladder = LADDERS[0]
    nodes = [5, 9, 11, 3, 7, 13, 17, 19, 23, 29]
    target.reset(64)
    target.forward(PROMPT)
    steps = np.stack([target.forward([t]).logits[0] for t in nodes])
    for n in (4, 10):
        target.rollback(len(PROMPT))
        out = target.forward_tree(nodes[:n], [-1, *range(n - 1)])
        assert out.logits.shape[0] == n and target._rows(n) in target._static
        assert np.array_equal(out.logits, steps[:n]) if n <= target.block_rows else np.abs(out.logits - steps[:n]).max() < 1e-4
        target.keep([0, 1, 2])
        assert target.length == len(PROMPT) + 3
        assert np.array_equal(target.forward([3]).logits[0], steps[3]) if n <= target.block_rows else True
    with pytest.raises(ValueError):
        target.forward_tree([], [])


@pytest.mark.parametrize("ladder", [(1, 5, 8), (2, 4)])
def test_padding_may_pass_the_context_limit(ladder, tiny_models, ov_backend):
    """The last tokens before the model's context limit: a block padded to the ladder reaches past
    it (into spare cache rows) instead of failing, with single steps' bits (with a ladder without 1
    row, a single step is padded too); the limit itself still holds for real tokens."""
    target = ov_backend.load_target(str(tiny_models["llama"]), device="cpu", precision="int8")
    target.static, target.ladder = True, ladder
    limit = target.info.context_length
    prompt = (PROMPT * (limit // len(PROMPT) + 1))[: limit - 3]
    target.reset(limit)
    target.forward(prompt)
    block = target.forward([5, 9, 11]).logits  # 3 rows padded to 4 or 5: past the limit
    target.rollback(limit - 3)
    steps = np.stack([target.forward([t]).logits[0] for t in (5, 9, 11)])  # the last one at limit - 1
    assert target.length == limit and np.array_equal(block, steps)
    with pytest.raises(SpecrunError, match="context limit"):
        target.forward([3])
