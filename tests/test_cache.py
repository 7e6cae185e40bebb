"""`specrun cache`: listing the on-disk cache and removing entries, with confirmation; builds that
may still be running are never removed."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from .test_cli import assert_one_line_error, invoke

DAY = 86400


def entry(root: Path, kind: str, name: str, size: int, age_days: float) -> Path:
    folder = root / kind / name
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"x" * size)
    if not name.startswith("."):  # a finished build carries specrun's marker
        (folder / "specrun-complete.json").write_text("{}")
    t = time.time() - age_days * DAY
    os.utime(folder, (t, t))
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECRUN_CACHE_DIR", str(root))
    made = {
        "old_onnx": entry(root, "onnx", "m-f32-aaaa", 3000, 40),
        "new_onnx": entry(root, "onnx", "m-int8-bbbb", 2000, 1),
        "old_ov": entry(root, "openvino", "m-f32-ir3", 1000, 40),
        "model": entry(root, "models", "smollm2-1234", 5000, 40),
        "dead_build": entry(root, "onnx", ".m-f32-cccc.tmp-x1y2", 100, 2),
        "fresh_build": entry(root, "onnx", ".m-f32-dddd.tmp-z3w4", 100, 0),
    }
    (root / "onnx" / ".m-f32-aaaa.lock").touch()
    return root, made


def test_lists_kinds_sizes_and_partial_builds(cache):
    root, _ = cache
    r = invoke("cache")
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln for ln in r.output.splitlines()[1:]}
    assert str(root) in r.output.splitlines()[0]
    assert "4 entries" in lines["onnx"] and "2 left partial" in lines["onnx"]
    assert "1 entries" in lines["models"] and "least recently used 40 days ago" in lines["models"]
    assert "6 entries" in lines["total"] and "10.9 KB" in lines["total"]  # 11,200 bytes


def test_clear_asks_first_and_keeps_everything_on_no(cache):
    root, made = cache
    r = invoke_input("n\n", "cache", "clear")
    assert r.exit_code == 0 and "nothing removed" in r.output
    assert all(p.exists() for p in made.values())


def test_clear_older_than_and_kind(cache):
    _, made = cache
    r = invoke("cache", "clear", "--older-than", "30", "--kind", "onnx", "--yes")
    assert r.exit_code == 0, r.output
    assert "removed 1 entries" in r.output
    assert not made["old_onnx"].exists()
    assert all(made[k].exists() for k in ("new_onnx", "old_ov", "model", "dead_build", "fresh_build"))


def test_clear_all_spares_builds_that_may_be_running(cache):
    root, made = cache
    with open(root / "onnx" / ".m-f32-cccc.lock", "a") as lock:  # a live build of the dead-looking entry
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = invoke("cache", "clear", "--yes")
        assert r.exit_code == 0, r.output
        assert made["dead_build"].exists() and made["fresh_build"].exists()
        assert "skipping 2 entries being built now" in r.stderr
    assert not any(made[k].exists() for k in ("old_onnx", "new_onnx", "old_ov", "model"))
    r = invoke("cache", "clear", "--partial", "--yes")  # the lock is released: now it can go
    assert "removed 1 entries" in r.output and not made["dead_build"].exists() and made["fresh_build"].exists()


def test_unknown_kind_is_one_line(cache):
    assert_one_line_error(invoke("cache", "clear", "--kind", "onnxx", "--yes"), "no cache kind 'onnxx'")


def invoke_input(text, *args):
    from click.testing import CliRunner

    from specrun.cli import main

    return CliRunner().invoke(main, list(args), input=text)


def test_digest_memos_are_entries_and_cleared(cache):
    root, _ = cache
    memo = root / "digests" / ("a" * 32)
    memo.parent.mkdir()
    memo.write_text("0" * 64)
    (root / "digests" / ".aaaa.123").write_text("0" * 64)  # a memo being written: partial, fresh
    lines = {ln.split()[0]: ln for ln in invoke("cache").output.splitlines()[1:]}
    assert "2 entries" in lines["digests"]
    r = invoke("cache", "clear", "--kind", "digests", "--yes")
    assert r.exit_code == 0, r.output
    assert "removed 1 entries" in r.output and not memo.exists()


def test_entry_used_while_asking_is_kept(cache, monkeypatch):
    """`--older-than`: an entry loaded while the question was open is no longer unused."""
    import click

    _, made = cache

    def confirm_after_a_load(*_a, **_k):
        os.utime(made["old_onnx"])  # what a load does (mark_used)
        return True

    monkeypatch.setattr(click, "confirm", confirm_after_a_load)
    r = invoke("cache", "clear", "--older-than", "30", "--kind", "onnx")
    assert r.exit_code == 0, r.output
    assert made["old_onnx"].exists() and "1 kept: used meanwhile" in r.output


def test_list_shows_each_entry_largest_first(cache):
    r = invoke("cache", "--list")
    assert r.exit_code == 0, r.output
    rows = r.output.splitlines()[1:-1]
    assert len(rows) == 6
    assert rows[0].endswith("models/smollm2-1234") and "used  40.0 days ago" in rows[0]
    assert rows[1].endswith("onnx/m-f32-aaaa")
    assert any(row.endswith(".m-f32-cccc.tmp-x1y2  (partial build)") for row in rows)
    assert "total, 6 entries" in r.output.splitlines()[-1]


def test_store_verifies_the_whole_content_before_use(tmp_path, monkeypatch):
    """A same-size, in-place change anywhere in a cached file (even with its mtime restored) makes
    the entry incomplete, and build_once rebuilds it; --force rebuilds a good one."""
    import os
    import time

    from specrun import store

    monkeypatch.setenv("SPECRUN_CACHE_DIR", str(tmp_path / "cache"))
    builds = []

    def build(tmp):
        builds.append(1)
        (tmp / "w.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
        (tmp / "meta.json").write_text("{}")

    folder = tmp_path / "cache" / "entry"
    path = store.build_once(folder, "w.bin", build)
    assert store.is_complete(folder, "w.bin") and len(builds) == 1
    time.sleep(2.1)  # past the digest memo's settle time: the good digest is remembered
    assert store.is_complete(folder, "w.bin")
    st = path.stat()
    with open(path, "r+b") as f:  # 64 random bytes in the middle, same size
        f.seek(700_001)
        f.write(os.urandom(64))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored: ctime still moved
    assert not store.is_complete(folder, "w.bin")
    store.build_once(folder, "w.bin", build)
    assert len(builds) == 2 and store.is_complete(folder, "w.bin")
    store.build_once(folder, "w.bin", build)
    assert len(builds) == 2  # complete: reused
    store.build_once(folder, "w.bin", build, force=True)
    assert len(builds) == 3
    assert not store.is_complete(folder, "w.bin", version="2")  # another format version is not used


def test_clear_removes_only_what_specrun_made_and_marked(tmp_path, monkeypatch):
    """$SPECRUN_CACHE_DIR pointed at a folder of the user's own files: `cache clear -y` removes
    none of them (only marked entries, digest memos and specrun's own temporary builds go), and says
    what it left alone."""
    root = tmp_path / "documents"
    monkeypatch.setenv("SPECRUN_CACHE_DIR", str(root))
    mine = {
        "thesis": root / "thesis.pdf", "photo": root / "photos" / "cat.jpg", "deep": root / "onnx" / "notes" / "todo.txt",
        "hidden": root / "onnx" / ".config" / "x", "memo_like": root / "digests" / "shopping.txt",
        "not_a_digest": root / "digests" / ("b" * 32), "unmarked": root / "models" / "my-model" / "model.safetensors",
        "link_target": tmp_path / "elsewhere" / "keep.txt",
    }
    for p in mine.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("the user's")
    (root / "onnx" / "linked").symlink_to(mine["link_target"].parent, target_is_directory=True)
    old = time.time() - 2 * DAY
    os.utime(root / "onnx" / ".config", (old, old))
    made = entry(root, "onnx", "m-f32-aaaa", 100, 3)
    dead = entry(root, "onnx", ".m-f32-bbbb.tmp-k3j2", 100, 2)
    memo = root / "digests" / ("a" * 32)
    memo.write_text("0" * 64)
    r = invoke("cache", "clear", "--yes")
    assert r.exit_code == 0, r.output
    assert "removed 3 entries" in r.output and not made.exists() and not dead.exists() and not memo.exists()
    assert all(p.exists() and p.read_text() == "the user's" for p in mine.values())
    assert "left alone: 8 items specrun did not make" in r.stderr
    assert "left alone" in invoke("cache").stderr


def test_clear_on_a_read_only_cache_says_what_it_could_not_remove(cache, monkeypatch):
    """Nothing removed is never reported as removed (it used to say "removed 1 entries (516.5 MB)")."""
    import specrun_cache.command

    root, made = cache

    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(specrun_cache.command.os, "rename", refuse)
    r = invoke("cache", "clear", "--kind", "models", "--yes")
    assert_one_line_error(r, "could not remove 1 of 1 entries")
    assert "models/smollm2-1234: Permission denied" in r.stderr and "removed 0 entries (0 B)" in r.stdout
    assert made["model"].exists() and (made["model"] / "weights.bin").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_clear_on_a_read_only_folder(cache):
    root, made = cache
    kind = root / "openvino"
    kind.chmod(0o555)
    try:
        r = invoke("cache", "clear", "--kind", "openvino", "--yes")
        assert_one_line_error(r, "could not remove 1 of 1 entries")
        assert made["old_ov"].exists()
    finally:
        kind.chmod(0o755)
