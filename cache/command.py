"""``specrun cache``: what the on-disk cache holds (converted models, backend exports, compiled
heads, conformance models) and removing entries of it, with confirmation.

The cache is everything specrun builds itself and can build again.  Entries are
``<cache>/<kind>/<entry>``, and only what specrun made and marked is one: a folder holding its
marker ``specrun-complete.json`` (a JSON object; ``complete`` = ``ok`` for conformance models of
older versions), a digest memo in ``digests`` (a file named by 32 hex digits holding 64), or a build
in progress / left behind by a killed process, named as specrun names them (``.<entry>.tmp-*``,
``.trash-*``, ``.<entry>.XXXXXXXX`` of older versions, ``digests/.<memo>.<pid>``): those younger
than an hour, or whose ``.<entry>.lock`` is held, are never removed.  Anything else under the cache
folder ($SPECRUN_CACHE_DIR may point at a folder of the user's own files) is left alone and
reported, never removed."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import attrs
import click

from specrun.errors import SpecrunError
from specrun.store import MARKER_FILE, cache_dir


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
    try:
        if path.is_file():
            return path.stat().st_size
        total = 0
        for f in path.rglob("*"):
            try:
                if f.is_file() and not f.is_symlink():
                    total += f.stat().st_size
            except OSError:
                pass
        return total
    except OSError:  # unreadable: counted as nothing
        return 0


MARKER = MARKER_FILE
_MEMO = re.compile(r"[0-9a-f]{32}")
_MEMO_TMP = re.compile(r"\.[0-9a-f]+\.\d+")  # store.content_digest's temporary memo
_BUILD_TMP = re.compile(r"\..+\.tmp-[A-Za-z0-9_]+|\.trash-.+")  # store.build_once / store.invalidate
_OLD_BUILD_TMP = re.compile(r"\..+\.[a-z0-9_]{8}")  # mkdtemp folders of older versions (models, conformance)
_LOCK = re.compile(r"\..+\.lock")


def _is_marker(path: Path) -> bool:
    try:
        return path.is_file() and isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def kind_of(kind: Path, entry: Path) -> str | None:
    """'complete' or 'partial' for an entry specrun made, 'lock' for a build lock, None for
    anything else (left alone)."""
    name = entry.name
    if entry.is_symlink():
        return None
    if entry.is_file() and _LOCK.fullmatch(name):
        return "lock"
    if kind.name == "digests" and entry.is_file():
        if _MEMO.fullmatch(name):
            try:
                text = entry.read_text() if entry.stat().st_size == 64 else ""
            except OSError:
                text = ""
            return "complete" if re.fullmatch(r"[0-9a-f]{64}", text) else None
        return "partial" if _MEMO_TMP.fullmatch(name) else None
    if not entry.is_dir():
        return None
    if name.startswith("."):
        if _BUILD_TMP.fullmatch(name) or (kind.name in ("models", "conformance") and _OLD_BUILD_TMP.fullmatch(name)):
            return "partial"
        return None
    if _is_marker(entry / MARKER):
        return "complete"
    if kind.name == "conformance":
        try:
            if (entry / "complete").read_text() == "ok":
                return "complete"
        except OSError:
            pass
    return None


def scan(root: Path | None = None) -> tuple[list[Entry], list[Path]]:
    """(every entry of the cache, least recently used first; everything else under the cache
    folder, which is not specrun's and is left alone)."""
    root = cache_dir() if root is None else root
    found: list[Entry] = []
    foreign: list[Path] = []
    if not root.is_dir():
        return found, foreign
    try:
        top = sorted(root.iterdir())
    except OSError:
        return found, foreign
    for kind in top:
        if kind.is_symlink() or not kind.is_dir():
            foreign.append(kind)
            continue
        try:
            items = sorted(kind.iterdir())
        except OSError:
            foreign.append(kind)
            continue
        for entry in items:
            what = kind_of(kind, entry)
            if what == "lock":
                continue
            if what is None:
                foreign.append(entry)
                continue
            try:
                used = entry.stat().st_mtime
            except OSError:
                continue
            found.append(Entry(kind.name, entry, _size(entry), used, what == "partial"))
    return sorted(found, key=lambda e: e.used), foreign


def entries(root: Path | None = None) -> list[Entry]:
    """Every entry of the cache (what specrun made and marked), least recently used first."""
    return scan(root)[0]


def _left_alone(root: Path, foreign: list[Path]) -> str:
    some = ", ".join(str(p.relative_to(root)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    return f"left alone: {len(foreign)} items specrun did not make ({some})"


def _remove(path: Path) -> str | None:
    """Remove one entry: renamed aside first (no reader sees it half-deleted), then deleted.
    None once it is gone, else why it (or part of it) could not be removed."""
    errors: list[BaseException] = []
    target = path
    if path.is_dir():
        target = path.with_name(f".trash-{path.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return exc.strerror or str(exc)
        if sys.version_info >= (3, 12):
            shutil.rmtree(target, onexc=lambda _f, _p, exc: errors.append(exc))
        else:
            shutil.rmtree(target, onerror=lambda _f, _p, info: errors.append(info[1]))
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            errors.append(exc)
    if not target.exists():
        return None
    exc = errors[0] if errors else None
    why = (getattr(exc, "strerror", None) or str(exc)) if exc else "still there"
    return why if target == path else f"{why}; what is left of it is in {target.name}"


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
    found, foreign = scan(root)
    click.echo(f"cache: {root}  ($SPECRUN_CACHE_DIR moves it)")
    if foreign:
        click.echo(_left_alone(root, foreign), err=True)
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
    found, foreign = scan(root)
    if foreign:
        click.echo(_left_alone(root, foreign), err=True)
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
    removed, freed, kept = 0, 0, 0
    failed: list[tuple[Entry, str]] = []
    for e in chosen:
        try:
            used = e.path.stat().st_mtime
        except OSError:
            continue
        if older_than is not None and used > e.used:  # used while the question was open: no longer unused
            kept += 1
            continue
        why = _remove(e.path)
        if why is None:
            removed, freed = removed + 1, freed + e.size
        else:
            failed.append((e, why))
    skipped = f"; {kept} kept: used meanwhile" if kept else ""
    click.echo(f"removed {removed} entries ({_human(freed)}){skipped}")
    if failed:
        e, why = failed[0]
        raise SpecrunError(f"could not remove {len(failed)} of {len(chosen)} entries ({_human(sum(f.size for f, _ in failed))}; "
                           f"{e.kind}/{e.path.name}: {why}); check that {root} is writable by you and run again")
