"""specrun's OpenVINO backend (CPU, Intel GPU, NPU).  openvino is imported only when used."""

import specrun

from .backend import OpenVinoBackend


@specrun.hookimpl
def register_backends(register):
    register(OpenVinoBackend())
