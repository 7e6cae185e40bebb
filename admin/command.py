"""``specrun backends`` and ``specrun export``: what is installed and building its cached model
formats ahead of time (a tool beside the core, registered like any third-party command)."""

from __future__ import annotations

import json
import os

import click

from specrun.errors import SpecrunError


@click.command("backends")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backends(as_json):
    """List registered backends: package, version, devices, precisions, availability."""
    import importlib.metadata as md

    from specrun.plugins import load_registry

    reg = load_registry()
    if reg.unknown_plugins:
        installed = sorted(ep.name for ep in md.entry_points(group="specrun.backends"))
        raise SpecrunError(f"$SPECRUN_PLUGINS names {', '.join(reg.unknown_plugins)}, which no installed plugin provides; "
                           f"fix or unset SPECRUN_PLUGINS (installed: {', '.join(installed)})")
    rows = []
    for name in reg.names():
        e = reg.entries[name]
        avail = e.availability()
        devices: list[str] = []
        precisions: dict[str, list[str]] = {}
        if avail.available and e.backend is not None:
            try:
                devices = e.backend.devices()
                precisions = {d: e.backend.precisions(d) for d in devices}
            except Exception as exc:  # a plugin bug must not break the listing
                avail = type(avail)(False, f"listing devices raised {type(exc).__name__}: {exc}")
        rows.append({"name": name, "package": e.package, "version": e.version, "available": avail.available,
                     "reason": avail.reason, "install_hint": avail.install_hint, "devices": devices, "precisions": precisions})
    if as_json:
        click.echo(json.dumps({"backends": rows, "conflicts": reg.conflicts}, indent=2))
    else:
        for r in rows:
            if r["available"]:
                prec = "; ".join(f"{d}: {', '.join(p)}" for d, p in r["precisions"].items())
                click.echo(f"{r['name']:<12} {r['package']} {r['version']}  available  devices: {', '.join(r['devices'])}  precisions: {prec}")
            else:
                hint = f" (install: {r['install_hint']})" if r["install_hint"] else ""
                click.echo(f"{r['name']:<12} {r['package']} {r['version']}  UNAVAILABLE: {r['reason']}{hint}")
        for c in reg.conflicts:
            click.echo(f"conflict: {c}")
    if os.environ.get("SPECRUN_PLUGINS"):
        click.echo(f"(plugins restricted by SPECRUN_PLUGINS={os.environ['SPECRUN_PLUGINS']})", err=True)


@click.command("export")
@click.option("--backend", "-b", default="auto", show_default=True,
              help="Backend whose model format to build (auto: the one generate picks on the CPU).")
@click.option("--target", "-m", default=None, help="Model id or local transformers folder [default: smollm2-135m-instruct].")
@click.option("--precision", default=None, help="Precision to export (e.g. f32, int8); default: the backend's.")
@click.option("--aux-layers", default="", help="Comma-separated decoder layers whose inputs the graph also returns (EAGLE-3).")
@click.option("--force", is_flag=True, help="Rebuild even if a cached export exists.")
def export_command(backend, target, precision, aux_layers, force):
    """Export a model to a backend's format ahead of time (cached; later loads reuse it)."""
    from specrun.models import resolve_model
    from specrun.plugins import AUTO, choose_backend, load_registry

    registry = load_registry()
    try:
        aux = tuple(int(a) for a in aux_layers.split(",") if a.strip())
    except ValueError:
        raise SpecrunError(f"--aux-layers takes comma-separated layer numbers, got '{aux_layers}'") from None
    if backend == AUTO:  # hidden-state outputs need a backend that returns them
        backend, auto_precision = choose_backend(registry, "cpu", {"hidden_states"} if aux else set())
        precision = precision or auto_precision
    be = registry.get(backend)
    path = be.export(str(resolve_model(target)), precision=precision, aux_hidden_layers=aux, force=force, progress=True)
    click.echo(str(path))

