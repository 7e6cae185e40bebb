"""Could openvino keep its KV cache in place and stay exact?  (issue 15's "next lever")

specrun's openvino graph copies each layer's f32 cache every call to write a block's keys into it
(``bench/ov_kv_copy.py``).  OpenVINO's own answer is the stateful cache that OpenVINO GenAI's
models use: ``ReadValue -> Gather(beam_idx) -> Concat(new rows) -> ScaledDotProductAttention`` with
the Concat feeding an ``Assign``, which the CPU plugin fuses into one node that appends the new rows
to a cache it owns (no copy per call); rollback is ``set_state`` with the rows to keep.  This builds
that pattern in a micro-model of SmolLM2-135M's attention (9 query heads sharing 3 KV heads of 64,
broadcast the way the plugin's pattern expects) and asks:

* **exact?** a token's attention output computed alone (1 row after ``P`` cached rows) against the
  same token verified in a block of 5 (the cache rolled back to ``P`` rows by ``set_state``): the
  bits must be equal for greedy speculation to stay lossless;
* **fast?** ms per one-token call at 128 / 640 / 1,536 cached rows over 30 layers, against
  specrun's form on the same shapes and settings (``build_copy``: the cache an input, the new row
  scattered into a copy, MatMul-Softmax-MatMul; and without the copy, the floor), and what a
  rollback (``set_state`` of every layer's keys and values) costs.

    .venv/bin/python bench/ov_inplace.py [--threads N]

Measured 2026-12-07 (2-core AMD EPYC with AVX-512, OpenVINO 2026.4, a training run paused): the
plugin fuses the pattern (runtime nodes MemoryInput/MemoryOutput/ScaledDotProductAttention); with 2
threads 3-4 of 5 block rows differ from the lone step after 31 / 100 / 300 / 640 cached rows (max
abs 1.2e-7 to 2.4e-7), with 1 thread none; a one-token call in place 1.25 / 4.53 / 8.52 ms at 128 /
640 / 1,536 rows against 2.44 / 8.68 / 13.15 for specrun's copy form and 2.01 / 5.44 / 9.38 without
the copy; a rollback (set_state of 60 tensors) 3.46 / 17.79 / 37.58 ms.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

KV_HEADS, GROUP, HEAD_DIM = 3, 3, 64


def build(ov, layers: int):
    ops = ov.opset13
    beam = ops.parameter([1], ov.Type.i32, name="beam_idx")
    q = ops.parameter([1, KV_HEADS * GROUP, -1, HEAD_DIM], ov.Type.f32, name="q")
    k_new = ops.parameter([1, KV_HEADS, -1, HEAD_DIM], ov.Type.f32, name="k")
    v_new = ops.parameter([1, KV_HEADS, -1, HEAD_DIM], ov.Type.f32, name="v")
    mask = ops.parameter([1, 1, -1, -1], ov.Type.f32, name="mask")  # [tokens, cached + new]: 0 or -inf
    scale = ops.constant(np.float32(HEAD_DIM**-0.5))
    empty = ops.constant(np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32))
    x, sinks = q, []
    for i in range(layers):
        cats = []
        for kind, new in (("k", k_new), ("v", v_new)):
            info = ov.op.util.VariableInfo()
            info.data_shape = ov.PartialShape([1, KV_HEADS, -1, HEAD_DIM])
            info.data_type, info.variable_id = ov.Type.f32, f"{kind}{i}"
            var = ov.op.util.Variable(info)
            past = ops.gather(ops.read_value(empty, var), beam, ops.constant(np.int64(0)))
            cat = ops.concat([past, new], 2)
            sinks.append(ops.assign(cat, var))
            # query head h reads KV head h // GROUP: [1, 3, L, D] -> [1, 3, 1, L, D] -> [1, 3, 3, L, D] -> [1, 9, L, D]
            wide = ov.opset3.broadcast(ops.unsqueeze(cat, ops.constant(np.int64(2))),
                                       ops.constant(np.array([1, 1, GROUP, 1, 1], np.int64)),
                                       broadcast_spec="BIDIRECTIONAL")
            cats.append(ops.reshape(wide, ops.constant(np.array([0, KV_HEADS * GROUP, -1, HEAD_DIM], np.int64)), True))
        x = ops.add(ops.scaled_dot_product_attention(x, cats[0], cats[1], mask, scale, causal=False), q)
    return ov.Model([ops.result(x)], sinks, [beam, q, k_new, v_new, mask], "inplace")


def build_copy(ov, layers: int, copy: bool):
    """specrun's form on the same shapes: each layer's cache is an input (the whole buffer), the new
    row is scattered into a copy of it at ``pos`` (``copy``; without it the MatMuls read the input as
    it is: wrong results, the floor), then MatMul, mask, Softmax, MatMul with a KV head's 3 query
    heads as 3 rows."""
    ops = ov.opset13
    q = ops.parameter([1, KV_HEADS * GROUP, 1, HEAD_DIM], ov.Type.f32, name="q")
    k_new = ops.parameter([1, KV_HEADS, 1, HEAD_DIM], ov.Type.f32, name="k")
    v_new = ops.parameter([1, KV_HEADS, 1, HEAD_DIM], ov.Type.f32, name="v")
    pos = ops.parameter([1], ov.Type.i64, name="pos")
    mask = ops.parameter([1, 1, 1, -1], ov.Type.f32, name="mask")  # [1, rows]: 0 up to pos, then -inf
    params, x = [q, k_new, v_new, pos, mask], q
    grouped = ops.constant(np.array([1, KV_HEADS, GROUP, HEAD_DIM], np.int64))
    back = ops.constant(np.array([1, KV_HEADS * GROUP, 1, HEAD_DIM], np.int64))
    scale = ops.constant(np.float32(HEAD_DIM**-0.5))
    for i in range(layers):
        kv = []
        for kind, new in (("k", k_new), ("v", v_new)):
            past = ops.parameter([1, KV_HEADS, -1, HEAD_DIM], ov.Type.f32, name=f"past_{kind}{i}")
            params.append(past)
            kv.append(ov.opset3.scatter_update(past, pos, new, ops.constant(np.int64(2))) if copy else past)
        qg = ops.multiply(ops.reshape(x, grouped, False), scale)  # [1, 3, 3, D]
        p = ops.softmax(ops.add(ops.matmul(qg, kv[0], False, True), mask), 3)  # [1, 3, 3, rows]
        x = ops.add(ops.reshape(ops.matmul(p, kv[1], False, False), back, False), q)
    return ov.Model([ops.result(x)], params, "copy" if copy else "nocopy")


def timing_copy(ov, core, config, cached: int, copy: bool, n: int = 40) -> float:
    """Median ms of a one-token call over 30 layers of ``build_copy`` with ``cached`` rows used in a
    buffer of ``cached + 64`` rows (specrun's buffer grows in steps of 64)."""
    req = core.compile_model(build_copy(ov, 30, copy), "CPU", config).create_infer_request()
    rng = np.random.default_rng(0)
    rows = cached + 64
    inputs = {"q": rng.standard_normal((1, KV_HEADS * GROUP, 1, HEAD_DIM), dtype=np.float32),
              "k": rng.standard_normal((1, KV_HEADS, 1, HEAD_DIM), dtype=np.float32),
              "v": rng.standard_normal((1, KV_HEADS, 1, HEAD_DIM), dtype=np.float32),
              "pos": np.array([cached], np.int64),
              "mask": np.where(np.arange(rows) <= cached, 0.0, -np.inf).astype(np.float32)[None, None, None]}
    for i in range(30):
        for kind in "kv":
            inputs[f"past_{kind}{i}"] = rng.standard_normal((1, KV_HEADS, rows, HEAD_DIM), dtype=np.float32)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        req.infer(inputs, share_inputs=True)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times[5:]))


