"""The onnx_cpu backend: export per architecture against transformers, the export cache (reuse,
corruption, concurrent exports), the Target contract (rollback, trees, hidden states), int8,
missing onnxruntime, and the real default model against torch_cuda."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from specrun.errors import SpecrunError
from specrun.store import file_fingerprint

from .conftest import ARCHS, make_tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from specrun_kit import export as ex  # noqa: E402
from specrun_onnx_cpu.backend import OnnxBackend  # noqa: E402

PROMPT = [5, 17, 300, 42, 9, 1200, 77, 8, 8, 613, 2000, 31, 5, 17, 300, 42, 9, 1200, 77, 8]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch, default_model_dir):
    """A private specrun cache for each test (the default model folder is resolved before)."""
    monkeypatch.setenv("SPECRUN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def backend():
    return OnnxBackend()


def hf_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def run_pieces(target, ids, cuts=(7, 8)) -> np.ndarray:
    """Prefill, one single-token step, then a block: the three ways a target is driven."""
    target.reset(64)
    a, b = cuts
    return np.concatenate([target.forward(ids[:a]).logits, target.forward(ids[a:b]).logits, target.forward(ids[b:]).logits])


# ------------------------------------------------------------------ architectures vs transformers


@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_transformers(arch, tiny_models, backend, cache):
    target = backend.load_target(str(tiny_models[arch]), device="cpu")
    assert (target.backend, target.device, target.precision) == ("onnx_cpu", "cpu", "f32")
    got = run_pieces(target, PROMPT)
    ref = hf_logits(tiny_models[arch], PROMPT)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-3


def test_sliding_window_matches_transformers(tmp_path, backend, cache):
    """Mistral with a window shorter than the prompt: the window changes the logits, and we follow."""
    model = make_tiny_model(tmp_path / "mistral-w6", "mistral", sliding_window=6)
    ref = hf_logits(model, PROMPT)
    got = run_pieces(backend.load_target(str(model), device="cpu"), PROMPT, cuts=(9, 12))
    assert np.abs(got - ref).max() < 1e-3


def test_last_only_logits(tiny_models, backend, cache):
    target = backend.load_target(str(tiny_models["llama"]), device="cpu")
    target.reset(32)
    full = target.forward(PROMPT).logits
    target.reset(32)
    last = target.forward(PROMPT, all_logits=False).logits
    assert last.shape == (1, full.shape[1])
    assert np.abs(last[0] - full[-1]).max() < 1e-5


# ------------------------------------------------------------------ the Target contract


def test_rollback_then_continue_equals_fresh_run(tiny_models, backend, cache):
    target = backend.load_target(str(tiny_models["qwen2"]), device="cpu")
    target.reset(64)
    target.forward(PROMPT[:8])
    target.forward([999, 998, 997, 996])  # a rejected draft
    target.rollback(8)
    assert target.length == 8
    cont = np.concatenate([target.forward(PROMPT[8:10]).logits, target.forward(PROMPT[10:]).logits])
    target.reset(64)
    fresh = target.forward(PROMPT).logits[8:]
    assert np.abs(cont - fresh).max() < 1e-4
    with pytest.raises(ValueError):
        target.rollback(target.length + 1)


def test_cache_grows_past_reserved_capacity(tiny_models, backend, cache):
    target = backend.load_target(str(tiny_models["llama"]), device="cpu")
    target.reset(4)
    steps = np.concatenate([target.forward(PROMPT[:3]).logits] + [target.forward([t]).logits for t in PROMPT[3:]])
    target.reset(64)
    assert np.abs(steps - target.forward(PROMPT).logits).max() < 1e-4


def test_context_limit_is_a_clear_error(tmp_path, backend, cache):
    model = make_tiny_model(tmp_path / "short", "llama", max_position_embeddings=16)
    target = backend.load_target(str(model), device="cpu")
    target.reset(16)
    with pytest.raises(SpecrunError, match="context limit of 16"):
        target.forward(PROMPT)


def test_token_tree_equals_paths(tiny_models, backend, cache):
    target = backend.load_target(str(tiny_models["qwen3"]), device="cpu")
    prefix = PROMPT[:6]
    tokens, parents = [40, 41, 42, 43, 44], [-1, 0, 0, 1, 2]  # root, two children, a grandchild each
    target.reset(32)
    target.forward(prefix)
    tree = target.forward_tree(tokens, parents).logits
    target.keep([0, 2, 4])
    assert target.length == len(prefix) + 3
    after = target.forward([7]).logits
    for path in ([0, 1, 3], [0, 2, 4]):
        target.reset(32)
        chain = target.forward(prefix + [tokens[i] for i in path]).logits[len(prefix):]
        assert np.abs(chain - tree[path]).max() < 1e-4
    assert np.abs(target.forward([7]).logits - after).max() < 1e-4  # keep() left the [0, 2, 4] path


def test_hidden_states_match_torch(tiny_models, backend, torch_backend, cache):
    aux = (0, 2)
    onnx_t = backend.load_target(str(tiny_models["llama"]), device="cpu", aux_hidden_layers=aux)
    torch_t = torch_backend.load_target(str(tiny_models["llama"]), device="cpu", aux_hidden_layers=aux)
    for t in (onnx_t, torch_t):
        t.reset(32)
    for piece, all_logits in ((PROMPT[:9], False), (PROMPT[9:10], True), (PROMPT[10:], True)):
        a, b = onnx_t.forward(piece, all_logits=all_logits), torch_t.forward(piece, all_logits=all_logits)
        assert a.hidden_states.shape == b.hidden_states.shape == (len(piece), 2 * 64)
        scale = np.abs(b.hidden_states).max()
        assert np.abs(a.hidden_states - b.hidden_states).max() < 1e-4 * max(1.0, scale)
        assert np.abs(a.logits - b.logits).max() < 1e-3
    plain = backend.load_target(str(tiny_models["llama"]), device="cpu")
    plain.reset(8)
    assert plain.forward(PROMPT[:3]).hidden_states is None


# ------------------------------------------------------------------ the export cache


def test_second_load_reuses_the_export(tiny_models, backend, cache):
    before = ex.export_count
    backend.load_target(str(tiny_models["llama"]), device="cpu")
    path = ex.find_export(tiny_models["llama"])
    assert path is not None and path.is_relative_to(cache / "onnx")
    stamp = {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()}
    backend.load_target(str(tiny_models["llama"]), device="cpu")
    assert ex.export_count == before + 1
    assert {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()} == stamp
    meta = json.loads((path.parent / ex.META_FILE).read_text())
    assert meta["num_layers"] == 3 and meta["aux_layers"] == []
    # another aux set or precision is another export; changed weights are a new key
    assert ex.export_dir(tiny_models["llama"], (1,)) != path.parent
    assert ex.export_dir(tiny_models["llama"], (), "int8") != path.parent


def test_loading_an_export_marks_it_used(tiny_models, backend, cache):
    """`specrun cache clear --older-than` goes by last use: a load refreshes the entry's age."""
    import time

    backend.load_target(str(tiny_models["llama"]), device="cpu")
    folder = ex.find_export(tiny_models["llama"]).parent
    old = time.time() - 40 * 86400
    os.utime(folder, (old, old))
    before = ex.export_count
    backend.load_target(str(tiny_models["llama"]), device="cpu")
    assert ex.export_count == before  # reused, not rebuilt
    assert time.time() - folder.stat().st_mtime < 3600


