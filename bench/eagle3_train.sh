#!/usr/bin/env bash
# Stages 2-4 of `specrun train-draft` for the default model (after bench/eagle3_data.sh): the
# vocabulary, the training-time-test training and the export, in the background, niced, resumable.
# Rerun the same command to continue after an interruption (it resumes from the last checkpoint).
#
#   bash bench/eagle3_train.sh [OUT] [STEPS] [more train-draft options, e.g. --stop-at 300]
#
# Trains on the committed shards (training-data/smollm2-135m-instruct): whole multi-turn
# conversations up to 2,048 tokens. The recipe of the second and third heads (2026-12-06): a warm
# start from the shipped head (its weights, MLP width and 12,000-token draft vocabulary; a rerun
# trains the shipped head further), 400 steps of 4 conversations (~0.45 epoch of the 3,713
# conversations there; one session's CPU at 9-16 s/step), lr 1e-4 with 1.5% warm-up and cosine decay
# to 0 over those steps, the training-time test over 5 steps (the benchmark's chains are at most 5
# drafts), no feature cache (no sequence is seen twice), bf16 target features where the CPU has bf16
# units. The third head added `--intermediate-size 4608 --data-offset 400` (a wider MLP, and the
# batches after the second head's). Every 50 steps the held-out acceptance estimate goes to
# OUT/work/acceptance-curve.*
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-../eagle3-work/smollm2-135m}
STEPS=${2:-400}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$(dirname "$OUT")"
export OMP_WAIT_POLICY=PASSIVE
nohup nice -n 19 .venv/bin/specrun train-draft --out "$OUT" --resume --stage vocab --stage train --stage export \
  --data-dir training-data/smollm2-135m-instruct --steps "$STEPS" --batch-size 4 --max-length 2048 --ttt-steps 5 \
  --lr 1e-4 --init-from core/heads/smollm2-135m-instruct --no-cache-target --precision bf16 --save-dtype bf16 \
  --save-every 50 --eval-sequences 16 --threads 2 "$@" >>"$OUT.train.log" 2>&1 &
echo "$!" >"$OUT.train.pid"
echo "training started: pid $(cat "$OUT.train.pid"), log $OUT.train.log"
