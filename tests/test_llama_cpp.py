"""The llama_cpp backend: the GGUF converter against torch (f32, every architecture it takes),
models it refuses, the bundled model's own GGUF file, exact blocks and rollback, lossless
speculation at every weight format, the cache of converted files, missing llama-cpp-python."""

from __future__ import annotations

import numpy as np
import pytest

from specrun.decode import SpeculativeDecoder
from specrun.drafters import NgramDrafter, NoDrafter
from specrun.errors import SpecrunError

pytest.importorskip("llama_cpp")

from specrun_llama_cpp.backend import FORMATS, LlamaCppBackend, _file_type  # noqa: E402

PROMPT = [5, 17, 300, 42, 9, 1200, 77, 8, 8, 613, 2000, 31, 5, 17, 300, 42, 9, 1200, 77, 8]
CONVERTED = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def lc_backend():
    return LlamaCppBackend()


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory, default_model_dir):
    """A tiny Qwen2 with 32-wide heads: its keys fit Q8_0 blocks, as real models' do (the tiny
    models' 16-wide heads keep f16 keys, whose long-context attention is not exact in blocks)."""
    from .conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("wide") / "qwen2", "qwen2", num_attention_heads=2,
                           num_key_value_heads=1, tokenizer_from=default_model_dir)


def pieces(target, ids):
    target.reset(64)
    return np.concatenate([target.forward(ids[:7]).logits, target.forward(ids[7:8]).logits, target.forward(ids[8:]).logits])


@pytest.mark.parametrize("arch", CONVERTED)
def test_f32_matches_torch(arch, tiny_models, torch_backend, lc_backend, monkeypatch):
    """The converted GGUF (names, q/k permutation, biases, q/k norms, head sizes) computes what the
    torch reference computes: f32 weights and an f32 cache, run in pieces — to 1e-3 with llama.cpp's
    plain attention, to f16's tolerance with the flash attention the backend runs (f16 inside)."""
    import specrun_llama_cpp.backend as lcb

    folder = str(tiny_models[arch])
    ref = torch_backend.load_target(folder, device="cpu")
    ref.reset(64)
    want = ref.forward(PROMPT).logits
    for flash, atol in ((0, 1e-3), (1, 0.25)):
        monkeypatch.setattr(lcb, "FLASH_ATTN", flash)
        target = lc_backend.load_target(folder, device="cpu", precision="f32")
        got = pieces(target, PROMPT)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < atol, flash
        target.close()


def test_sliding_window_models_are_refused_in_one_line(tiny_models, lc_backend):
    with pytest.raises(SpecrunError, match="sliding window of 16 tokens.*use --backend openvino"):
        lc_backend.load_target(str(tiny_models["mistral"]), device="cpu", precision="f32")


def test_no_hidden_states_for_heads(tiny_models, lc_backend):
    assert "hidden_states" not in lc_backend.capabilities()
    with pytest.raises(SpecrunError, match="returns no hidden states"):
        lc_backend.load_target(str(tiny_models["llama"]), device="cpu", precision="f32", aux_hidden_layers=[0, 1])


@pytest.mark.parametrize("precision", list(FORMATS))
def test_exact_blocks_are_probed_truthfully_and_quantized_formats_are_lossless(precision, wide_heads, lc_backend):
    """The probe's verdict matches a direct check of a block against single steps; the quantized
    formats (activations quantized per row, integer dot products, Q8_0 keys) are exact, at short
    and long contexts, so greedy speculative output equals plain; rollback then continue matches a
    fresh run."""
    from specrun_kit.probe import blocks_match_steps

    target = lc_backend.load_target(str(wide_heads), device="cpu", precision=precision)
    assert target.precision == precision
    assert _file_type(target.path) == FORMATS[precision][0]
    target.reset(64)
    block = target.forward(PROMPT).logits
    target.reset(64)
    steps = np.stack([target.forward([t]).logits[0] for t in PROMPT])
    assert target.exact_blocks == (bool(np.array_equal(block, steps)) and blocks_match_steps(target, 480))
    if precision in ("int4", "int8"):
        assert target.exact_blocks is True
        plain = [t for c in SpeculativeDecoder(target, NoDrafter(), 4).generate(PROMPT, 24) for t in c]
        spec = [t for c in SpeculativeDecoder(target, NgramDrafter(), 4).generate(PROMPT, 24) for t in c]
        assert spec == plain
    target.reset(64)
    target.forward(PROMPT[:8])
    target.forward(PROMPT[8:12])
    target.rollback(8)
    again = target.forward(PROMPT[8:]).logits
    fresh = pieces(target, PROMPT)[8:]
    assert np.array_equal(again, fresh) if target.exact_blocks else np.abs(again - fresh).max() < 1e-3
    target.close()


def test_converted_files_are_cached_and_verified(tiny_models, lc_backend):
    folder = str(tiny_models["llama"])
    first = lc_backend.gguf_path(folder, "int8")
    assert lc_backend.gguf_path(folder, "int8") == first
    with open(first, "r+b") as f:  # damage the cached file: it is rebuilt, never used
        f.seek(first.stat().st_size // 2)
        f.write(b"\0" * 64)
    rebuilt = lc_backend.gguf_path(folder, "int8")
    assert rebuilt == first and _file_type(rebuilt) == "Q8_0"
    target = lc_backend.load_target(folder, device="cpu", precision="int8")
    target.reset(8)
    assert np.isfinite(target.forward(PROMPT[:4]).logits).all()
    target.close()


def test_the_bundled_model_runs_its_own_gguf_file(default_model_dir, lc_backend):
    """int4 on the default model is the very Q4_1 file its package ships (what llama.cpp users run);
    other formats are converted from the safetensors folder."""
    from specrun.models import DEFAULT_MODEL, gguf_file

    assert lc_backend.gguf_path(str(default_model_dir), "int4") == gguf_file(DEFAULT_MODEL)
    assert lc_backend.precisions("cpu")[0] == "int4"


def test_missing_llama_cpp_is_unavailable(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError("No module named 'llama_cpp'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    avail = LlamaCppBackend().availability()
    assert not avail.available and "llama_cpp cannot be imported" in avail.reason
    assert "pip install 'specrun[llama_cpp]'" in avail.install_hint