def test_changed_weights_change_the_key(tmp_path, cache):
    model = make_tiny_model(tmp_path / "m", "llama")
    key = ex.export_key(model)
    make_tiny_model(tmp_path / "m", "llama", seed=1)
    assert ex.export_key(model) != key


def test_copied_model_shares_the_export_key(tiny_models, tmp_path, cache):
    """Keys come from the bytes, not from paths or mtimes: a copy (new mtimes, new folder) reuses
    the export; a one-byte change deep inside a large weights file is a new key."""
    import shutil

    src = tiny_models["llama"]
    copy = tmp_path / src.name
    shutil.copytree(src, copy, copy_function=shutil.copy)  # shutil.copy does not keep mtimes
    assert ex.export_key(copy) == ex.export_key(src)
    big = tmp_path / "big"
    big.mkdir()
    shutil.copy(src / "config.json", big)
    weights = big / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 12_000)  # 3 MB: a fingerprint would only sample it
    key = ex.export_key(big)
    data = bytearray(weights.read_bytes())
    data[1_500_123] ^= 1
    weights.write_bytes(bytes(data))
    assert ex.export_key(big) != key


@pytest.mark.parametrize("victim", [ex.DATA_FILE, ex.GRAPH_FILE])
def test_truncated_export_is_detected_and_rebuilt(victim, tiny_models, backend, cache):
    model = tiny_models["mistral"]
    ref = run_pieces(backend.load_target(str(model), device="cpu"), PROMPT)
    path = ex.find_export(model)
    f = path.parent / victim
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    assert ex.find_export(model) is None
    before = ex.export_count
    got = run_pieces(backend.load_target(str(model), device="cpu"), PROMPT)
    assert ex.export_count == before + 1
    assert ex.find_export(model) == path
    assert np.abs(got - ref).max() < 1e-6


