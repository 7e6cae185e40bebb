"""Plugin loading: one broken plugin never breaks the CLI; name clashes are errors naming both packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from specrun.errors import SpecrunError

SPECRUN = [sys.executable, "-m", "specrun"]


def fake_dist(root: Path, dist: str, module: str, entry_name: str, code: str) -> None:
    """An installed-looking distribution: a dist-info folder with one specrun.backends entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[specrun.backends]\n{entry_name} = {module}\n")


@pytest.fixture
def plugin_path(tmp_path):
    fake_dist(tmp_path, "broken-backend", "broken_backend", "broken", "import not_a_module_that_exists\n")
    fake_dist(
        tmp_path, "clashing-backend", "clashing_backend", "clash",
        """
        import specrun
        from specrun_torch_cuda.backend import TorchBackend

        @specrun.hookimpl
        def register_backends(register):
            register(TorchBackend())  # also named torch_cuda
        """,
    )
    return tmp_path


def run_cli(args, plugin_path, **env):
    full_env = {**os.environ, "PYTHONPATH": str(plugin_path), **env}
    return subprocess.run([*SPECRUN, *args], capture_output=True, text=True, env=full_env, timeout=120)


def test_broken_plugin_is_listed_and_others_still_work(plugin_path):
    r = run_cli(["backends", "--json"], plugin_path, SPECRUN_PLUGINS="torch_cuda,broken")
    assert r.returncode == 0, r.stderr
    rows = {b["name"]: b for b in json.loads(r.stdout)["backends"]}
    assert rows["torch_cuda"]["available"] is True
    assert rows["broken"]["available"] is False
    assert "ModuleNotFoundError" in rows["broken"]["reason"] and "not_a_module_that_exists" in rows["broken"]["reason"]
    assert rows["broken"]["package"] == "broken-backend"
    text = run_cli(["backends"], plugin_path, SPECRUN_PLUGINS="torch_cuda,broken")
    assert text.returncode == 0 and "UNAVAILABLE" in text.stdout and "Traceback" not in text.stderr


def test_using_a_broken_plugin_is_one_line_error(plugin_path):
    r = run_cli(["generate", "hi", "--backend", "broken"], plugin_path, SPECRUN_PLUGINS="torch_cuda,broken")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "backend 'broken' failed to load" in r.stderr


def test_env_var_restricts_plugins(plugin_path):
    r = run_cli(["backends", "--json"], plugin_path, SPECRUN_PLUGINS="broken")
    assert [b["name"] for b in json.loads(r.stdout)["backends"]] == ["broken"]


def test_two_backends_with_one_name_is_an_error_naming_both(plugin_path):
    r = run_cli(["backends", "--json"], plugin_path, SPECRUN_PLUGINS="torch_cuda,clash")
    conflicts = json.loads(r.stdout)["conflicts"]
    assert len(conflicts) == 1 and "'specrun'" in conflicts[0] and "'clashing-backend'" in conflicts[0]
    g = run_cli(["generate", "hi", "--backend", "torch_cuda"], plugin_path, SPECRUN_PLUGINS="torch_cuda,clash")
    assert g.returncode == 2 and "two backends are named 'torch_cuda'" in g.stderr and "Traceback" not in g.stderr


def test_builtin_backends_come_from_entry_points():
    """The core never imports a plugin by name."""
    core = Path(__file__).parent.parent / "core"
    for f in core.glob("*.py"):
        text = f.read_text()
        for plugin in ("specrun_torch_cuda", "specrun_onnx_cpu", "specrun_openvino", "specrun_llama_cpp"):
            assert plugin not in text, f"{f.name} imports {plugin}"


def test_tool_commands_load_only_when_used():
    """`specrun generate` / `backends` never import the tool packages (bench, training, conformance,
    serve); help lists their commands."""
    import subprocess
    import sys

    code = ("import sys; from specrun.cli import main\n"
            "try:\n    main(['backends'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('specrun_bench', 'specrun_train', 'specrun_conformance', 'specrun_server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ,
                         "SPECRUN_PLUGINS": "torch_cuda"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    from click.testing import CliRunner

    from specrun.cli import main

    r = CliRunner().invoke(main, ["--help"])
    for name in ("bench", "train-draft", "conformance", "serve"):
        assert f"  {name} " in r.output, name


def test_a_broken_tool_plugin_breaks_only_its_command(monkeypatch):
    import importlib.metadata as md

    from click.testing import CliRunner

    from specrun.cli import SpecrunGroup, main

    real = SpecrunGroup._tool_entry_points
    broken = md.EntryPoint(name="explode", value="specrun_no_such_tool_pkg", group="specrun.commands")
    monkeypatch.setattr(SpecrunGroup, "_tool_entry_points", lambda self: {**real(self), "explode": broken})
    monkeypatch.setattr(main, "_loaded", set())
    monkeypatch.setattr(main, "tool_errors", {})
    r = CliRunner().invoke(main, ["explode", "--x"])
    assert r.exit_code == 2, r.output
    assert "the 'explode' command could not be loaded (ModuleNotFoundError" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["--help"])  # help still lists everything, the broken one marked
    assert r.exit_code == 0 and "explode" in r.output and "unavailable" in r.output
    r = CliRunner().invoke(main, ["backends"])
    assert r.exit_code == 0


