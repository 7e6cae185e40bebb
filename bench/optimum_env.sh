#!/usr/bin/env bash
# optimum-intel (OpenVINO GenAI's own export of a target: `optimum-cli export openvino`) in an
# environment of its own, OPTIMUM_ENV (default ../optimum-env): it pins transformers < 5.6 and wants
# torchvision, which would break specrun's environment. specrun finds its optimum-cli on PATH (the
# openvino-genai baseline of `specrun bench`, `specrun train-draft --data-engine genai`).
# Measured here (2026-12-08, 2-core AMD EPYC): ~4 min from the package registries.
#
#   bash bench/optimum_env.sh && PATH=$PWD/../optimum-env/bin:$PATH ...
set -euo pipefail
cd "$(dirname "$0")/.."
OPTIMUM_ENV=${OPTIMUM_ENV:-../optimum-env}
PY=${PYTHON:-python3}
OV=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('openvino'))")
[ -x "$OPTIMUM_ENV/bin/python" ] || "$PY" -m venv "$OPTIMUM_ENV"
"$OPTIMUM_ENV/bin/python" -m pip install -q "torch==${SPECRUN_TORCH_VERSION:-2.13.0}"
"$OPTIMUM_ENV/bin/python" -m pip install -q "transformers==5.5.4" "huggingface-hub>=1.5,<1.22" "nncf==3.4.0" \
  "openvino==$OV" "openvino-tokenizers==$OV.0" accelerate safetensors sentencepiece requests einops "diffusers<0.38"
"$OPTIMUM_ENV/bin/python" -m pip install -q --no-deps "optimum==2.3.0" "optimum-intel==2.2.0"
echo "optimum-cli is $OPTIMUM_ENV/bin/optimum-cli"
