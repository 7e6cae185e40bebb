"""Which int4 weight-decompression forms OpenVINO's CPU plugin keeps compressed (issue 15's
plain-decoding lever: the default model's own Q4_1 weights instead of nncf's re-quantized int4).

A chain of 60 fully-connected layers 576x1536 (SmolLM2's MLP shapes), group 32, 2 threads; each
form is timed for 1 and 4 rows at the given inference precisions:

* ``f32``: dense weights; ``sym``: u4 minus a constant 8; ``u4zp``: nncf's pattern (u4 zero point
  through Convert; rounded, so not exact for Q4_1); ``f16zp``: an f16 zero point -min/scale (what
  exact Q4_1 needs); ``bias``: ``q*scale + min``; ``split``: exact Q4_1 as ``x @ (q*scale)`` plus
  the group minimums times x's group sums (a small extra MatMul); ``split0``: the same with the
  nearest u4 zero point and the remainder in the minimums.

    .venv/bin/python bench/ov_int4_forms.py bf16 f32

Measured 2026-12-06 (AMD EPYC, 2 vCPUs, data stage paused), 1 row, three runs: u4zp 0.94-1.18
ms, f16zp 1.40-1.54 (one outlier 2.74), sym 1.25-1.84, bias 2.27-2.36 (bf16) / 4.16-4.25 (f32) =
folded to dense, dense 2.12-2.27 / 4.17-4.36.

Measured 2026-12-07 (Intel Xeon, AVX-512 VNNI, no bf16, 2 vCPUs), f32, 1 / 4 rows, ms: f32 8.0-8.5 /
9.2-9.8, sym 2.4-2.5 / 3.9-4.1, u4zp 1.4-1.6 / 1.9-2.3, f16zp 2.7-2.8 / 4.0-4.5, bias 7.8-8.9 / 9.3-10.8,
split 2.2-2.4 / 2.8-3.0, split0 2.4-2.6 / 3.1-3.3: the exact split forms beat f16zp but their extra
nodes cost more than u4zp's fast path saves, so exact Q4_1 stays slower than nncf's rounded forms.

    .venv/bin/python bench/ov_int4_forms.py --model    # the whole default model, exact Q4_1 vs nncf

``--model`` stores the default model's own weights in OpenVINO's compressed forms without changing
them (``exact_4bit``: its matmul weights are exactly GGUF Q4_1, its lm_head Q8_0, as its GGUF file
holds them) and times it beside specrun's int8 and (nncf) int4 IRs.  Measured 2026-12-06 (AMD
EPYC, 2 vCPUs, nothing else running), ms per 1-token step in three runs, max |logit - f32| of a
100-token prefill: f32 17.7-19.7, 0; int8 8.2-8.6, 2.73; nncf int4 8.1-8.4, 16.7; exact Q4_1/Q8_0
11.3-11.4 (its batch-invariance probe wants calls of 2-4 rows; 1 row unpadded measured ~11.9 with
training beside it), **1.08** (bf16 compute moves the float model by ~1.1 too: tolerances.toml).  So the model's own 4-bit weights make
int4 accurate but not fast on this CPU: the f16 zero point costs more than int8's reads save.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

LAYERS, HIDDEN, INTER, GROUP = 30, 576, 1536, 32
FORMS = ("f32", "sym", "u4zp", "f16zp", "bias", "split", "split0")


def u4_const(ov, q: np.ndarray, shape: list[int]):
    """A u4 Constant of the values ``q`` (0..15), two per byte, low nibble first."""
    t = ov.Tensor(ov.Type.u4, ov.Shape(shape))
    pairs = q.reshape(-1, 2).astype(np.uint8)
    t.data[:] = (pairs[:, 0] | (pairs[:, 1] << 4)).reshape(t.data.shape)
    return ov.op.Constant(t)


def weight(ov, ops, rng, form: str, n: int, k: int, x=None):
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
    elif form in ("split", "split0"):  # u4 times its scale + the minimums times x's group sums (split0: a u4 zero point 0)
        if form == "split0":  # the nearest u4 zero point; the minimums' remainder goes to the correction
            z = np.clip(np.rint(exact_zp), 0, 15).astype(np.uint8)
            wf = ops.subtract(wf, ops.convert(u4_const(ov, z, [n, k // GROUP, 1]), ov.Type.f16))
            m = (m.astype(np.float32) + z * d.astype(np.float32)).astype(np.float32)
        x_dq = ops.matmul(x, ops.convert(ops.reshape(ops.multiply(wf, ops.constant(d)), [n, k], False), ov.Type.f32), False, True)
        sums = ops.reduce_sum(ops.reshape(x, [-1, k // GROUP, GROUP], False), ops.constant(np.int64(2)), False)
        return ops.add(x_dq, ops.matmul(sums, ops.constant(m.reshape(n, k // GROUP).astype(np.float32)), False, True))
    elif form == "bias":
        x = ops.add(ops.multiply(wf, ops.constant(d)), ops.constant(m))
    else:  # sym
        x = ops.multiply(ops.subtract(wf, ops.constant(np.float16(8))), ops.constant(d))
    return ops.convert(ops.reshape(x, [n, k], False), ov.Type.f32)


def model(ov, ops, rng, form: str):
    inp = ops.parameter([-1, HIDDEN], ov.Type.f32, name="x")
    x = inp
    for _ in range(LAYERS):
        if form in ("split", "split0"):  # weight() returns the product
            h = weight(ov, ops, rng, form, INTER, HIDDEN, x)
            x = ops.add(x, weight(ov, ops, rng, form, HIDDEN, INTER, ops.relu(h)))
            continue
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


# ---------------------------------------------------------------------------- the whole default model

GGUF_GROUP = 32  # GGUF's block size for Q4_1 and Q8_0
MIN_EXACT = 32 * 1024  # weights with fewer elements (RoPE's 64x64 rotation, tiny layers) stay float


def gguf_q4_1(w: np.ndarray):
    """``(q u8 [N, G, 32], d f16 [N, G, 1], m f16 [N, G, 1])`` when every group of 32 weights along a
    row of ``w`` ([N, K] float32) is exactly ``d * q + m`` computed in float32 with ``q`` in 0..15 and
    ``d``, ``m`` float16 — GGUF's Q4_1 as dequantized by gguf-py (which is how the default model's
    float weights were made from its GGUF file); else None.  The group's minimum has ``q = 0`` and
    its maximum ``q = 15`` in llama.cpp's quantizer, which gives ``m`` and, up to rounding, ``d``."""
    N, K = w.shape
    if K % GGUF_GROUP:
        return None
    g = w.reshape(N, K // GGUF_GROUP, GGUF_GROUP)
    mn, mx = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    m = mn.astype(np.float16)
    if not np.array_equal(m.astype(np.float32), mn):
        return None
    d0 = ((mx - mn) / 15).astype(np.float16)
    q = d = found = None
    for cand in (d0, np.nextafter(d0, np.float16(np.inf)), np.nextafter(d0, np.float16(-np.inf))):
        c32 = cand.astype(np.float32)
        safe = np.where(c32 > 0, c32, 1)
        qc = np.clip(np.where(c32 > 0, np.rint((g - mn) / safe), 0), 0, 15).astype(np.uint8)
        ok = ((c32 * qc + m.astype(np.float32)) == g).all(-1, keepdims=True)
        if found is None:
            q, d, found = qc, cand, ok
        else:
            new = ok & ~found
            q, d, found = np.where(new, qc, q), np.where(new, cand, d), found | ok
    return (q, d, m) if found.all() else None


def gguf_q8_0(w: np.ndarray):
    """``(q i8 [N, G, 32], d f16 [N, G, 1])`` when every group of 32 along a row of ``w`` is exactly
    ``d * q`` (GGUF's Q8_0: ``q`` in -127..127, ``d`` float16); else None."""
    N, K = w.shape
    if K % GGUF_GROUP:
        return None
    g = w.reshape(N, K // GGUF_GROUP, GGUF_GROUP)
    d = (np.abs(g).max(-1, keepdims=True) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    q = np.clip(np.where(d32 > 0, np.rint(g / np.where(d32 > 0, d32, 1)), 0), -127, 127).astype(np.int8)
    return (q, d) if np.array_equal(d32 * q, g) else None


def exact_4bit(model) -> dict[str, int] | None:
    """Store the weights of ``model``'s matmuls in OpenVINO's compressed forms *without changing
    them*, where they are exactly GGUF Q4_1 (4-bit, as the default model's were) or Q8_0 (its tied
    embedding / ``lm_head``): u4 with an f16 scale and zero point ``-m / d`` per 32 weights, or i8 with
    an f16 scale, the decompression patterns OpenVINO's CPU plugin runs as compressed
    fully-connected layers.  The stored form's only rounding is the zero point's to float16 (``m``
    moves by up to 2^-11 of itself); the compute precision rounds the decompressed weights as it
    would the float model's (measured: 1.08 of a logit from f32 at bf16, see --model).  Returns the counts of weights stored each way,
    or None (the model is left as it was) when some large weight is neither — nncf's re-quantization
    is then the only int4 there is."""
    import openvino as ov
    import openvino.opset13 as ops

    plan = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.get_attributes()["transpose_a"]:
            continue
        const = op.input_value(1).get_node()
        if const.get_type_name() != "Constant" or const.get_element_type() != ov.Type.f32:
            continue
        w = const.get_data()
        if w.ndim != 2 or w.size < MIN_EXACT or _is_identity(w):
            continue
        w = np.ascontiguousarray(w if op.get_attributes()["transpose_b"] else w.T)  # [N, K]
        form = gguf_q4_1(w) or gguf_q8_0(w)
        if form is None:
            return None
        plan.append((op, form))
    if not any(len(form) == 3 for _, form in plan):
        return None
    counts = {"q4_1": 0, "q8_0": 0}
    for op, form in plan:
        N, G = form[0].shape[:2]
        if len(form) == 3:
            q, d, m = form
            flat = (d == 0) & (m != 0)  # a group of equal weights: (0 + sign(m)) * |m|
            d = np.where(flat, np.abs(m), d)
            zero = np.where(flat, -np.sign(m), -m.astype(np.float32) / np.where(d == 0, 1, d).astype(np.float32))
            zero = zero.astype(np.float16)
            x = ops.subtract(ops.convert(u4_const(ov, q, list(q.shape)), ov.Type.f16), ops.constant(zero))
            counts["q4_1"] += 1
        else:
            q, d = form
            x = ops.convert(ops.constant(q), ov.Type.f16)
            counts["q8_0"] += 1
        x = ops.convert(ops.reshape(ops.multiply(x, ops.constant(d)), [N, G * GGUF_GROUP], False), ov.Type.f32)
        new = ops.matmul(op.input_value(0), x, False, True)
        new.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(new.output(0))
    model.validate_nodes_and_infer_types()
    return counts


def _is_identity(w: np.ndarray) -> bool:
    """The graph's hidden-state barrier (x @ I) stays float."""
    return w.ndim == 2 and w.shape[0] == w.shape[1] and bool(np.array_equal(w, np.eye(w.shape[0], dtype=w.dtype)))


def exact_target(md: str):
    """The default model through specrun's openvino backend with exact_4bit in place of nncf's int4
    (its IR and probe verdict in a temporary cache, so the user's int4 IR is untouched)."""
    import tempfile

    from specrun.plugins import load_registry

    be = load_registry(["openvino"]).get("openvino")
    B = sys.modules[type(be).__module__]  # noqa: N806 - the backend's module (tools import no plugin by name)
    saved = B._compress, B.cache_dir
    tmp = Path(tempfile.mkdtemp(prefix="ov-exact4-"))

    def compress(model, weights):
        counts = exact_4bit(model)
        if counts is None:
            raise SystemExit("the model's weights are not exactly GGUF Q4_1 / Q8_0")
        print(f"exact 4-bit: {counts}", flush=True)
        return model

    B._compress, B.cache_dir = compress, lambda: tmp
    try:
        return be.load_target(md, device="cpu", precision="int4", options={"threads": 2})
    finally:
        B._compress, B.cache_dir = saved


def whole_model(steps: int = 48, runs: int = 3) -> None:
    """1-token decode steps of the default model (prompt of 100 tokens), ms per step (median of each
    run), and the prefill logits' max abs difference from f32: f32, int8 (nncf), int4 (nncf) and
    the exact Q4_1/Q8_0 form, each with the padding its batch-invariance probe chose."""
    from specrun.models import resolve_model
    from specrun.plugins import load_registry

    be = load_registry(["openvino"]).get("openvino")
    md = str(resolve_model("smollm2-135m-instruct"))
    prompt = list(range(1000, 1100))
    ref = None
    for name in ("f32", "int8", "int4", "exact-q4_1"):
        t = exact_target(md) if name == "exact-q4_1" else be.load_target(md, device="cpu", precision=name, options={"threads": 2})
        times = []
        for _ in range(runs):
            t.reset(400)
            logits = t.forward(prompt).logits
            tok, per = int(logits[-1].argmax()), []
            for _ in range(steps):
                t0 = time.perf_counter()
                tok = int(t.forward([tok]).logits[-1].argmax())
                per.append(time.perf_counter() - t0)
            times.append(1000 * float(np.median(per)))
        ref = logits if ref is None else ref
        print(f"{name:10s} compute {t.compute_precision}, rows per call {t.ladder or 'any'} (static graphs: {t.static}): "
              f"{' / '.join(f'{x:.2f}' for x in times)} ms a step; max |logit - f32| {float(np.abs(logits - ref).max()):.3f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--model"]:
        whole_model()
    else:
        main(sys.argv[1:] or ["bf16", "f32"])