def feed(rng, cached: int, tokens: int, step_of=None):
    """Inputs of a call of ``tokens`` new tokens after ``cached`` rows (``step_of``: take the rows
    of this 5-token feed's token j instead, for a lone step)."""
    if step_of is not None:
        j, big = step_of
        q = big["q"][:, :, j : j + 1]
        k, v = big["k"][:, :, j : j + 1], big["v"][:, :, j : j + 1]
    else:
        q = rng.standard_normal((1, KV_HEADS * GROUP, tokens, HEAD_DIM), dtype=np.float32)
        k = rng.standard_normal((1, KV_HEADS, tokens, HEAD_DIM), dtype=np.float32)
        v = rng.standard_normal((1, KV_HEADS, tokens, HEAD_DIM), dtype=np.float32)
    T = k.shape[2]
    visible = np.concatenate([np.ones((T, cached), bool), np.tri(T, dtype=bool)], axis=1)
    m = np.where(visible, 0.0, -np.inf).astype(np.float32)[None, None]
    return {"beam_idx": np.zeros(1, np.int32), "q": np.ascontiguousarray(q), "k": np.ascontiguousarray(k),
            "v": np.ascontiguousarray(v), "mask": m}


def states(req) -> list[np.ndarray]:
    return [s.state.data.copy() for s in req.query_state()]


