"""EAGLE-3 heads on the ONNX runtimes (onnx_cpu, openvino): parity with the torch head on the
same calls (real positions, own-output steps, a token tree with explicit positions and mask,
rollback), greedy losslessness of chain and tree decoding with target and head on that backend,
and the cached head export (reuse, corruption)."""

from __future__ import annotations

import numpy as np
import pytest

from specrun.decode import SpeculativeDecoder, TreeSpeculativeDecoder
from specrun.drafters import Eagle3Drafter
from specrun.plugins import load_registry
from specrun_conformance.suite import SteeredHead

from .test_eagle3 import H, V, make_head
from .test_lossless import PROMPTS, plain_greedy

BACKENDS = ["onnx_cpu", "openvino"]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory):
    return make_head(tmp_path_factory.mktemp("bhead") / "h", seed=7)


def _backend(registry, name):
    be = registry.get(name)
    if not be.availability().available:
        pytest.fail(f"{name} is not available here: {be.availability().reason}")
    return be


def _calls(head, rng):
    """A fixed call sequence: prompt block, draft steps, rollback, a 4-node tree."""
    outs = []
    toks = [int(t) for t in rng.integers(0, V, 12)]
    hid = rng.normal(size=(12, 3 * H)).astype(np.float32)
    head.reset(4)
    outs.append(head.forward(toks[:6], hid[:6]))
    outs.append(head.forward(toks[6:9], hid[6:9]))
    prev = outs[-1].hidden[-1:]
    for t in toks[9:]:
        o = head.forward([t], prev, from_target=False)
        outs.append(o)
        prev = o.hidden
    head.rollback(9)
    # tree: root at position 9, two children at 10, one grandchild at 11
    start = head.length
    mask = np.ones((4, start + 4), dtype=bool)
    mask[:, start:] = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=bool)
    tree_hidden = rng.normal(size=(4, H)).astype(np.float32)
    outs.append(head.forward(toks[:4], tree_hidden, from_target=False, positions=[9, 10, 10, 11], mask=mask))
    return outs


@pytest.mark.parametrize("name", BACKENDS)
def test_head_matches_torch(name, registry, head_dir, tiny_models, torch_backend):
    target = str(tiny_models["llama"])
    ref = _calls(torch_backend.load_eagle3_head(str(head_dir), target, device="cpu"), np.random.default_rng(3))
    be = _backend(registry, name)
    head = be.load_eagle3_head(str(head_dir), target, device="cpu", precision="f32")
    got = _calls(head, np.random.default_rng(3))
    assert head.backend == name and head.precision == "f32"
    for r, g in zip(ref, got, strict=True):
        scale = max(1.0, float(np.abs(r.logits).max()))
        assert np.abs(r.logits - g.logits).max() < 1e-4 * scale
        assert np.abs(r.hidden - g.hidden).max() < 1e-4 * max(1.0, float(np.abs(r.hidden).max()))


@pytest.mark.parametrize("name", BACKENDS)
def test_chain_and_tree_lossless_on_backend(name, registry, head_dir, tiny_models):
    """A random head is (almost) never accepted, which tests rejection only: the backend's head is
    steered toward the true continuation (its forward, cache and rollback still run), so drafts are
    partly accepted and the accepted path's cache rows are kept and the rest rolled back."""
    be = _backend(registry, name)
    folder = str(tiny_models["llama"])
    head = be.load_eagle3_head(str(head_dir), folder, device="cpu")  # default: int8 weights
    assert head.precision == "int8"
    target = be.load_target(folder, device="cpu", precision="f32", aux_hidden_layers=(0, 1, 2))
    prompt = PROMPTS[1]
    ref = plain_greedy(target, prompt, 24)
    steered = SteeredHead.toward(head, prompt, ref)
    for k in (1, 4):
        dec = SpeculativeDecoder(target, Eagle3Drafter(steered, num_target_layers=3), k)
        assert [t for c in dec.generate(prompt, 24) for t in c] == ref, f"chain k={k}"
        assert 0 < dec.stats.accepted < dec.stats.drafted, f"chain k={k}: needs partial acceptance"
    tree = TreeSpeculativeDecoder(target, Eagle3Drafter(steered, num_target_layers=3, tree_topk=3), 4, 10)
    assert [t for c in tree.generate(prompt, 24) for t in c] == ref
    assert 0 < tree.stats.accepted < tree.stats.drafted


def test_head_export_is_cached_and_rebuilt_when_damaged(registry, head_dir, tiny_models):
    from specrun_kit import head as hd

    be = _backend(registry, "onnx_cpu")
    folder = str(tiny_models["llama"])
    be.load_eagle3_head(str(head_dir), folder, device="cpu", precision="f32")
    export = hd.head_export_dir(head_dir)
    data = export / hd.HEAD_DATA
    mtime = data.stat().st_mtime_ns
    be.load_eagle3_head(str(head_dir), folder, device="cpu", precision="f32")
    assert data.stat().st_mtime_ns == mtime  # reused
    with open(data, "r+b") as f:  # damage the weights: the fingerprint no longer matches
        f.truncate(data.stat().st_size // 2)
    head = be.load_eagle3_head(str(head_dir), folder, device="cpu", precision="f32")
    assert data.stat().st_size > 0 and data.stat().st_mtime_ns != mtime
    head.reset(8)
    out = head.forward([1, 2], np.zeros((2, 3 * H), np.float32))
    assert np.isfinite(out.logits).all()


def test_head_backend_refuses_bad_precision_and_device(registry, head_dir, tiny_models):
    from specrun.errors import SpecrunError

    be = _backend(registry, "onnx_cpu")
    with pytest.raises(SpecrunError, match="unknown device"):
        be.load_eagle3_head(str(head_dir), str(tiny_models["llama"]), device="tpu")
    with pytest.raises(SpecrunError, match="f32 or int8"):
        be.load_eagle3_head(str(head_dir), str(tiny_models["llama"]), device="cpu", precision="bf16")
