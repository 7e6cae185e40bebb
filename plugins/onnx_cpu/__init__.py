"""specrun's ONNX Runtime backend (CPU).  onnxruntime and torch are imported lazily, so a machine
without them still lists this backend (as unavailable) and the other backends keep working."""

import specrun

from .backend import OnnxBackend


@specrun.hookimpl
def register_backends(register):
    register(OnnxBackend())
