"""The model store: specrun's on-disk cache and the one way an artefact gets into it.

Every cached artefact (the converted default model, ONNX exports, EAGLE-3 head exports, OpenVINO
IRs, conformance models) is a folder built by :func:`build_once`: under a file lock, in a temporary
folder beside it, published by rename with a marker (``specrun-complete.json``) that records the
SHA-256 of every file.  :func:`is_complete` verifies the whole content against the marker before an
entry is used: the digests are remembered per file version (device, inode, size, mtime, ctime), so
an unchanged entry costs a few ``stat`` calls, and a file written in any way since it was built
(even in place, same size, mtime restored: its ctime moves) is hashed again, found different, and
the entry is rebuilt — never used damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER_FILE = "specrun-complete.json"
_SETTLE_NS = 2_000_000_000  # coarser than any filesystem's timestamp tick


def cache_dir() -> Path:
    """Root of specrun's on-disk cache ($SPECRUN_CACHE_DIR or the user cache folder)."""
    env = os.environ.get("SPECRUN_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("specrun"))


def mark_used(folder: Path) -> None:
    """Record that a cache entry was just used (its folder's mtime): `specrun cache` ages entries,
    and `specrun cache clear --older-than` removes them, by last use, not by build time."""
    try:
        os.utime(folder)
    except OSError:  # a read-only cache works, it only stops aging
        pass


def content_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, remembered per (device, inode, path, size, mtime, ctime) under
    the cache's ``digests`` folder, so each version of a file is hashed once (about 1 s per GB).
    Cache keys use it instead of paths and mtimes: every virtual environment holding the same
    package, or a copy of a model, reuses the same conversion and exports, and rewritten weights are
    a new key (ctime changes on any write, even one that restores the mtime).  A file still being
    written (changed while hashed, or written within the last 2 s) is hashed but not remembered."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{st.st_dev}:{st.st_ino}:{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    memo = cache_dir() / "digests" / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    try:
        known = memo.read_text()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    after = path.stat()
    settled = (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (st.st_mtime_ns, st.st_ctime_ns, st.st_size) \
        and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLE_NS
    if settled:
        try:  # best effort: a read-only cache only costs the hash next time
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, memo)
        except OSError:
            pass
    return digest


def file_fingerprint(path: Path) -> dict:
    """What a marker records of a file: its size and the SHA-256 of all its bytes."""
    return {"size": Path(path).stat().st_size, "sha256": content_digest(path)}


def is_complete(folder: Path, main_file: str, version: str | None = None) -> bool:
    """True iff ``folder`` holds a finished build with ``main_file`` whose every file still has the
    size and full SHA-256 its marker recorded (and, given ``version``, the marker's version); a
    complete entry is marked as used."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        files = marker["files"]
        if main_file not in files or (version is not None and marker.get("version") != version):
            return False
        for name, fp in files.items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != fp["size"] or content_digest(p) != fp["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    mark_used(folder)
    return True


def invalidate(folder: Path) -> None:
    """Remove a (damaged) entry: renamed aside first, so no reader sees it half-deleted."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (a second builder waits, then finds the entry built)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: temp folder + rename still keep the cache consistent
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(folder: Path, main_file: str, build: Callable[[Path], object], *, version: str = "1",
               force: bool = False, info: dict | None = None) -> Path:
    """``folder / main_file``, built by ``build(tmp_folder)`` unless a complete, verified build is
    there (``force`` rebuilds anyway).  Under a lock, in a temporary folder published by rename
    with a marker of full digests; a damaged or partial entry is replaced.  ``info`` goes into the
    marker (what the entry was built from)."""
    folder = Path(folder)
    if not force and is_complete(folder, main_file, version):
        return folder / main_file
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.parent / f".{folder.name}.lock"):
        if not force and is_complete(folder, main_file, version):  # built by another process meanwhile
            return folder / main_file
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            build(tmp)
            files = {p.name: file_fingerprint(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MARKER_FILE}
            if main_file not in files:
                raise RuntimeError(f"building {folder.name} produced no {main_file}")
            marker = {"version": version, "files": files, **({"built_from": info} if info else {})}
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1))
            if folder.exists():  # damaged, partial or forced: replace it
                invalidate(folder)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not is_complete(folder, main_file, version):  # someone else's complete build is as good
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / main_file
