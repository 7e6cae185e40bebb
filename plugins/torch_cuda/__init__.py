"""specrun's PyTorch backend (CUDA, and CPU as the reference)."""

import specrun

from .backend import TorchBackend


@specrun.hookimpl
def register_backends(register):
    register(TorchBackend())
