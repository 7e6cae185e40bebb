"""Load-time probes a backend runs once per machine: does a block of tokens get the same logits
bits as single steps?  Shared by backends whose runtime may pick kernels by row count."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from specrun.store import cache_dir


def blocks_match_steps(target, context: int = 2) -> bool:
    """Whether a token's logits are the same bits as a single step and inside blocks of 2..9 tokens,
    after ``context`` tokens (any ``Target``; the cache is reset before and after).  Runtimes may
    switch kernels with the context's length (llama.cpp's single-token attention splits a cache of
    512+ rows across threads), so a backend probes the lengths its kernels care about."""
    n = context + 18
    ids = [(i * 7919) % max(3, target.info.vocab_size - 1) + 1 for i in range(n)]
    target.reset(n + 8)
    target.forward(ids[:context])
    steps = np.stack([target.forward([t]).logits[0] for t in ids[context:]])
    ok = True
    for T in (2, 3, 5, 6, 9):
        target.rollback(context)
        got = np.concatenate([target.forward(ids[context + i : context + i + T]).logits for i in range(0, 18 - T + 1, T)])
        ok &= bool(np.array_equal(got, steps[: len(got)]))
    target.reset(32)
    return ok


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), part of every probe's key: kernels differ by CPU."""
    try:
        return next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def probe_path(kind: str, key: list) -> Path:
    """Where the verdict of a ``kind`` probe for ``key`` on this CPU is remembered."""
    digest = hashlib.sha256(json.dumps([*key, cpu_name()]).encode()).hexdigest()[:24]
    return cache_dir() / "probes" / f"{kind}-{digest}.json"


def remembered(kind: str, key: list, probe: Callable[[], dict], valid: Callable[[dict], bool]) -> dict:
    """``probe()``'s verdict for ``key`` (+ this CPU), read from the cache's ``probes`` folder when
    a valid one is there, else probed and written (best effort: a read-only cache probes again)."""
    path = probe_path(kind, key)
    try:
        verdict = json.loads(path.read_text())
        if isinstance(verdict, dict) and valid(verdict):
            return verdict
    except (OSError, ValueError, KeyError, TypeError):
        pass
    verdict = probe()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(verdict))
        tmp.replace(path)
    except OSError:
        pass
    return verdict
