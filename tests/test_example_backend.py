"""The example out-of-tree backend (examples/numpy_backend, package specrun-numpy-backend): it is
found through its own entry point like any third-party plugin, its logits match the reference
(torch_cuda on CPU, fp32), and it refuses what it cannot do with a SpecrunError."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specrun.errors import SpecrunError
from specrun.plugins import load_registry

from .conftest import ARCHS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("specrun_numpy_backend") is None,
    reason="the example backend is not installed: pip install -e examples/numpy_backend",
)

PROMPT = [5, 17, 300, 42, 9, 1200, 77, 8, 8, 613, 2000, 31, 4, 19, 250, 1000]
ATOL = 1e-4


@pytest.fixture(scope="module")
def numpy_backend():
    return load_registry(["numpy_ref"]).get("numpy_ref")


def test_installed_through_its_entry_point():
    entry = load_registry().entries.get("numpy_ref")
    assert entry is not None, "numpy_ref is not registered through the specrun.backends entry points"
    assert entry.package == "specrun-numpy-backend"
    assert entry.error == "" and entry.availability().available
    assert type(entry.backend).__module__.startswith("specrun_numpy_backend.")
    be = entry.backend
    assert be.devices() == ["cpu"] and be.precisions("cpu") == ["f32"] and be.capabilities() == {"hidden_states"}
    assert "numpy" in be.versions()


def test_never_imports_torch(tiny_models):
    code = (
        "import sys\nfrom specrun.plugins import load_registry\n"
        "be = load_registry(['numpy_ref']).get('numpy_ref')\n"
        f"t = be.load_target({str(tiny_models['llama'])!r}, device='cpu')\n"
        "t.reset(8); t.forward([1, 2, 3])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def compare_run(target, tokens: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefill, then a rejected draft rolled back, then single steps: logits of every stage."""
    target.reset(len(tokens) + 8)
    head = target.forward(tokens[:-4])
    target.forward([7, 7, 7])
    target.rollback(len(tokens) - 4)
    steps = np.stack([target.forward([t]).logits[0] for t in tokens[-4:]])
    return head.logits, head.hidden_states, steps


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_torch_reference(arch, tiny_models, numpy_backend, torch_backend):
    layers = (0, 2)
    got = compare_run(numpy_backend.load_target(str(tiny_models[arch]), device="cpu", aux_hidden_layers=layers), PROMPT)
    ref = compare_run(torch_backend.load_target(str(tiny_models[arch]), device="cpu", precision="f32",
                                                aux_hidden_layers=layers), PROMPT)
    for what, g, r in zip(("prefill logits", "hidden states", "step logits after rollback"), got, ref, strict=True):
        assert g.shape == r.shape, what
        scale = 1.0 if what != "hidden states" else max(1.0, float(np.abs(r).max()))
        assert np.abs(g - r).max() / scale < ATOL, f"{arch} {what}: {np.abs(g - r).max():.3g}"


def test_sliding_window_matches_torch(tmp_path, numpy_backend, torch_backend):
    """The conformance models never reach Mistral's window (64); a window of 8 does here."""
    from .conftest import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", "mistral", vocab_size=512, sliding_window=8)
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 512, 30)]
    got = compare_run(numpy_backend.load_target(str(folder), device="cpu"), tokens)
    ref = compare_run(torch_backend.load_target(str(folder), device="cpu", precision="f32"), tokens)
    assert np.abs(got[0] - ref[0]).max() < ATOL and np.abs(got[2] - ref[2]).max() < ATOL


def test_all_logits_false_keeps_every_hidden_state(tiny_models, numpy_backend):
    t = numpy_backend.load_target(str(tiny_models["qwen3"]), device="cpu", aux_hidden_layers=(1,))
    t.reset(32)
    out = t.forward(PROMPT, all_logits=False)
    assert out.logits.shape == (1, t.info.vocab_size) and out.hidden_states.shape == (len(PROMPT), t.info.hidden_size)
    assert t.length == len(PROMPT)


def one_line_error(fn) -> str:
    with pytest.raises(SpecrunError) as info:
        fn()
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_errors_are_one_line_specrun_errors(tmp_path, tiny_models, numpy_backend):
    model = str(tiny_models["llama"])
    assert "cuda:0" in one_line_error(lambda: numpy_backend.load_target(model, device="cuda:0"))
    assert "bf16" in one_line_error(lambda: numpy_backend.load_target(model, device="cpu", precision="bf16"))
    t = numpy_backend.load_target(model, device="cpu")
    t.reset(8)
    assert "context limit" in one_line_error(lambda: t.forward([3] * (t.info.context_length + 1)))
    assert t.length == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((Path(model) / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot read weights" in one_line_error(lambda: numpy_backend.load_target(str(broken), device="cpu"))


@pytest.mark.slow
def test_the_head_runs_beside_a_backend_without_head_support():
    """A backend that cannot run EAGLE-3 heads: the default drafter (on a CPU: prompt lookup) works,
    and the shipped head runs on a backend that can (--draft-backend), the summary line saying
    where; the output is the backend's plain greedy output either way."""
    import json

    from click.testing import CliRunner

    from specrun.cli import main

    base = ["generate", "Hi", "--backend", "numpy_ref", "-n", "6"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 0, r.output
    assert "numpy_ref/cpu/f32 drafter=ngram " in r.stderr
    head = CliRunner().invoke(main, [*base, "--drafter", "eagle3+ngram", "--draft-backend", "torch_cuda"])
    assert head.exit_code == 0, head.output
    assert "drafter=eagle3+ngram (torch_cuda/cpu/" in head.stderr
    plain = CliRunner().invoke(main, [*base, "--drafter", "none", "--json"])
    for args in ([], ["--drafter", "eagle3+ngram", "--draft-backend", "torch_cuda"]):
        spec = CliRunner().invoke(main, [*base, *args, "--json"])
        assert json.loads(spec.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
