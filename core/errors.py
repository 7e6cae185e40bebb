"""The one exception type users see: its message is a complete, one-line explanation."""

from __future__ import annotations

import errno


class SpecrunError(Exception):
    """A user-facing error: what is wrong and what to do about it, in one line."""


def disk_full(exc: BaseException) -> str | None:
    """The one-line message for an error caused by a full disk (or quota), else None.  Exports and
    conversions write GBs; runtimes (ONNX, OpenVINO) re-raise the OSError as their own type, so the
    cause chain and the message are both searched."""
    import click

    if isinstance(exc, click.exceptions.ClickException | click.exceptions.Exit | click.exceptions.Abort):
        return None  # click's own exits and usage errors (which may echo user input) stay as they are
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {cur.filename}" if cur.filename else ""
            break
        if "No space left on device" in str(cur):
            where = ""
            break
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    else:
        return None
    from .store import cache_dir

    return (f"no space left on the disk{where}; free some (`specrun cache` shows what specrun's cache "
            f"holds in {cache_dir()}, `specrun cache clear` removes it) and run again")
