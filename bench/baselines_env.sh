#!/usr/bin/env bash
# The outside systems of `specrun bench --baseline llama.cpp,openvino-genai`, installed as measured
# here (2026-12-03, Intel Xeon with AMX, Python 3.11):
#  - llama-cpp-python into .venv, compiled without AMX: with GGML_NATIVE=ON it picks AMX kernels
#    for the Q4_1 weights and crashed (SIGSEGV in llama_decode) on this machine; AVX-512 kept (~8 min);
#  - openvino-genai + openvino-tokenizers into .venv, the versions of the openvino there;
#  - optimum-intel (for GenAI's own export) in an environment of its own, OPTIMUM_ENV
#    (default ../optimum-env): it pins transformers < 5.6 and wants torchvision, which would break
#    specrun's environment. `specrun bench` finds its optimum-cli on PATH:
#
#   bash bench/baselines_env.sh && PATH=$PWD/../optimum-env/bin:$PATH .venv/bin/specrun bench --baseline llama.cpp,openvino-genai
set -euo pipefail
cd "$(dirname "$0")/.."
OPTIMUM_ENV=${OPTIMUM_ENV:-../optimum-env}
OV=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('openvino'))")
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
  .venv/bin/python -m pip install -q --no-cache-dir "llama-cpp-python==0.3.36"
.venv/bin/python -m pip install -q "openvino-genai==$OV.0" "openvino-tokenizers==$OV.0" "openvino==$OV"  # in .[all] too
OPTIMUM_ENV="$OPTIMUM_ENV" bash bench/optimum_env.sh  # PYTHON picks the interpreter of that environment
echo "baselines installed; optimum-cli is $OPTIMUM_ENV/bin/optimum-cli (put $OPTIMUM_ENV/bin on PATH for bench)"
