#!/usr/bin/env bash
# Stage 1 of `specrun train-draft` for the default model (SmolLM2-135M-Instruct): regenerate
# answers for ShareGPT first human turns with the target itself (batched greedy transformers
# generate), on idle CPU only.  Resumable: rerun the same command and it skips the prompts done.
#
#   bash bench/eagle3_data.sh [OUT] [NUM_PROMPTS] [MAX_NEW_TOKENS] [BATCH]
#
# Then (vocabulary, training, export), e.g.:
#   specrun train-draft --out OUT --resume --steps 2000 --draft-vocab-size 32000
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-../eagle3-work/smollm2-135m}
N=${2:-2000}
NEW=${3:-256}
BATCH=${4:-16}
mkdir -p "$OUT"
# passive OpenMP waits: threads sleep instead of spinning when other jobs hold the cores
export OMP_WAIT_POLICY=PASSIVE
nohup nice -n 19 .venv/bin/specrun train-draft --out "$OUT" --stage data --data sharegpt \
  --num-prompts "$N" --max-new-tokens "$NEW" --gen-batch-size "$BATCH" --threads 2 \
  >>"$OUT/data.log" 2>&1 &
echo "$!" >"$OUT/data.pid"
echo "data generation started: pid $(cat "$OUT/data.pid"), log $OUT/data.log, shard $OUT/work/data.jsonl"
