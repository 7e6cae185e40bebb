"""Where a decoding step of specrun's openvino graph goes, beside OpenVINO GenAI's own IR of the
same model on the same runtime (issue 15: why GenAI's plain int4 decoding is faster).

For each configuration: a prompt of ``--context`` tokens is prefilled, then single-token steps are
timed (median of ``--steps``), as the whole ``Target.forward`` (specrun only), as the bare
``infer()`` call, and with OpenVINO's per-node profiling (``PERF_COUNT``) summed by node type.

* ``specrun int8`` / ``specrun int4``: the openvino backend's target (its IR, config and cache
  binding), profiled by recompiling the same IR with ``PERF_COUNT``;
* ``genai int4``: the optimum-intel export that ``specrun bench --baseline openvino-genai`` builds
  (stateful: the KV cache is a ReadValue/Assign state, SDPA fused, u8 cache by default), run as
  a plain ``ov.Core`` infer request with the same threads and hints.

    .venv/bin/python bench/ov_profile.py [--context 100] [--steps 40] [--top 12]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def by_type(request) -> tuple[float, dict[str, float]]:
    """Total and per-node-type milliseconds of the last infer (OpenVINO's profiling info)."""
    per: dict[str, float] = defaultdict(float)
    for info in request.profiling_info:
        if str(info.status).endswith("EXECUTED"):
            per[f"{info.node_type} [{info.exec_type}]"] += info.real_time.total_seconds() * 1e3
    return sum(per.values()), per


def profile(request, step, n: int) -> tuple[float, dict[str, float]]:
    totals, per_runs = [], []
    for _ in range(n):
        step()
        total, per = by_type(request)
        totals.append(total)
        per_runs.append(per)
    keys = set().union(*per_runs)
    return statistics.median(totals), {k: statistics.median(p.get(k, 0.0) for p in per_runs) for k in keys}


def timed(step, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def specrun_rows(precision: str, args, model_dir) -> None:
    from specrun.plugins import load_registry

    ids = [(i * 7919) % 40000 + 100 for i in range(args.context)]
    for prof in (False, True):
        backend = load_registry(["openvino"]).get("openvino")
        if prof:  # every graph this target compiles from now on keeps per-node times
            backend._core().set_property("CPU", {"PERF_COUNT": True})
        t = backend.load_target(str(model_dir), device="cpu", precision=precision, options={"threads": args.threads})
        t.prepare(1)
        t.reset(args.context + 64)
        t.forward(ids)
        start = t.length
        tok = [ids[-1]]

        def step(t=t, start=start, tok=tok):
            t.forward(tok)
            t.rollback(start)

        step()
        if not prof:
            print(f"specrun {precision}: static graphs {t.static}, rows per call {t.ladder or 'any'}, compute "
                  f"{t.compute_precision}; Target.forward of 1 token at {start} tokens: {timed(step, args.steps):.2f} ms")
        else:
            request = t._static[1] if t.static else t.request
            total, per = profile(request, step, args.steps)
            report(f"specrun {precision} (profiled)", total, per, args.top)


def genai_rows(args) -> None:
    import openvino as ov

    folders = sorted((Path.home() / ".cache/specrun/openvino-genai").glob("*-int4"))
    if not folders:
        print("genai: no export in ~/.cache/specrun/openvino-genai (run specrun bench --baseline openvino-genai once)")
        return
    xml = folders[0] / "openvino_model.xml"
    core = ov.Core()
    for prof in (False, True):
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": args.threads}
        if prof:
            config["PERF_COUNT"] = True
        compiled = core.compile_model(str(xml), "CPU", config)
        req = compiled.create_infer_request()
        ids = np.array([[(i * 7919) % 40000 + 100 for i in range(args.context)]], np.int64)
        req.reset_state()
        req.infer({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(args.context)[None],
                   "beam_idx": np.zeros(1, np.int32)})
        n = [args.context]

        def step(req=req, ids=ids, n=n):
            # one token on top of the cache; the state grows by a row each call (as in decoding)
            req.infer({"input_ids": ids[:, -1:], "attention_mask": np.ones((1, n[0] + 1), np.int64),
                       "position_ids": np.array([[n[0]]]), "beam_idx": np.zeros(1, np.int32)})
            n[0] += 1

        if not prof:
            print(f"genai int4: precision hint {compiled.get_property('INFERENCE_PRECISION_HINT')}, "
                  f"kv cache {compiled.get_property('KV_CACHE_PRECISION')}; infer of 1 token at "
                  f"{args.context}+ tokens: {timed(step, args.steps):.2f} ms")
        else:
            total, per = profile(req, step, args.steps)
            report("genai int4 (profiled)", total, per, args.top)


def report(name: str, total: float, per: dict[str, float], top: int) -> None:
    print(f"  {name}: sum of node times {total:.2f} ms")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {v:7.3f} ms  {100 * v / total:5.1f}%  {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--only", choices=["int8", "int4", "genai"], action="append")
    args = ap.parse_args()
    from specrun.models import resolve_model

    model_dir = resolve_model(None)
    for which in args.only or ["int8", "int4", "genai"]:
        genai_rows(args) if which == "genai" else specrun_rows(which, args, model_dir)


if __name__ == "__main__":
    main()
