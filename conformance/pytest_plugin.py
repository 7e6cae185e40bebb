"""pytest plugin: `pytest --specrun-backend NAME` runs the conformance suite against a backend
from any test suite (a third-party backend's own, for instance).  Each (check, model) becomes one
test item; not-applicable checks are skipped with the capability they need; expected failures
are xfails with their reason; an integrity item fails if fewer checks ran than planned or an
expected-failure entry matched nothing.  Installed as a ``pytest11`` entry point."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("specrun", "specrun backend conformance")
    g.addoption("--specrun-backend", default=None, help="run the specrun conformance suite against this backend")
    g.addoption("--specrun-device", default="cpu", help="device for --specrun-backend (default: cpu)")
    g.addoption("--specrun-precision", default=None, help="precision for --specrun-backend (default: the backend's)")
    g.addoption("--specrun-models", default="tiny-llama,tiny-mistral,tiny-qwen2,tiny-qwen3,default",
                help="comma-separated conformance models")
    g.addoption("--specrun-expected-failures", default=None, help="extra expected-failure list (TOML)")
    g.addoption("--specrun-tolerances", default=None, help="extra tolerance overrides (TOML)")
    g.addoption("--specrun-checks", default=None, help="comma-separated check ids to run (default: all)")
    g.addoption("--specrun-report", default=None, help="write JSON/Markdown/JUnit reports into this folder")


def _checks(config: pytest.Config) -> list[str] | None:
    value = config.getoption("specrun_checks")
    return [c for c in value.split(",") if c] if value else None


class _SuiteState:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.run = None

    def get(self):
        if self.run is None:
            from .suite import run_suite

            opt = self.config.getoption
            extra = opt("specrun_expected_failures")
            tol = opt("specrun_tolerances")
            self.run = run_suite(
                opt("specrun_backend"),
                device=opt("specrun_device"),
                precision=opt("specrun_precision"),
                models=[m for m in opt("specrun_models").split(",") if m],
                expected_failures=Path(extra) if extra else None,
                tolerances=Path(tol) if tol else None,
                only=_checks(self.config),
            )
        return self.run


class ConformanceItem(pytest.Item):
    def __init__(self, *, check_id: str, model: str, state: _SuiteState, **kw):
        super().__init__(**kw)
        self.check_id, self.model, self.state = check_id, model, state

    def runtest(self) -> None:
        run = self.state.get()
        found = [r for r in run.results if r.check == self.check_id and r.model == self.model]
        if not found:
            pytest.fail(f"{self.check_id} on {self.model} did not run")
        r = found[0]
        if r.status == "not_applicable":
            pytest.skip(r.message)
        if r.status == "xfail":
            pytest.xfail(r.message)
        if r.status != "passed":
            pytest.fail(r.message, pytrace=False)

    def reportinfo(self):
        return Path(__file__), None, self.name


class IntegrityItem(pytest.Item):
    def __init__(self, *, state: _SuiteState, **kw):
        super().__init__(**kw)
        self.state = state

    def runtest(self) -> None:
        run = self.state.get()
        if run.problems:
            pytest.fail("; ".join(run.problems), pytrace=False)

    def reportinfo(self):
        return Path(__file__), None, self.name


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    backend = config.getoption("specrun_backend")
    if not backend:
        return
    from .suite import plan

    state = _SuiteState(config)
    config._specrun_state = state  # type: ignore[attr-defined]
    models = [m for m in config.getoption("specrun_models").split(",") if m]
    only = _checks(config)
    for check, model in plan(models):
        if only and check.id not in only and check.name not in only:
            continue
        items.append(ConformanceItem.from_parent(
            session, name=f"specrun-conformance[{backend}]::{check.id}-{check.name}[{model}]",
            check_id=check.id, model=model, state=state))
    items.append(IntegrityItem.from_parent(session, name=f"specrun-conformance[{backend}]::run-integrity", state=state))


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    state = getattr(session.config, "_specrun_state", None)
    report = session.config.getoption("specrun_report")
    if state is not None and state.run is not None and report:
        from .reports import write_reports

        write_reports([state.run], Path(report))
