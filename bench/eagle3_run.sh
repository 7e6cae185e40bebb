#!/usr/bin/env bash
# Issue 13's planned training run of the default model's EAGLE-3 head, fixed up front (session 18,
# 2026-12-07): the committed shards 00000-00079 (6,071 conversations; 5,788 train, 283 held out),
# 2 epochs = 2,894 steps of 4 conversations cut at 512 tokens (SpecForge's Qwen2.5-0.5B recipe;
# 77 of the 80 MT-bench first turns + their 256 new tokens fit in 512), a 16,000-token draft
# vocabulary and 5 TTT steps (both chosen by the A/B in docs/training-eagle3.md), lr 1e-4 with 1.5%
# warm-up and cosine decay over the 2,894 steps, from the target's initialisation, bf16 target
# features cached in the first epoch for the second. Measured before starting: 6.4 s a step with
# the features computed (2-core AMD EPYC), so ~5 h of CPU; 25 s a step at 2,048 tokens.
# Resumable across sessions: rerun the same command (checkpoints every 50 steps in OUT/work/; the
# held-out acceptance estimate on 32 conversations goes to OUT/work/acceptance-curve.{json,png}).
#
#   bash bench/eagle3_run.sh [OUT] [FRACTION] [more train-draft options]
#   kill -STOP $(cat OUT.train.pid)   # pause it while benchmarking; kill -CONT to go on
#
# OUT is relative to the repository (default ../eagle3-work/run512). FRACTION (default 1) trains on
# that nested share of the training records for 2 epochs of it (the scaling table's heads:
# bash bench/eagle3_run.sh ../eagle3-work/run512-25 0.25), with the same held-out records, reading
# the target's features from the full run's cache. The first launch writes its FRACTION, steps and
# extra options to OUT.args; a rerun with others is refused (train-draft itself would resume with
# them: another data share or schedule in the middle of a run). The run reads its shards through
# OUT.shards/ (links to exactly these files), so shards that the data stage adds later do not
# change its data, order or schedule.
set -euo pipefail
cd "$(dirname "$0")/.."
FULL=../eagle3-work/run512
OUT=${1:-$FULL}
OUT=${OUT%/}
FRACTION=${2:-1}
shift $(( $# < 2 ? $# : 2 ))
fail() { echo "eagle3_run.sh: $*" >&2; exit 2; }
[[ "$FRACTION" =~ ^(1|0?\.[0-9]*[1-9][0-9]*|1\.0*)$ ]] ||
  fail "FRACTION must be a share of the training records in (0, 1], e.g. 0.25; got '$FRACTION'"
for a in "$@"; do
  [[ "$a" == --seed* ]] && fail "the planned run's seed is 0 (the step count and the data share depend on it); drop $a"
done
[ "$(realpath -m "$OUT")" = "$(realpath -m "$FULL")" ] && [ "$FRACTION" != 1 ] &&
  fail "$OUT is the full run's folder; give a fraction run its own OUT, e.g. $FULL-25"
if [ -e "$OUT.train.pid" ] && kill -0 "$(cat "$OUT.train.pid")" 2>/dev/null; then
  fail "a run into $OUT is going on (pid $(cat "$OUT.train.pid")); wait for it or stop it first"
fi
SRC=training-data/smollm2-135m-instruct
DATA=$OUT.shards
mkdir -p "$DATA"
for i in $(seq 0 79); do
  f=$(printf 'shard-%05d.npz' "$i")
  [ -f "$SRC/$f" ] || fail "$SRC/$f is missing: check out the repository's training data"
  ln -sfn "$(realpath "$SRC/$f")" "$DATA/$f"
done
extra=$(find "$DATA" -mindepth 1 -maxdepth 1 ! -name 'shard-000[0-7][0-9].npz' | head -1)
[ -z "$extra" ] || fail "$DATA holds $extra, which is not one of the run's shard links: move it away"
# 2 epochs of the run's training records at 4 a step (the full run: 2 x 5,788 / 4 = 2,894 steps)
STEPS=$(.venv/bin/python - "$DATA" "$FRACTION" <<'PY'
import sys
from specrun_train.trainer import TrainOptions, data_subset, load_records, split_data
o = TrainOptions(target=None, out="-", data_dir=sys.argv[1], data_fraction=float(sys.argv[2]))
train, _ = split_data(load_records(o), o.val_fraction, o.seed)
print(-(-2 * len(data_subset(train, o.data_fraction, o.seed)) // 4))
PY
)
ARGS="fraction=$FRACTION steps=$STEPS extra=$*"
if [ -f "$OUT.args" ]; then
  [ "$(cat "$OUT.args")" = "$ARGS" ] || fail "$OUT was started with '$(cat "$OUT.args")', not '$ARGS': rerun it as it was started, or use another OUT"
elif [ -e "$OUT" ] && [ ! -f "$OUT/work/latest.json" ] && [ -n "$(ls -A "$OUT")" ]; then
  fail "$OUT holds files that are not this run's: use another OUT"
else
  echo "$ARGS" >"$OUT.args"
fi
if [ "$FRACTION" != 1 ] && [ ! -e "$OUT" ]; then  # a new fraction run reads the full run's feature cache
  [ -d "$FULL/work/target-cache" ] || fail "the full run's feature cache $FULL/work/target-cache is missing: train the full run first"
  mkdir -p "$OUT/work" && ln -s "$(realpath "$FULL/work/target-cache")" "$OUT/work/target-cache"
fi
echo "$OUT: $STEPS steps (2 epochs of ${FRACTION} of the training records)"
export OMP_WAIT_POLICY=PASSIVE
nohup nice -n 19 .venv/bin/specrun train-draft --out "$OUT" --resume --stage vocab --stage train --stage export \
  --data-dir "$DATA" --data-fraction "$FRACTION" --steps "$STEPS" --batch-size 4 --max-length 512 --ttt-steps 5 \
  --lr 1e-4 --draft-vocab-size 16000 --precision bf16 --target-precision bf16 --cache-target --save-dtype bf16 \
  --save-every 50 --eval-sequences 32 --threads 2 "$@" >>"$OUT.train.log" 2>&1 &
echo "$!" >"$OUT.train.pid"
sleep 3
kill -0 "$(cat "$OUT.train.pid")" 2>/dev/null || fail "train-draft stopped at once; the end of $OUT.train.log says why"
echo "training started: pid $(cat "$OUT.train.pid"), log $OUT.train.log"
