#!/usr/bin/env bash
# Stage 1 of `specrun train-draft` for the default model (SmolLM2-135M-Instruct): the target
# regenerates every answer of every ShareGPT conversation that starts with a human turn (multi-turn,
# in context, answers up to 512 tokens), on idle CPU only, with OpenVINO GenAI's continuous batching
# at f32 (--data-engine genai: 1.3x the slot engine on the real multi-turn work, 2.2x on first turns,
# 2-core AMD EPYC, bench/data_engine.py; its export
# needs optimum-cli, which bench/optimum_env.sh installs into ../optimum-env once if it is missing).
# ENGINE=slots runs specrun's own torch slot engine instead (prompt-lookup drafts, --data-lookup 4).
# The shards go to training-data/smollm2-135m-instruct/ (committed: they survive a lost machine).
# Resumable: rerun the same command and it skips the conversations already in the shards.
#
#   bash bench/eagle3_data.sh [OUT] [SLOTS]
#   kill -STOP $(cat OUT.data.pid)   # pause it while benchmarking; kill -CONT to go on
#   kill $(cat OUT.data.pid)         # stop it: finished conversations are written first
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-../eagle3-work/smollm2-135m}
SLOTS=${2:-64}
ENGINE=${ENGINE:-genai}
case "$ENGINE" in
  slots) ;;
  genai)
    if ! command -v optimum-cli >/dev/null; then
      OPTIMUM_ENV=${OPTIMUM_ENV:-../optimum-env}
      [ -x "$OPTIMUM_ENV/bin/optimum-cli" ] || OPTIMUM_ENV="$OPTIMUM_ENV" bash bench/optimum_env.sh
      PATH="$PATH:$(realpath "$OPTIMUM_ENV")/bin"  # last: its python and pip do not shadow others
    fi ;;
  *) echo "eagle3_data.sh: ENGINE must be genai or slots, got '$ENGINE'" >&2; exit 2 ;;
esac
DATA=training-data/smollm2-135m-instruct
mkdir -p "$(dirname "$OUT")" "$DATA"
# passive OpenMP waits: threads sleep instead of spinning when other jobs hold the cores
export OMP_WAIT_POLICY=PASSIVE
nohup nice -n 19 .venv/bin/specrun train-draft --out "$OUT" --stage data --data sharegpt --data-dir "$DATA" \
  --max-new-tokens 512 --max-context 2048 --gen-batch-size "$SLOTS" --data-engine "$ENGINE" --threads 2 \
  >>"$OUT.data.log" 2>&1 &
echo "$!" >"$OUT.data.pid"
echo "data generation started: pid $(cat "$OUT.data.pid"), log $OUT.data.log, shards $DATA"
