"""An example specrun backend in plain NumPy: the plugin entry point."""

import specrun

from .backend import NumpyBackend

__all__ = ["NumpyBackend", "register_backends"]


@specrun.hookimpl
def register_backends(register) -> None:
    register(NumpyBackend())
