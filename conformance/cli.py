"""`specrun conformance`: run the suite against one backend (or all) and write the reports."""

from __future__ import annotations

from pathlib import Path

import click

from specrun.cli import threads_option
from specrun.errors import SpecrunError


@click.command("conformance")
@click.option("--backend", "-b", required=True,
              help="Backend name, 'all' for every available backend, or a comma-separated list of NAME[:PRECISION[:DEVICE]] "
                   "(PRECISION may be 'default' or 'all').")
@click.option("--device", "-d", default="cpu", show_default=True)
@click.option("--precision", default=None, help="Precision to check; 'all' = every precision of the device [default: the backend's].")
@click.option("--target", "-m", default=None, help="Model for the 'default' entry [default: smollm2-135m-instruct].")
@click.option("--models", default=",".join(("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "default")),
              show_default=True, help="Comma-separated: tiny-<arch> and/or default.")
@click.option("--check", "checks", multiple=True, help="Run only these check ids/names (the count guard then expects fewer).")
@click.option("--expected-failures", type=click.Path(path_type=Path), default=None, help="Extra expected-failure list (TOML).")
@click.option("--tolerances", type=click.Path(path_type=Path), default=None, help="Extra tolerance overrides (TOML).")
@click.option("--report", type=click.Path(path_type=Path), default=Path("reports/conformance"), show_default=True)
@threads_option("CPU threads for the backend under test.")
def conformance_command(backend, device, precision, target, models, checks, expected_failures, tolerances, report, threads):
    """Check a backend for numerical parity and losslessness against the reference (torch_cuda, CPU, fp32)."""
    from specrun.plugins import load_registry

    from .reports import check_report_dir, markdown, write_reports
    from .suite import check_selection, load_expected_failures, load_tolerances, run_suite

    # everything that can be wrong with the arguments, before the first (long) run
    check_selection(checks)
    check_report_dir(report)
    load_expected_failures(expected_failures)
    if tolerances is not None:
        load_tolerances("", "f32", tolerances)
    registry = load_registry()
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    plan: list[tuple[str, str | None, str]] = []  # (backend, precision, device)
    if backend == "all":
        for n in registry.names():
            avail = registry.entries[n].availability()
            if not avail.available:
                click.echo(f"conformance: skipping unavailable backend {n}: {avail.reason}", err=True)
                continue
            be = registry.get(n)
            plan.append((n, precision, device if device in be.devices() else be.devices()[0]))
    else:
        for spec in backend.split(","):
            name, _, rest = spec.strip().partition(":")
            prec, _, dev = rest.partition(":")
            registry.get(name)  # one clear line if unknown / unavailable
            plan.append((name, prec or precision, dev or device))
    runs = []
    for name, prec_opt, dev in plan:
        be = registry.get(name)
        dev = be.check_device(dev)
        if prec_opt == "all":
            precisions = be.precisions(dev)
        elif prec_opt == "default":  # the backend's own default on this machine (bf16 or f32 ...)
            precisions = [be.precisions(dev)[0]]
        else:
            precisions = [prec_opt]
        for prec in precisions:
            label = f"{name} {dev} {prec or be.precisions(dev)[0]}"
            click.echo(f"conformance: {label} ...", err=True)
            run = run_suite(name, device=dev, precision=prec, models=model_list, target=target, registry=registry,
                            expected_failures=expected_failures, tolerances=tolerances, only=list(checks) or None,
                            progress=lambda msg, label=label: click.echo(f"  {label}: {msg}", err=True),
                            options={"threads": threads} if threads else None)
            runs.append(run)
            s = run.summary()
            click.echo(f"conformance: {label}: {'PASS' if run.ok else 'FAIL'} "
                       + ", ".join(f"{v} {k}" for k, v in s.items() if v), err=True)
            for r in run.results:
                if r.status in ("failed", "error", "xpass"):
                    click.echo(f"  {r.status.upper()}: {r.message}", err=True)
            for p in run.problems:
                click.echo(f"  RUN PROBLEM: {p}", err=True)
    if not runs:
        raise SpecrunError("no available backend to check")
    paths = write_reports(runs, report)
    click.echo(markdown(runs).split("\n## ")[0])
    click.echo(f"reports: {', '.join(str(p) for p in paths.values())}", err=True)
    if not all(r.ok for r in runs):
        raise SystemExit(1)
