"""The draft vocabulary's size for the default model's EAGLE-3 head, by measurement (issue 13: the
head's ``lm_head`` is most of its compute).

A draft token outside the draft vocabulary can never be proposed, so the share of the target's
answer tokens the vocabulary covers bounds every draft position's acceptance.  For each size V:

* coverage: the V most frequent answer tokens of the committed training data's training split (the
  trainer's split: seed 0, 5% held out) over the answer tokens of the held-out split and of the
  target's greedy answers to all 80 MT-bench questions (``--mtbench results.json`` of a
  ``specrun bench`` run: its plain runs' token ids);
* cost: one draft step's ``lm_head`` (a [1, 576] x [576, V] matmul, nncf int8 weights, OpenVINO on
  2 threads: how the openvino backend runs the head), median ms.

    .venv/bin/python bench/eagle3_vocab.py [--mtbench bench-out/issue15-mtbench-s16/results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

SIZES = (4000, 8000, 12000, 16000, 24000, 32000, 49152)
ROOT = Path(__file__).resolve().parents[1]


def answer_tokens(records: list[dict]) -> np.ndarray:
    from specrun_train.trainer import record_spans

    parts = [np.asarray(r["input_ids"][a:b], dtype=np.int64) for r in records for a, b in record_spans(r)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def lm_head_ms(size: int, hidden: int = 576, n: int = 200) -> float:
    import logging

    import nncf
    import openvino as ov
    import openvino.opset13 as ops

    nncf.set_log_level(logging.ERROR)
    x = ops.parameter([1, hidden], ov.Type.f32, name="x")
    w = ops.constant(np.random.default_rng(0).standard_normal((size, hidden)).astype(np.float32) * 0.02)
    model = nncf.compress_weights(ov.Model([ops.matmul(x, w, False, True)], [x]), mode=nncf.CompressWeightsMode.INT8_SYM)
    req = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                 "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": 2}).create_infer_request()
    feed = {"x": np.ones((1, hidden), np.float32)}
    times = []
    for _ in range(n):
        t = time.perf_counter()
        req.infer(feed)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[n // 10 :])


def main() -> None:
    from specrun_train.data import records_from_shards
    from specrun_train.trainer import split_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT / "training-data/smollm2-135m-instruct"))
    ap.add_argument("--mtbench", help="results.json of a specrun bench run on mt-bench (its plain runs' answers)")
    ap.add_argument("--vocab-size", type=int, default=49152)
    args = ap.parse_args()
    records = records_from_shards(Path(args.data_dir))
    train, held = split_data(records, 0.05, 0)
    counts = np.bincount(answer_tokens(train), minlength=args.vocab_size)
    order = np.argsort(-counts, kind="stable")
    evals = {"held-out": answer_tokens(held)}
    if args.mtbench:
        res = json.loads(Path(args.mtbench).read_text())
        plain = {s["name"]: s["plain"] for s in res["systems"] if s.get("kind") != "baseline"}
        ids = [m["token_ids"] for m in res["measurements"] if plain.get(m["system"]) == m["config"]]
        evals["MT-bench"] = np.concatenate([np.asarray(t, np.int64) for t in ids])
    print(f"{len(train)} training conversations ({int(counts.sum())} answer tokens, {int((counts > 0).sum())} distinct); "
          + ", ".join(f"{k}: {len(v)} answer tokens" for k, v in evals.items()))
    print("| draft vocabulary | " + " | ".join(f"coverage, {k}" for k in evals) + " | lm_head ms (int8, 1 row) |")
    print("| --- |" + " --- |" * (len(evals) + 1))
    for size in SIZES:
        keep = np.zeros(args.vocab_size, bool)
        keep[order[:size]] = True
        cov = " | ".join(f"{keep[v].mean():.2%}" for v in evals.values())
        print(f"| {size} | {cov} | {lm_head_ms(size):.3f} |", flush=True)


if __name__ == "__main__":
    main()
