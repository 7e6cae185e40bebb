#!/usr/bin/env bash
# Stages 2-4 of `specrun train-draft` for the default model (after bench/eagle3_data.sh): the
# vocabulary, the training-time-test training and the export, in the background, niced, resumable.
# Rerun the same command to continue after an interruption (it resumes from the last checkpoint).
#
#   bash bench/eagle3_train.sh [OUT] [STEPS] [more train-draft options, e.g. --stop-at 1650]
#
# The recipe of the head shipped in core/heads/smollm2-135m-instruct (see its TRAINING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-../eagle3-work/smollm2-135m}
STEPS=${2:-2400}
shift $(( $# < 2 ? $# : 2 ))
export OMP_WAIT_POLICY=PASSIVE
nohup nice -n 19 .venv/bin/specrun train-draft --out "$OUT" --resume --stage vocab --stage train --stage export \
  --steps "$STEPS" --batch-size 4 --max-length 1024 --ttt-steps 7 --lr 2e-4 --draft-vocab-size 12000 \
  --precision bf16 --save-dtype bf16 --save-every 100 --threads 2 "$@" >>"$OUT/train.log" 2>&1 &
echo "$!" >"$OUT/train.pid"
echo "training started: pid $(cat "$OUT/train.pid"), log $OUT/train.log"