def test_auto_backend_is_the_fastest_declared_for_the_device():
    """--backend auto: the available backend with the highest measured preference for the device;
    a backend whose preference raises or that is unavailable is passed over."""
    from specrun.interfaces import Availability, Backend
    from specrun.plugins import Registry, choose_backend

    from .conftest import register_backend_for_tests

    class Fake(Backend):
        def __init__(self, name, pref, available=True, boom=False):
            self.name, self.pref, self.available, self.boom = name, pref, available, boom

        def availability(self):
            return Availability(self.available, "" if self.available else "missing")

        def devices(self):
            return ["cpu"]

        def precisions(self, device):
            return ["f32", "int8"]

        def preference(self, device):
            if self.boom:
                raise RuntimeError("plugin bug")
            return self.pref

    reg = Registry()
    for b in (Fake("slow", (10, "f32")), Fake("fast", (50, "int8")), Fake("gone", (90, "f32"), available=False),
              Fake("buggy", (99, "f32"), boom=True), Fake("never", None)):
        register_backend_for_tests(reg, b)
    assert choose_backend(reg, "cpu") == ("fast", "int8")
    with pytest.raises(SpecrunError, match="unknown device 'cuda'; known: cpu"):
        choose_backend(reg, "cuda")
    # what the drafter needs of the target narrows the choice (an EAGLE-3 head: hidden states)
    heads = Fake("heads", (20, "int8"))
    heads.capabilities = lambda: {"hidden_states", "eagle3"}
    register_backend_for_tests(reg, heads)
    assert choose_backend(reg, "cpu") == ("fast", "int8")
    assert choose_backend(reg, "cpu", {"hidden_states"}) == ("heads", "int8")
    with pytest.raises(SpecrunError, match="no installed backend for device 'cpu' has tree_attention, which this drafter needs"):
        choose_backend(reg, "cpu", {"tree_attention"})


def test_auto_backend_of_the_installed_plugins():
    from specrun.plugins import choose_backend, load_registry

    registry = load_registry()
    name, precision = choose_backend(registry, "cpu")
    # the fastest exact paths measured here (README "Choosing a backend"): llama.cpp where it is built
    if registry.entries["llama_cpp"].availability().available:
        assert (name, precision) == ("llama_cpp", "int4")
    else:
        assert (name, precision) == ("openvino", "int8")


def test_auto_backend_device_errors_name_the_device():
    from click.testing import CliRunner

    from specrun.cli import main

    r = CliRunner().invoke(main, ["generate", "Hi", "--device", "cuda"])
    assert r.exit_code == 2 and "device 'cuda' is not present for backend 'torch_cuda'; present: cpu" in r.stderr
    r = CliRunner().invoke(main, ["generate", "Hi", "--device", "tpu"])
    assert r.exit_code == 2 and "unknown device 'tpu'; known:" in r.stderr


def test_a_name_clash_breaks_only_the_two_colliding_entries(plugin_path):
    code = ("from specrun.plugins import load_registry\nr = load_registry()\nprint(r.get('onnx_cpu').name)\n"
            "try:\n    r.get('torch_cuda')\nexcept Exception as e:\n    print('ERR', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(plugin_path), "SPECRUN_PLUGINS": "torch_cuda,onnx_cpu,clash"})
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "onnx_cpu", out.stderr
    assert lines[1].startswith("ERR two backends are named 'torch_cuda'") and "entry point 'clash'" in lines[1]
    assert "entry point 'torch_cuda'" in lines[1]


def test_specrun_plugins_naming_nothing_installed_is_one_line(plugin_path):
    r = run_cli(["backends"], plugin_path, SPECRUN_PLUGINS="nope")
    assert r.returncode == 2 and "$SPECRUN_PLUGINS names nope, which no installed plugin provides" in r.stderr
    g = run_cli(["generate", "hi", "--backend", "torch_cuda"], plugin_path, SPECRUN_PLUGINS="nope")
    assert g.returncode == 2 and "SPECRUN_PLUGINS names nope" in g.stderr and "Traceback" not in g.stderr
