"""Static against dynamic graphs on the openvino backend (issue 15): the cost of a 1-token step and
of a 5-row block at 300 tokens of context, the same target switched between its graphs compiled
for static row counts (what the load-time probe picks where they are exact) and its dynamic graph,
interleaved twice (median of 27 calls each).

    .venv/bin/python bench/ov_static.py int8 int4 f32

Measured 2026-12-07 (Intel Xeon, AVX-512 VNNI, 2 vCPUs, data stage paused), ms, two rounds:
int8 1 row 13.17 / 12.94 static vs 16.77 / 17.15 dynamic, 5 rows 18.74 / 19.06 vs 20.03 / 20.23;
int4 1 row 12.80 / 10.67 vs 14.31 / 12.85, 5 rows 15.12 / 14.27 vs 17.08 / 16.23; f32 1 row
24.40 / 25.25 vs 27.91 / 28.86, 5 rows 30.85 / 30.77 vs 33.47 / 33.78.
"""

from __future__ import annotations

import statistics
import sys
import time


def main(precisions: list[str]) -> None:
    from specrun.models import resolve_model
    from specrun.plugins import load_registry

    backend = load_registry(["openvino"]).get("openvino")
    model_dir = str(resolve_model(None))
    ids = [(i * 7919) % 40000 + 100 for i in range(300)]
    for precision in precisions:
        t0 = time.perf_counter()
        t = backend.load_target(model_dir, device="cpu", precision=precision, options={"threads": 2})
        print(f"{precision}: load {time.perf_counter() - t0:.1f} s, static graphs {t.static}, rows per call "
              f"{t.ladder or 'any'}, exact blocks {t.exact_blocks}", flush=True)
        ladder, static = t.ladder, t.static
        res: dict[tuple[bool, int], list[float]] = {}
        for mode in (True, False, True, False):
            if mode and not static:
                continue
            t.static, t.ladder = mode, ladder if mode else ()
            t.reset(400)
            t.forward(ids)
            start = t.length
            for rows in (1, 5):
                times = []
                for _ in range(30):
                    a = time.perf_counter()
                    t.forward([5] * rows)
                    times.append(time.perf_counter() - a)
                    t.rollback(start)
                res.setdefault((mode, rows), []).append(1e3 * statistics.median(times[3:]))
        for (mode, rows), v in res.items():
            print(f"  {'static' if mode else 'dynamic'} {rows} row(s): {' / '.join(f'{x:.2f}' for x in v)} ms")
        t.close()


if __name__ == "__main__":
    main(sys.argv[1:] or ["int8"])