def test_unloadable_export_with_valid_marker_is_rebuilt(tiny_models, backend, cache):
    """A file damaged in a way the marker cannot see: onnxruntime refuses it, the export is rebuilt."""
    model = tiny_models["llama"]
    backend.load_target(str(model), device="cpu")
    folder = ex.find_export(model).parent
    graph = folder / ex.GRAPH_FILE
    graph.write_bytes(b"\x08garbage" * (graph.stat().st_size // 8) + b"\x00" * (graph.stat().st_size % 8))
    marker = json.loads((folder / ex.MARKER_FILE).read_text())
    marker["files"][ex.GRAPH_FILE] = file_fingerprint(graph)
    (folder / ex.MARKER_FILE).write_text(json.dumps(marker))
    assert ex.is_complete(folder)
    before = ex.export_count
    target = backend.load_target(str(model), device="cpu")
    assert ex.export_count == before + 1
    np.testing.assert_allclose(run_pieces(target, PROMPT), hf_logits(model, PROMPT), atol=1e-3)


def test_concurrent_exports_leave_one_valid_cache(tiny_models, cache):
    code = textwrap.dedent(f"""
        from specrun_kit import export as ex
        print(ex.export_model({str(tiny_models["qwen2"])!r}))
    """)
    env = {**os.environ, "SPECRUN_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    folder = Path(paths.pop()).parent
    assert ex.is_complete(folder)
    leftovers = [p.name for p in folder.parent.iterdir() if p.is_dir() and p != folder]
    assert leftovers == []


def test_cli_export(tiny_models, cache):
    from click.testing import CliRunner

    from specrun.cli import main

    model = str(tiny_models["qwen3"])
    r = CliRunner().invoke(main, ["export", "--backend", "onnx_cpu", "--target", model, "--aux-layers", "1"])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file() and path == ex.find_export(model, (1,))
    r = CliRunner().invoke(main, ["export", "--target", model, "--aux-layers", "7"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = CliRunner().invoke(main, ["export", "--backend", "torch_cuda", "--target", model])
    assert r.exit_code == 2 and "nothing to export" in r.output


# ------------------------------------------------------------------ options, precisions, errors


def test_backend_description(backend):
    from specrun.plugins import load_registry

    reg = load_registry(["onnx_cpu"])
    assert isinstance(reg.get("onnx_cpu"), OnnxBackend)
    assert backend.devices() == ["cpu"]
    assert backend.precisions("cpu") == ["f32", "int8"]
    assert {"hidden_states", "tree_attention", "weights:int8"} <= backend.capabilities()


def test_bad_requests_are_one_line_errors(tiny_models, backend, cache):
    model = str(tiny_models["llama"])
    for kwargs, match in (
        ({"device": "cuda"}, "device 'cuda'"),
        ({"device": "cpu", "precision": "bf16"}, "cannot run precision 'bf16'"),
        ({"device": "cpu", "aux_hidden_layers": (5,)}, "out of range"),
        ({"device": "cpu", "options": {"threads": -1}}, "threads"),
    ):
        with pytest.raises(SpecrunError, match=match) as info:
            backend.load_target(model, **kwargs)
        assert "\n" not in str(info.value)


def test_int8_weights(tiny_models, backend, cache):
    model = tiny_models["llama"]
    target = backend.load_target(str(model), device="cpu", precision="int8", options={"threads": 1})
    assert target.precision == "int8"
    got = run_pieces(target, PROMPT)
    ref = hf_logits(model, PROMPT)
    assert np.isfinite(got).all()
    # 8-bit weights, int8 compute: close, not equal (a random model is a hard case)
    assert np.abs(got - ref).mean() < 0.15 * np.abs(ref).mean()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99
    f32 = ex.find_export(model)
    int8 = ex.find_export(model, (), "int8")
    assert f32 is not None and int8 is not None and int8.parent != f32.parent
    import onnx

    graph = onnx.load(str(int8), load_external_data=False).graph
    consts = {t.name for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in consts]  # all projections, lm_head too
    assert (int8.parent / ex.DATA_FILE).stat().st_size < 0.75 * (f32.parent / ex.DATA_FILE).stat().st_size


def test_missing_onnxruntime_makes_backend_unavailable(monkeypatch, tiny_models):
    from specrun.plugins import load_registry

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    reg = load_registry(["onnx_cpu", "torch_cuda"])
    avail = reg.entries["onnx_cpu"].availability()
    assert not avail.available
    assert "onnxruntime" in avail.reason and avail.install_hint == "pip install 'specrun[onnx]'"
    with pytest.raises(SpecrunError, match="not available"):
        reg.get("onnx_cpu")
    with pytest.raises(SpecrunError, match="onnxruntime"):
        OnnxBackend().load_target(str(tiny_models["llama"]), device="cpu")
    assert reg.get("torch_cuda").availability().available


def test_cached_path_imports_neither_torch_nor_onnx(tiny_models, cache):
    OnnxBackend().load_target(str(tiny_models["llama"]), device="cpu")  # export (torch) in this process
    code = textwrap.dedent(f"""
        import sys
        from specrun_onnx_cpu.backend import OnnxBackend
        t = OnnxBackend().load_target({str(tiny_models["llama"])!r}, device="cpu")
        t.reset(8)
        t.forward([1, 2, 3])
        print(sorted(m for m in ("torch", "onnx", "specrun_torch_cuda") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SPECRUN_CACHE_DIR": str(cache)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the real default model


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    """One temporary cache for the default model's exports in this module."""
    return tmp_path_factory.mktemp("onnx-default-cache")


@pytest.fixture(scope="module")
def default_targets(default_cache, default_model_dir, torch_backend):
    """The default model exported once for this module, and torch_cuda on CPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECRUN_CACHE_DIR", str(default_cache))
        onnx_t = OnnxBackend().load_target(str(default_model_dir), device="cpu", options={"threads": 2})
    torch_t = torch_backend.load_target(str(default_model_dir), device="cpu")
    yield onnx_t, torch_t
    onnx_t.close()


@pytest.mark.slow
def test_default_model_matches_torch(default_targets):
    onnx_t, torch_t = default_targets
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, 40).tolist()
    for t in default_targets:
        t.reset(64)
    for piece, all_logits in ((ids[:30], True), (ids[30:31], True), (ids[31:36], True), (ids[36:], False)):
        a, b = onnx_t.forward(piece, all_logits=all_logits).logits, torch_t.forward(piece, all_logits=all_logits).logits
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-3
    for t in default_targets:
        t.rollback(31)
    a, b = onnx_t.forward(ids[31:34]).logits, torch_t.forward(ids[31:34]).logits
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [
    "Rewrite this sentence with one word changed: the quick brown fox jumps over the lazy dog.",
    "List three colours.",
])
def test_default_model_speculative_equals_plain_greedy(prompt, default_targets, default_model_dir):
    from specrun.decode import SpeculativeDecoder
    from specrun.drafters import NgramDrafter, NoDrafter
    from specrun.pipeline import load_tokenizer

    target = default_targets[0]
    tok = load_tokenizer(default_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    runs = {}
    for name, drafter in (("plain", NoDrafter()), ("ngram", NgramDrafter())):
        dec = SpeculativeDecoder(target, drafter, 4)
        runs[name] = [t for chunk in dec.generate(ids, 48, None, eos_token_ids=(2,)) for t in chunk]
        runs[name + "_calls"] = dec.stats.target_calls
    assert runs["ngram"] == runs["plain"]
    assert len(runs["plain"]) > 0
    assert runs["ngram_calls"] <= runs["plain_calls"]


@pytest.mark.slow
def test_default_model_int8_agrees_with_f32(default_targets, default_model_dir, default_cache):
    """Block-wise int8 keeps the argmax of the real model over a chat prompt (per-tensor dynamic
    quantization did not: about half the positions changed)."""
    from specrun.pipeline import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Explain what a CPU cache is."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECRUN_CACHE_DIR", str(default_cache))  # int8 is built from the f32 export there
        int8 = OnnxBackend().load_target(str(default_model_dir), device="cpu", precision="int8", options={"threads": 2})
    f32 = default_targets[0]
    for t in (int8, f32):
        t.reset(len(ids))
    a, b = int8.forward(ids).logits, f32.forward(ids).logits
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.9
    int8.close()


def test_int8_says_its_blocks_are_inexact_and_generate_warns(tiny_models, backend, cache):
    """ONNX Runtime's int8 kernels round a row by its block: the target says so (exact_blocks False),
    the pipeline warns where it speculates on it and the JSON stats carry it; f32 promises nothing."""
    from click.testing import CliRunner

    from specrun.cli import main

    assert backend.load_target(str(tiny_models["llama"]), device="cpu", precision="int8").exact_blocks is False
    assert backend.load_target(str(tiny_models["llama"]), device="cpu", precision="f32").exact_blocks is None
    args = ["generate", "--backend", "onnx_cpu", "--target", str(tiny_models["llama"]), "-n", "4", "--raw", "--json"]
    r = CliRunner().invoke(main, [*args, "--precision", "int8", "--drafter", "ngram", "hello world"])
    assert r.exit_code == 0, r.output
    assert "warning: onnx_cpu at int8 computes a block of tokens with other rounding" in r.stderr
    assert json.loads(r.stdout)["stats"]["exact_blocks"] is False
    r = CliRunner().invoke(main, [*args, "--precision", "int8", "--drafter", "none", "hello world"])
    assert r.exit_code == 0 and "warning" not in r.stderr  # plain decoding: nothing to warn about
    r = CliRunner().invoke(main, [*args, "--precision", "f32", "--drafter", "ngram", "hello world"])
    assert r.exit_code == 0 and "warning" not in r.stderr
