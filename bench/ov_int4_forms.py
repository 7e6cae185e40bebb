"""Which int4 weight-decompression forms OpenVINO's CPU plugin keeps compressed (issue 15's
plain-decoding lever: the default model's own Q4_1 weights instead of nncf's re-quantized int4).

A chain of 60 fully-connected layers 576x1536 (SmolLM2's MLP shapes), group 32, 2 threads; each
form is timed for 1 and 4 rows at the given inference precisions:

* ``f32``: dense weights; ``sym``: u4 minus a constant 8; ``u4zp``: nncf's pattern (u4 zero point
  through Convert; rounded, so not exact for Q4_1); ``f16zp``: an f16 zero point -min/scale (what
  exact Q4_1 needs); ``bias``: ``q*scale + min``.

    .venv/bin/python bench/ov_int4_forms.py bf16 f32

Measured 2026-12-06 (AMD EPYC, 2 vCPUs, data stage paused), 1 row, three runs: u4zp 0.94-1.18
ms, f16zp 1.40-1.54 (one outlier 2.74), sym 1.25-1.84, bias 2.27-2.36 (bf16) / 4.16-4.25 (f32) =
folded to dense, dense 2.12-2.27 / 4.17-4.36."""

from __future__ import annotations

import sys
import time

import numpy as np

LAYERS, HIDDEN, INTER, GROUP = 30, 576, 1536, 32
FORMS = ("f32", "sym", "u4zp", "f16zp", "bias")


def u4_const(ov, q: np.ndarray, shape: list[int]):
    """A u4 Constant of the values ``q`` (0..15), two per byte, low nibble first."""
    t = ov.Tensor(ov.Type.u4, ov.Shape(shape))
    pairs = q.reshape(-1, 2).astype(np.uint8)
    t.data[:] = (pairs[:, 0] | (pairs[:, 1] << 4)).reshape(t.data.shape)
    return ov.op.Constant(t)


def weight(ov, ops, rng, form: str, n: int, k: int):
    q = rng.integers(0, 16, (n, k // GROUP, GROUP)).astype(np.uint8)
    d = (rng.random((n, k // GROUP, 1)) * 0.01 + 0.001).astype(np.float16)
    m = (-(rng.random((n, k // GROUP, 1)) * 0.08)).astype(np.float16)
    if form == "f32":
        return ops.constant((q * d.astype(np.float32) + m.astype(np.float32)).reshape(n, k).astype(np.float32))
    wf = ops.convert(u4_const(ov, q, [n, k // GROUP, GROUP]), ov.Type.f16)
    exact_zp = -m.astype(np.float32) / d.astype(np.float32)
    if form == "u4zp":
        z = u4_const(ov, np.clip(np.round(exact_zp), 0, 15).astype(np.uint8), [n, k // GROUP, 1])
        x = ops.multiply(ops.subtract(wf, ops.convert(z, ov.Type.f16)), ops.constant(d))
    elif form == "f16zp":
        x = ops.multiply(ops.subtract(wf, ops.constant(exact_zp.astype(np.float16))), ops.constant(d))
    elif form == "bias":
        x = ops.add(ops.multiply(wf, ops.constant(d)), ops.constant(m))
    else:  # sym
        x = ops.multiply(ops.subtract(wf, ops.constant(np.float16(8))), ops.constant(d))
    return ops.convert(ops.reshape(x, [n, k], False), ov.Type.f32)


def model(ov, ops, rng, form: str):
    inp = ops.parameter([-1, HIDDEN], ov.Type.f32, name="x")
    x = inp
    for _ in range(LAYERS):
        h = ops.matmul(x, weight(ov, ops, rng, form, INTER, HIDDEN), False, True)
        x = ops.add(x, ops.matmul(ops.relu(h), weight(ov, ops, rng, form, HIDDEN, INTER), False, True))
    return ov.Model([x], [inp])


def ms_per_call(request, x: np.ndarray, n: int = 30) -> float:
    for _ in range(5):
        request.infer({0: x})
    t = time.perf_counter()
    for _ in range(n):
        request.infer({0: x})
    return (time.perf_counter() - t) / n * 1000


def main(hints: list[str]) -> None:
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    core = ov.Core()
    for hint in hints:
        for form in FORMS:
            compiled = core.compile_model(model(ov, ops, rng, form), "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                "INFERENCE_NUM_THREADS": 2})
            r = compiled.create_infer_request()
            one = ms_per_call(r, rng.standard_normal((1, HIDDEN)).astype(np.float32))
            four = ms_per_call(r, rng.standard_normal((4, HIDDEN)).astype(np.float32))
            print(f"{hint} {form:6s} 1 row {one:.2f} ms, 4 rows {four:.2f} ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["bf16", "f32"])
