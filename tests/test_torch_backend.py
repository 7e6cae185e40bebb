"""The torch_cuda backend against transformers' own forward, and the Target contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specrun.errors import SpecrunError

from .conftest import ARCHS

PROMPT = [5, 17, 300, 42, 9, 1200, 77, 8, 8, 613, 2000, 31]


def hf_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(arch, tiny_models, torch_backend):
    target = torch_backend.load_target(str(tiny_models[arch]), device="cpu")
    target.reset(64)
    out = target.forward(PROMPT)
    ref = hf_logits(tiny_models[arch], PROMPT)
    assert out.logits.shape == ref.shape
    assert np.abs(out.logits - ref).max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_and_block_equal_prefill(arch, tiny_models, torch_backend):
    target = torch_backend.load_target(str(tiny_models[arch]), device="cpu")
    target.reset(64)
    full = target.forward(PROMPT).logits
    target.reset(64)
    steps = [target.forward([t]).logits[0] for t in PROMPT[:6]]
    block = target.forward(PROMPT[6:]).logits
    got = np.concatenate([np.stack(steps), block])
    assert target.length == len(PROMPT)
    assert np.abs(got - full).max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_rollback_then_continue_equals_fresh_run(arch, tiny_models, torch_backend):
    target = torch_backend.load_target(str(tiny_models[arch]), device="cpu")
    target.reset(64)
    target.forward(PROMPT[:8])
    target.forward([999, 998, 997, 996])  # a rejected draft
    target.rollback(8)
    assert target.length == 8
    cont = target.forward(PROMPT[8:]).logits
    target.reset(64)
    fresh = target.forward(PROMPT).logits[8:]
    assert np.abs(cont - fresh).max() < 1e-4


def test_sliding_window_matches_transformers(tmp_path, torch_backend):
    """Mistral's window must be applied once the context is longer than it."""
    from .conftest import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", "mistral", vocab_size=512, sliding_window=8)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 500, 20)]
    target = torch_backend.load_target(str(folder), device="cpu")
    target.reset(32)
    out = target.forward(ids[:15]).logits
    step = target.forward(ids[15:16]).logits
    ref = hf_logits(folder, ids[:16])
    assert np.abs(out - ref[:15]).max() < 1e-4
    assert np.abs(step[0] - ref[15]).max() < 1e-4


def test_hidden_states_are_layer_inputs(tiny_models, torch_backend):
    from transformers import AutoModelForCausalLM

    folder = tiny_models["llama"]
    target = torch_backend.load_target(str(folder), device="cpu", aux_hidden_layers=(0, 2))
    target.reset(32)
    out = target.forward(PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = hf(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states  # hs[i] = input of layer i
    ref = torch.cat([hs[0][0], hs[2][0]], dim=-1).numpy()
    assert out.hidden_states.shape == ref.shape
    assert np.abs(out.hidden_states - ref).max() < 1e-4


def test_cache_grows_beyond_reserved_capacity(tiny_models, torch_backend):
    target = torch_backend.load_target(str(tiny_models["llama"]), device="cpu")
    target.reset(4)
    a = target.forward(PROMPT[:3]).logits
    b = target.forward(PROMPT[3:]).logits
    target.reset(64)
    full = target.forward(PROMPT).logits
    assert np.abs(np.concatenate([a, b]) - full).max() < 1e-4


def test_absent_cuda_is_a_clear_error(tiny_models, torch_backend):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SpecrunError, match="not present.*present: cpu"):
        torch_backend.load_target(str(tiny_models["llama"]), device="cuda")
    with pytest.raises(SpecrunError, match="unknown device 'tpu'"):
        torch_backend.load_target(str(tiny_models["llama"]), device="tpu")


def test_unknown_precision_and_context_limit(tiny_models, torch_backend):
    with pytest.raises(SpecrunError, match="cannot run precision 'int3'"):
        torch_backend.load_target(str(tiny_models["llama"]), device="cpu", precision="int3")
    target = torch_backend.load_target(str(tiny_models["llama"]), device="cpu")
    target.reset(8)
    with pytest.raises(SpecrunError, match="context limit of 512"):
        target.forward([3] * 513)


def test_corrupt_weights_are_reported(tmp_path, tiny_models, torch_backend):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SpecrunError, match="corrupt or partial"):
        torch_backend.load_target(str(folder), device="cpu")
