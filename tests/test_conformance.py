"""The conformance kit: it passes the reference, and it catches deliberately broken backends."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import attrs
import pytest

from specrun.plugins import Registry, load_registry
from specrun_conformance import suite
from specrun_conformance.reports import write_reports
from specrun_torch_cuda.backend import TorchBackend
from specrun_torch_cuda.target import TorchTarget

from .conftest import register_backend_for_tests

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


class ClaimsExactBlocks(TorchTarget):
    """torch on the CPU: blocks differ from single steps in float rounding (~1e-5), yet it claims bit-identity."""

    exact_blocks = True


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
    register_backend_for_tests(reg, broken_backend("claims_exact", ClaimsExactBlocks))
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


def test_a_false_exact_blocks_claim_fails_c03(registry):
    """A target that promises bit-identical blocks is held to it; the same target without the claim
    passes C03 within the f32 tolerance."""
    run = suite.run_suite("claims_exact", models=MODELS, registry=registry, only=["C03"])
    r = next(r for r in run.results if r.check == "C03")
    assert r.status == "failed" and "claims exact_blocks, but a block of 5 tokens differs" in r.message
    assert statuses(suite.run_suite("torch_cuda", models=MODELS, registry=registry, only=["C03"]))["C03"] == "passed"


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


# --------------------------------------------------------------------------- bad input never passes


def invoke_cli(*args):
    from click.testing import CliRunner

    from specrun.cli import main

    return CliRunner().invoke(main, ["conformance", *map(str, args)])


def assert_one_line(r, fragment):
    assert r.exit_code == 2, (r.output, r.exception)
    assert "Traceback" not in r.output
    err = r.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("specrun: error:") and fragment in err, err


def test_unknown_check_is_an_error_listing_the_known_ones(registry, tmp_path):
    r = invoke_cli("--backend", "torch_cuda", "--check", "C99", "--report", tmp_path / "rep")
    assert_one_line(r, "unknown conformance check 'C99'")
    assert "C01 prefill-parity" in r.stderr and "C12 eagle3-head" in r.stderr
    assert not (tmp_path / "rep").exists()
    with pytest.raises(suite.SpecrunError, match="unknown conformance check 'rolback'"):
        suite.run_suite("torch_cuda", models=MODELS, registry=registry, only=["C04", "rolback"])


def test_a_run_in_which_no_check_ran_never_passes(registry):
    run = suite.run_suite("torch_cuda", models=[], registry=registry)
    assert not run.ok and any("no check ran" in p for p in run.problems)
    run = suite.run_suite("no_hidden", models=MODELS, registry=registry, only=["C05"])  # all n/a
    assert not run.ok and any("every check was not applicable" in p for p in run.problems)


def test_unknown_capability_names_are_errors_not_na(registry, monkeypatch):
    typo = broken_backend("typo", TorchTarget, caps={"hidden_state", "weights:f32"})
    reg = load_registry(["torch_cuda"])
    register_backend_for_tests(reg, typo)
    run = suite.run_suite("typo", models=MODELS, registry=reg, only=["C05", "C01"])
    assert not run.ok
    assert any("capability 'hidden_state'" in p and "did you mean 'hidden_states'" in p for p in run.problems)
    bad = attrs.evolve(suite.CHECKS[4], needs=frozenset({"hidden_state"}))
    monkeypatch.setattr(suite, "CHECKS", (*suite.CHECKS[:4], bad, *suite.CHECKS[5:]))
    with pytest.raises(suite.SpecrunError, match="C05 hidden-states-parity needs unknown capability 'hidden_state'"):
        suite.run_suite("torch_cuda", models=MODELS, registry=registry)


def test_report_pointing_at_a_file_is_refused_before_the_run(tmp_path):
    f = tmp_path / "report.txt"
    f.write_text("mine")
    r = invoke_cli("--backend", "torch_cuda", "--models", "tiny-llama", "--report", f)
    assert_one_line(r, f"--report {f} is a file")
    assert f.read_text() == "mine"
    r = invoke_cli("--backend", "torch_cuda", "--models", "tiny-llama", "--report", f / "sub")
    assert_one_line(r, "is a file, so the folder cannot be made")


@pytest.mark.parametrize("option,text,fragment", [
    ("--tolerances", "[overrides.x\nself_atol = 1", "is not valid TOML"),
    ("--tolerances", "overrides = 3\n", "overrides must be tables"),
    ("--tolerances", '[overrides.torch_cuda.f32]\nself_atol = "big"\nreason = "r"\n', "must be a number >= 0"),
    ("--expected-failures", "[[xfail]\n", "is not valid TOML"),
    ("--expected-failures", 'xfail = "C04"\n', "'xfail' must be an array of tables"),
    ("--expected-failures", '[[xfail]]\nbackend = 3\ncheck = "C01"\nreason = "r"\n', "backend must be a string"),
])
def test_bad_data_files_are_one_line(tmp_path, option, text, fragment):
    f = tmp_path / "data.toml"
    f.write_bytes(text.encode())
    r = invoke_cli("--backend", "torch_cuda", "--models", "tiny-llama", option, f, "--report", tmp_path / "rep")
    assert_one_line(r, fragment)
    assert_one_line(invoke_cli("--backend", "torch_cuda", option, tmp_path / "none.toml"), "does not exist")


def test_threads_below_one_is_one_line(tmp_path):
    assert_one_line(invoke_cli("--backend", "torch_cuda", "--threads", "-4", "--report", tmp_path), "--threads must be >= 1")


def test_reports_are_readable_by_others(registry, tmp_path):
    import os
    import stat

    run = suite.run_suite("torch_cuda", models=[], registry=registry)
    old = os.umask(0o022)
    try:
        paths = write_reports([run], tmp_path / "rep")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths.values()} == {0o644}
