"""The conformance kit: it passes the reference, and it catches deliberately broken backends."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import attrs
import pytest

from specrun.plugins import Registry, load_registry, register_backend_for_tests
from specrun_conformance import suite
from specrun_conformance.reports import write_reports
from specrun_torch_cuda.backend import TorchBackend
from specrun_torch_cuda.target import TorchTarget

MODELS = ("tiny-llama",)


class OffByOneRollback(TorchTarget):
    def rollback(self, length):
        super().rollback(min(length + 1, self.length))


class BiasedLogits(TorchTarget):
    def forward(self, tokens, *, all_logits=True):
        out = super().forward(tokens, all_logits=all_logits)
        logits = out.logits.copy()
        logits[:, 7] += 0.01
        return attrs.evolve(out, logits=logits)


def broken_backend(name: str, target_cls: type, caps: set[str] | None = None):
    class Broken(TorchBackend):
        def load_target(self, model_dir, **kw):
            t = super().load_target(model_dir, **kw)
            t.__class__ = target_cls
            return t

        def capabilities(self):
            return caps if caps is not None else super().capabilities()

    b = Broken()
    b.name = name
    return b


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = load_registry(["torch_cuda"])
    register_backend_for_tests(reg, broken_backend("off_by_one", OffByOneRollback))
    register_backend_for_tests(reg, broken_backend("biased", BiasedLogits))
    register_backend_for_tests(reg, broken_backend("no_hidden", TorchTarget, caps=set()))
    return reg


def statuses(run):
    return {r.check: r.status for r in run.results}


def test_reference_passes_every_check(registry, tmp_path):
    run = suite.run_suite("torch_cuda", models=MODELS, registry=registry)
    assert run.ok, [r.message for r in run.results if r.status != "passed"] + run.problems
    assert statuses(run) == {c: "passed" for c in suite.STABLE_IDS}
    paths = write_reports([run], tmp_path)
    data = json.loads(paths["json"].read_text())
    r0 = data["runs"][0]
    assert r0["backend"] == "torch_cuda" and r0["precision"] == "f32" and r0["collected_checks"] == 12
    assert "torch" in r0["runtime_versions"]
    assert {"max_abs", "max_rel", "tolerance", "worst_position", "status"} <= set(r0["results"][0])
    md = paths["markdown"].read_text()
    assert "| C01 prefill-parity | pass" in md and "**PASS**" in md
    tree = ET.parse(paths["junit"])
    assert int(tree.getroot().find("testsuite").get("tests")) == 12


def test_rollback_off_by_one_fails(registry):
    run = suite.run_suite("off_by_one", models=MODELS, registry=registry, only=["C03", "C04", "C07"])
    st = statuses(run)
    assert not run.ok
    assert st["C04"] == "failed" and st["C07"] == "failed"
    msg = next(r.message for r in run.results if r.check == "C04")
    assert "off_by_one cpu f32" in msg and "tiny-llama" in msg


def test_biased_logits_fail_parity_with_a_standalone_message(registry):
    run = suite.run_suite("biased", models=MODELS, registry=registry, only=["C01", "C02"])
    r = next(r for r in run.results if r.check == "C01")
    assert r.status == "failed"
    assert r.worst_position[1] == 7 and r.max_abs == pytest.approx(0.01, rel=1e-2)
    for fragment in ("C01 prefill-parity", "[biased cpu f32]", "model=tiny-llama", "tolerance 0.001", "shape (24, 49152)"):
        assert fragment in r.message


def test_residual_ignoring_sampler_fails_c09(registry, monkeypatch):
    from specrun.verify import SpeculativeSamplingVerifier

    def wrong(self, logits, draft):
        s, out = self.sampler, []
        for i, tok in enumerate(draft.tokens):
            p = s.probs(logits[i])
            if s.uniform() * draft.probs[i][tok] < p[tok]:
                out.append(tok)
                continue
            out.append(s.sample(p))  # should be the residual norm(max(p - q, 0))
            return out
        out.append(s.sample(s.probs(logits[len(draft.tokens)])))
        return out

    monkeypatch.setattr(SpeculativeSamplingVerifier, "verify", wrong)
    run = suite.run_suite("torch_cuda", models=MODELS, registry=registry, only=["C09"])
    r = run.results[0]
    assert r.status == "failed" and "chi-square" in r.message


def test_missing_capability_is_not_applicable_never_passed(registry):
    run = suite.run_suite("no_hidden", models=MODELS, registry=registry, only=["C05"])
    r = run.results[0]
    assert r.status == "not_applicable" and r.message == "not applicable: needs hidden_states"


def test_expected_failures_are_data_and_cannot_rot(registry, tmp_path):
    listed = tmp_path / "xfail.toml"
    listed.write_text(
        '[[xfail]]\nbackend = "off_by_one"\ncheck = "C04"\nreason = "known bug #1"\n'
        '[[xfail]]\nbackend = "off_by_one"\ncheck = "C01"\nreason = "wrongly listed: C01 passes"\n'
        '[[xfail]]\nbackend = "off_by_one"\ncheck = "C03"\nmodel = "no-such-model"\nreason = "matches nothing"\n'
    )
    run = suite.run_suite("off_by_one", models=MODELS, registry=registry, only=["C01", "C03", "C04"], expected_failures=listed)
    st = statuses(run)
    assert st["C04"] == "xfail" and "known bug #1" in next(r.message for r in run.results if r.check == "C04")
    assert st["C01"] == "xpass"
    assert any("matches no check" in p for p in run.problems)
    assert not run.ok
    bad = tmp_path / "noreason.toml"
    bad.write_text('[[xfail]]\nbackend = "x"\ncheck = "C01"\nreason = ""\n')
    with pytest.raises(suite.SpecrunError, match="has no reason"):
        suite.load_expected_failures(bad)


def test_suite_refuses_success_when_a_check_disappears(registry, monkeypatch):
    monkeypatch.setattr(suite, "CHECKS", tuple(c for c in suite.CHECKS if c.id != "C05"))
    # keep it cheap: the guard is about planning, so only the first remaining check actually runs
    monkeypatch.setattr(suite, "plan", lambda models: [(c, m) for c in suite.CHECKS[:1] for m in models])
    run = suite.run_suite("torch_cuda", models=MODELS, registry=registry)
    assert any("lacks checks C05" in p for p in run.problems) and not run.ok


def test_tolerance_overrides_need_reasons(tmp_path):
    f = tmp_path / "tol.toml"
    f.write_text("[overrides.mine.bf16]\nself_atol = 9.0\nreason = \"kernels differ\"\n")
    t = suite.load_tolerances("mine", "bf16", f)
    assert t.self_atol == 9.0 and "kernels differ" in t.source
    f.write_text("[overrides.mine.bf16]\nself_atol = 9.0\n")
    with pytest.raises(suite.SpecrunError, match="no reason"):
        suite.load_tolerances("mine", "bf16", f)


def test_pytest_plugin_runs_the_suite(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--specrun-backend", "torch_cuda",
         "--specrun-models", "tiny-qwen3", "--specrun-checks", "C01,C04,C05", "--specrun-report", str(tmp_path / "rep")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 passed" in r.stdout  # 3 checks + the integrity item
    assert (tmp_path / "rep" / "conformance.xml").exists()


def test_cli_unknown_backend_is_one_line():
    from click.testing import CliRunner

    from specrun.cli import main

    r = CliRunner().invoke(main, ["conformance", "--backend", "nope", "--report", "/tmp/x"])
    assert r.exit_code == 2 and "unknown backend 'nope'" in r.stderr and "Traceback" not in r.output
