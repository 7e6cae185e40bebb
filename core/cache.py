"""``specrun cache``: what the on-disk cache holds (converted models, backend exports, compiled
heads, conformance models) and removing entries of it, with confirmation.

The cache is everything specrun builds itself and can build again; nothing a user made lives
there.  Entries are the folders (and files: ``digests`` holds one per hashed file)
``<cache>/<kind>/<entry>``; hidden ones (``.<entry>.*``) are builds in progress or left behind by a killed process: those younger than an hour, or whose
``.<entry>.lock`` is held, are never removed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import attrs
import click

from .errors import SpecrunError
from .store import cache_dir


@attrs.frozen
class Entry:
    kind: str
    path: Path
    size: int
    used: float  # last use (the entry's mtime: builds set it, loads refresh it), seconds since the epoch
    partial: bool  # a build left behind by a killed process

    @property
    def age_days(self) -> float:
        return (time.time() - self.used) / 86400


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def entries(root: Path | None = None) -> list[Entry]:
    """Every entry of the cache, least recently used first."""
    root = cache_dir() if root is None else root
    found = []
    if not root.is_dir():
        return found
    for kind in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for entry in kind.iterdir():
            if entry.name.endswith(".lock") or entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
                continue
            partial = entry.name.startswith(".")
            found.append(Entry(kind.name, entry, _size(entry), entry.stat().st_mtime, partial))
    return sorted(found, key=lambda e: e.used)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _busy(entry: Entry) -> bool:
    """Whether a build may still be writing this (partial) entry."""
    import fcntl

    if not entry.partial:
        return False
    if entry.age_days < 1 / 24:
        return True
    name = entry.path.name[1:]
    base = name.split(".tmp-")[0] if ".tmp-" in name else name.rsplit(".", 1)[0]
    lock = entry.path.parent / f".{base}.lock"
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


@click.group("cache", invoke_without_command=True)
@click.option("--list", "-l", "each", is_flag=True, help="One line per entry (largest first), not per kind.")
@click.pass_context
def cache_command(ctx: click.Context, each: bool) -> None:
    """Show what specrun's cache holds (`specrun cache clear` to remove entries)."""
    if ctx.invoked_subcommand is not None:
        return
    root = cache_dir()
    found = entries(root)
    click.echo(f"cache: {root}  ($SPECRUN_CACHE_DIR moves it)")
    if not found:
        click.echo("empty")
        return
    if each:
        for e in sorted(found, key=lambda e: -e.size):
            state = "  (partial build)" if e.partial else ""
            click.echo(f"{_human(e.size):>9}  used {e.age_days:5.1f} days ago  {e.kind}/{e.path.name}{state}")
        click.echo(f"{_human(sum(e.size for e in found)):>9}  total, {len(found)} entries")
        return
    kinds: dict[str, list[Entry]] = {}
    for e in found:
        kinds.setdefault(e.kind, []).append(e)
    for kind, es in kinds.items():
        partial = sum(e.partial for e in es)
        extra = f", {partial} left partial by killed builds" if partial else ""
        click.echo(f"{kind:16} {len(es):4} entries  {_human(sum(e.size for e in es)):>9}  "
                   f"least recently used {max(e.age_days for e in es):.0f} days ago{extra}")
    click.echo(f"{'total':16} {len(found):4} entries  {_human(sum(e.size for e in found)):>9}")


@cache_command.command("clear")
@click.option("--kind", "kinds", multiple=True, help="Only these kinds (models, onnx, openvino, ...); repeatable.")
@click.option("--older-than", type=float, default=None, metavar="DAYS", help="Only entries not used for more than DAYS.")
@click.option("--partial", "only_partial", is_flag=True, help="Only builds left behind by killed processes.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def clear_command(kinds, older_than, only_partial, yes) -> None:
    """Remove cache entries (all by default); specrun rebuilds what it needs again."""
    root = cache_dir()
    found = entries(root)
    known = sorted({e.kind for e in found})
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise SpecrunError(f"no cache kind '{unknown[0]}' in {root}; it holds: {', '.join(known) or 'nothing'}")
    chosen = [e for e in found if (not kinds or e.kind in kinds)
              and (older_than is None or e.age_days > older_than)
              and (not only_partial or e.partial)]
    busy = [e for e in chosen if _busy(e)]
    chosen = [e for e in chosen if e not in busy]
    if busy:
        click.echo(f"skipping {len(busy)} entries being built now", err=True)
    if not chosen:
        click.echo("nothing to remove")
        return
    total = _human(sum(e.size for e in chosen))
    if not yes and not click.confirm(f"remove {len(chosen)} cache entries ({total}) from {root}?", default=False):
        click.echo("nothing removed")
        return
    removed, freed = 0, 0
    for e in chosen:
        try:
            used = e.path.stat().st_mtime
        except OSError:
            continue
        if older_than is not None and used > e.used:  # used while the question was open: no longer unused
            continue
        removed, freed = removed + 1, freed + e.size
        if e.path.is_dir():
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            e.path.unlink(missing_ok=True)
    skipped = f"; {len(chosen) - removed} kept: used meanwhile" if removed < len(chosen) else ""
    click.echo(f"removed {removed} entries ({_human(freed)}){skipped}")
