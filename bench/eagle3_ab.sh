#!/usr/bin/env bash
# Issue 13's short A/B of the EAGLE-3 head's draft vocabulary (and TTT length): heads trained from the
# target's initialisation for the same STEPS steps on the same committed data, in the same order
# (seed 0), differing only in one option; the first arm computes the target's features and caches
# them, the others read that cache (a symlink), so arms after the first cost only the head.
# Each arm's held-out acceptance estimate (16 conversations, chains of 5) is in ARM/work/acceptance-curve.json
# and printed at the end of the arm.
#
#   bash bench/eagle3_ab.sh [STEPS] [ARM_OPTIONS ...]    e.g. bash bench/eagle3_ab.sh 100 "--draft-vocab-size 16000" "--draft-vocab-size 32000"
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-100}
shift
BASE=../eagle3-work/ab
mkdir -p "$BASE"
first=""
for arm in "$@"; do
  name=$(echo "$arm" | tr -c 'a-zA-Z0-9' '_' | sed 's/__*/_/g; s/^_//; s/_$//')
  out="$BASE/$name"
  if [ -n "$first" ] && [ ! -e "$out/work/target-cache" ]; then
    mkdir -p "$out/work" && ln -s "$(realpath "$first/work/target-cache")" "$out/work/target-cache"
  fi
  # --force: a later arm's folder already holds the cache link, so it is not empty and not yet a run
  # shellcheck disable=SC2086
  OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/specrun train-draft --out "$out" --resume --force --stage vocab --stage train \
    --data-dir training-data/smollm2-135m-instruct --steps "$STEPS" --batch-size 4 --max-length 2048 --ttt-steps 5 \
    --lr 1e-4 --cache-target --precision f32 --save-every "$STEPS" --eval-sequences 16 --threads 2 --quiet $arm \
    >>"$BASE/$name.log" 2>&1
  first=${first:-$out}
  echo "$arm: held-out acceptance length $(.venv/bin/python -c 'import json, sys; print(json.load(open(sys.argv[1]))[-1]["acceptance_length"])' "$out/work/acceptance-curve.json")"
done
