"""What specrun's batch-invariant attention costs OpenVINO per cached row (issue 15: why a step of
the openvino backend grows with context faster than llama.cpp's).

specrun's graph (``kit/graph.py``, layer KV layout) writes a block's keys and values into a copy of
each layer's f32 cache (``ScatterElementsUpdate`` on the cache input) so that every row of a block
attends to one cache-ordered sequence.  This times just that, in a 30-layer micro-model of
SmolLM2-135M's attention (3 KV heads of 64, 3 query heads per KV head, one token):

* ``param``: the cache is an input and the new row is scattered into a copy (what specrun does);
* ``nocopy``: the same MatMuls on the cache input without the scatter (wrong results: the floor);
* ``state``: the cache is a ReadValue/Assign variable updated by the scatter (in place?).

    .venv/bin/python bench/ov_kv_copy.py

Measured 2026-12-07 (Intel Xeon, AVX-512 VNNI, 2 vCPUs, data stage paused), median ms per call at
128 / 640 / 1,536 cached rows: param 1.1 / 3.1 / 8.2, nocopy 0.8 / 1.6 / 3.4, state 1.1 / 4.2 / 11.1
(the Assign copies the variable: no gain from a stateful cache in this form).
"""

from __future__ import annotations

import sys
import time

import numpy as np

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64
KINDS = ("param", "nocopy", "state")


def build(ov, ops, kind: str, rows: int):
    q = ops.parameter([KV_HEADS, GROUP, HEAD_DIM], ov.Type.f32, name="q")
    new = ops.parameter([KV_HEADS, 1, HEAD_DIM], ov.Type.f32, name="new")
    pos = ops.parameter([1], ov.Type.i64, name="pos")
    params, sinks, x = [q, new, pos], [], q
    index = ops.broadcast(ops.reshape(pos, [1, 1, 1], False), ops.constant(np.array([KV_HEADS, 1, HEAD_DIM], np.int64)))
    for i in range(LAYERS):
        if kind == "state":
            info = ov.op.util.VariableInfo()
            info.data_shape, info.data_type, info.variable_id = ov.PartialShape([KV_HEADS, rows, HEAD_DIM]), ov.Type.f32, f"kv{i}"
            var = ov.op.util.Variable(info)
            cache = ops.read_value(ops.constant(np.zeros((KV_HEADS, rows, HEAD_DIM), np.float32)), var)
        else:
            cache = ops.parameter([KV_HEADS, rows, HEAD_DIM], ov.Type.f32, name=f"past{i}")
            params.append(cache)
        keys = cache if kind == "nocopy" else ops.scatter_elements_update(cache, index, new, 1)
        if kind == "state":
            sinks.append(ops.assign(keys, var))
        p = ops.softmax(ops.matmul(x, keys, False, True), 2)
        x = ops.add(ops.matmul(p, keys, False, False), q)
    return ov.Model([ops.result(x)], sinks, params, kind) if sinks else ov.Model([x], params, kind)


def ms_per_call(ov, core, kind: str, rows: int, n: int = 40) -> float:
    compiled = core.compile_model(build(ov, ov.opset13, kind, rows), "CPU",
                                  {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"})
    req = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feed = {"q": rng.random((KV_HEADS, GROUP, HEAD_DIM), np.float32),
            "new": rng.random((KV_HEADS, 1, HEAD_DIM), np.float32), "pos": np.array([5], np.int64)}
    if kind != "state":
        feed.update({f"past{i}": rng.random((KV_HEADS, rows, HEAD_DIM), np.float32) for i in range(LAYERS)})
    for _ in range(5):
        req.infer(feed, share_inputs=True)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        req.infer(feed, share_inputs=True)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main(kinds: list[str]) -> None:
    import openvino as ov

    core = ov.Core()
    for rows in (128, 640, 1536):
        print(f"{rows:5d} cached rows: " + ", ".join(f"{k} {ms_per_call(ov, core, k, rows):.2f} ms" for k in kinds), flush=True)


if __name__ == "__main__":
    bad = [k for k in sys.argv[1:] if k not in KINDS]
    if bad:
        sys.exit(f"unknown variant {bad[0]!r}; choose from {', '.join(KINDS)}")
    main(sys.argv[1:] or list(KINDS))