def restore(ov, req, saved: list[np.ndarray]) -> None:
    for s, arr in zip(req.query_state(), saved, strict=True):
        s.state = ov.Tensor(arr)


def exactness(ov, core, config, cached: int) -> tuple[int, float]:
    """(rows of the 5-token block whose output differs from the lone step's, max abs difference)."""
    req = core.compile_model(build(ov, 1), "CPU", config).create_infer_request()
    rng = np.random.default_rng(0)
    req.infer(feed(rng, 0, cached))  # the prefill
    saved = states(req)
    block = feed(rng, cached, 5)
    lone = []
    for j in range(5):
        out = req.infer(feed(rng, cached + j, 1, step_of=(j, block)))[0]
        lone.append(out[0, :, 0].copy())
    restore(ov, req, saved)
    out = req.infer(block)[0][0]  # [heads, 5, D]
    diff = [np.abs(out[:, j] - lone[j]).max() for j in range(5)]
    return sum(d > 0 for d in diff), float(max(diff))


def timing(ov, core, config, cached: int, n: int = 40) -> tuple[float, float]:
    """(median ms of a one-token call over 30 layers in a run of ``n`` calls after ``cached`` rows —
    the cache grows by one row a call, as in plain decoding —, median ms of a rollback to ``cached``
    rows)."""
    req = core.compile_model(build(ov, 30), "CPU", config).create_infer_request()
    rng = np.random.default_rng(0)
    req.infer(feed(rng, 0, cached))
    saved = states(req)
    calls, rollbacks = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        restore(ov, req, saved)
        rollbacks.append(time.perf_counter() - t0)
        req.infer(feed(rng, cached, 1))
    restore(ov, req, saved)
    for i in range(n):
        step = feed(rng, cached + i, 1)
        t0 = time.perf_counter()
        req.infer(step)
        calls.append(time.perf_counter() - t0)
    return 1000 * float(np.median(calls[5:])), 1000 * float(np.median(rollbacks))


def main() -> None:
    import openvino as ov

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
              "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    runtime = core.compile_model(build(ov, 1), "CPU", config).get_runtime_model()
    kinds = sorted({op.get_rt_info()["layerType"].astype(str) for op in runtime.get_ops()})
    print(f"OpenVINO {ov.__version__}, {args.threads} threads, f32; runtime node types: {', '.join(kinds)}")
    for threads in sorted({args.threads, 1}, reverse=True):
        cfg = {**config, "INFERENCE_NUM_THREADS": threads}
        for cached in (31, 100, 300, 640):
            bad, worst = exactness(ov, core, cfg, cached)
            print(f"{threads} thread(s), {cached:4d} cached rows: {bad}/5 block rows differ from the lone step "
                  f"(max abs {worst:.3g})", flush=True)
    for cached in (128, 640, 1536):
        call, rollback = timing(ov, core, config, cached)
        copy, floor = (timing_copy(ov, core, config, cached, c) for c in (True, False))
        print(f"{cached:5d} cached rows, one-token call over 30 layers: in place {call:.2f} ms (a rollback: set_state "
              f"of 60 tensors {rollback:.2f} ms), specrun's copy {copy:.2f} ms, no copy {floor:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
