"""The one exception type users see: its message is a complete, one-line explanation."""


class SpecrunError(Exception):
    """A user-facing error: what is wrong and what to do about it, in one line."""
