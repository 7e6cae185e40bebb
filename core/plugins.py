"""Loading backends from entry points.  Each entry point is loaded on its own: a plugin that fails
to import is recorded (with its error) and never breaks the other backends or the CLI."""

from __future__ import annotations

import importlib.metadata as md
import os
import traceback

import attrs
import pluggy

from . import hookspecs
from .errors import SpecrunError
from .interfaces import Availability, Backend

ENTRY_POINT_GROUP = "specrun.backends"
PLUGINS_ENV = "SPECRUN_PLUGINS"  # comma-separated entry-point names to load; unset = all


@attrs.define
class BackendEntry:
    name: str
    package: str
    version: str
    backend: Backend | None = None
    error: str = ""  # why the plugin could not be loaded
    entry_point: str = ""

    def availability(self) -> Availability:
        if self.backend is None:
            return Availability(False, f"plugin failed to load: {self.error}", f"pip install --force-reinstall {self.package}")
        try:
            return self.backend.availability()
        except Exception as exc:  # a plugin bug must not break listing
            return Availability(False, f"availability check raised {type(exc).__name__}: {exc}")


@attrs.define
class Registry:
    entries: dict[str, BackendEntry] = attrs.field(factory=dict)
    conflicts: list[str] = attrs.field(factory=list)
    clashing: dict[str, str] = attrs.field(factory=dict)  # backend name -> why it cannot be used
    unknown_plugins: list[str] = attrs.field(factory=list)  # names in $SPECRUN_PLUGINS no entry point has

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str, *, require_available: bool = True) -> Backend:
        if name in self.clashing:  # only the colliding name is unusable, every other backend works
            raise SpecrunError(self.clashing[name])
        entry = self.entries.get(name)
        if entry is None and self.unknown_plugins:
            raise SpecrunError(f"unknown backend '{name}': ${PLUGINS_ENV} names {', '.join(self.unknown_plugins)}, which no "
                               f"installed plugin provides, and restricts loading to it; fix or unset ${PLUGINS_ENV}")
        if entry is None:
            raise SpecrunError(
                f"unknown backend '{name}'; known backends: {', '.join(self.names()) or 'none'} (see `specrun backends`)"
            )
        if entry.backend is None:
            raise SpecrunError(f"backend '{name}' failed to load: {entry.error}")
        if require_available:
            avail = entry.availability()
            if not avail.available:
                hint = f"; {avail.install_hint}" if avail.install_hint else ""
                raise SpecrunError(f"backend '{name}' is not available: {avail.reason}{hint}")
        return entry.backend


AUTO = "auto"


def choose_backend(registry: Registry, device: str, needs: frozenset[str] | set[str] = frozenset()) -> tuple[str, str]:
    """``--backend auto``: the available backend that declares itself fastest on ``device``
    (``Backend.preference``) and its precision.  The rule: highest preference, then name, among
    the backends with the capabilities ``needs`` (an EAGLE-3 head needs ``hidden_states``, a tree
    ``tree_attention``)."""
    best: tuple[int, str, str] | None = None
    kind = device.split(":")[0].split(".")[0].lower()
    for name in registry.names():
        entry = registry.entries[name]
        if entry.backend is None or not entry.availability().available:
            continue
        try:
            if device not in entry.backend.devices() and kind not in {d.split(":")[0].lower() for d in entry.backend.devices()}:
                continue
            if not set(needs) <= entry.backend.capabilities():
                continue
            pref = entry.backend.preference(device)
        except Exception:  # a plugin bug never breaks the choice among the others
            continue
        if pref is not None and (best is None or (pref[0], name) > (best[0], best[1])):
            best = (int(pref[0]), name, pref[1])
    if best is None:
        known: list[str] = []
        for name in registry.names():  # a device some backend knows but that is not here: its own error
            be = registry.entries[name].backend
            if be is None or not registry.entries[name].availability().available:
                continue
            try:
                kinds = {d.split(":")[0].lower() for d in be.known_devices()}
            except Exception:
                continue
            known += be.known_devices()
            if device in be.known_devices() or kind in kinds:
                be.check_device(device)
        if known and device not in known:
            raise SpecrunError(f"unknown device '{device}'; known: {', '.join(sorted(set(known)))} (see `specrun backends`)")
        if needs:
            raise SpecrunError(f"no installed backend for device '{device}' has {', '.join(sorted(needs))}, which this "
                               f"drafter needs; pass --backend NAME (see `specrun backends`) or another --drafter")
        raise SpecrunError(f"no installed backend declares itself a default for device '{device}'; pass --backend NAME "
                           f"(see `specrun backends`)")
    return best[1], best[2]


def _distribution_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def load_registry(only: list[str] | None = None) -> Registry:
    """Load every backend entry point (or only those named in ``only`` / $SPECRUN_PLUGINS)."""
    if only is None and os.environ.get(PLUGINS_ENV):
        only = [n.strip() for n in os.environ[PLUGINS_ENV].split(",") if n.strip()]
    pm = pluggy.PluginManager("specrun")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    seen_eps: set[tuple[str, str]] = set()
    eps = list(md.entry_points(group=ENTRY_POINT_GROUP))
    if only is not None:
        registry.unknown_plugins = [n for n in only if n not in {ep.name for ep in eps}]
    for ep in eps:
        if only is not None and ep.name not in only:
            continue
        package, version = _distribution_of(ep)
        if (ep.name, ep.value) in seen_eps:  # the same distribution visible twice on sys.path
            continue
        seen_eps.add((ep.name, ep.value))
        try:
            module = ep.load()
            pm.register(module, name=f"{package}:{ep.name}")
        except Exception as exc:
            detail = _one_line(exc)
            if os.environ.get("SPECRUN_DEBUG"):
                detail += "\n" + traceback.format_exc()
            _add(registry, BackendEntry(ep.name, package, version, None, detail))
            continue
        collected: list[Backend] = []
        try:
            hook = pm.subset_hook_caller("register_backends", remove_plugins=[p for p in pm.get_plugins() if p is not module])
            hook(register=collected.append)
        except Exception as exc:
            _add(registry, BackendEntry(ep.name, package, version, None, f"register_backends raised {_one_line(exc)}"))
            continue
        for backend in collected:
            _add(registry, BackendEntry(backend.name, package, version, backend, entry_point=ep.name))
    return registry


def _add(registry: Registry, entry: BackendEntry) -> None:
    existing = registry.entries.get(entry.name)
    if existing is not None:
        msg = (f"two backends are named '{entry.name}': one from package '{existing.package}' (entry point "
               f"'{existing.entry_point or existing.name}'), one from package '{entry.package}' (entry point "
               f"'{entry.entry_point or entry.name}'); uninstall one of them or restrict plugins with ${PLUGINS_ENV}")
        registry.conflicts.append(msg)
        registry.clashing[entry.name] = msg
        return
    registry.entries[entry.name] = entry


def load_tool(ep: md.EntryPoint, cli) -> str:
    """Import one ``specrun.commands`` entry point and let it add its commands to ``cli``.  Returns
    "" or, when the plugin fails to import or its hook raises, the one-line reason."""
    pm = pluggy.PluginManager("specrun")
    pm.add_hookspecs(hookspecs)
    try:
        module = ep.load()
        pm.register(module, name=f"tool:{ep.name}")
        pm.hook.register_commands(cli=cli)
    except Exception as exc:
        detail = _one_line(exc)
        if os.environ.get("SPECRUN_DEBUG"):
            detail += "\n" + traceback.format_exc()
        return detail
    return ""
