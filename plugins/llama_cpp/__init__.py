"""specrun's llama.cpp backend (CPU, GGUF files).  llama_cpp (llama-cpp-python) is imported only
when used, so a machine without it lists this backend as unavailable and the others keep working."""

import specrun

from .backend import LlamaCppBackend


@specrun.hookimpl
def register_backends(register):
    register(LlamaCppBackend())
