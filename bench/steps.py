"""Step costs and decoding speed of the CPU backends on the default model, side by side.

    .venv/bin/python bench/steps.py                            # onnx f32 (+ the bind-whole-capacity ablation)
    .venv/bin/python bench/steps.py --int8 --torch             # also onnx int8 and the torch_cuda CPU reference
    .venv/bin/python bench/steps.py --openvino --no-ablation   # also openvino at bf16 (its default here) and f32
    .venv/bin/python bench/steps.py --cli                      # also `specrun generate` start-up: first token, peak RSS
    .venv/bin/python bench/steps.py --no-onnx --no-ablation --openvino --int8 --llama-cpp --blocks 1,2,3,4,5,8
                                                               # cost by block size, every CPU backend's weight formats

Prints, per configuration: the cost of a 1-token step and of a 5-token verification block at 100
and at 1,500 tokens of context (median of interleaved repetitions; the cache is filled once and
moved with rollback), the ratios the issue asks about, and plain / n-gram speculative greedy
decoding speed (128 new tokens, EOS ignored).  Each configuration runs in its own process, one
after the other (thread pools of two runtimes in one process compete).  The machine is shared: run it when it is quiet,
and compare columns of the same run rather than runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "Rewrite this sentence with one word changed: the quick brown fox jumps over the lazy dog."
ROOT = Path(__file__).resolve().parents[1]


CONFIGS = {
    "onnx f32": ("onnx_cpu", "f32", False),
    "onnx f32, whole-capacity binding": ("onnx_cpu", "f32", True),
    "onnx int8": ("onnx_cpu", "int8", False),
    "torch_cuda cpu f32": ("torch_cuda", "f32", False),
    "openvino bf16": ("openvino", "bf16", False),
    "openvino f32": ("openvino", "f32", False),
    "openvino int8": ("openvino", "int8", False),
    "openvino int4": ("openvino", "int4", False),
    "llama_cpp int4": ("llama_cpp", "int4", False),
    "llama_cpp int8": ("llama_cpp", "int8", False),
}


def load_target(name: str, threads: int, model_dir):
    from specrun.plugins import load_registry

    backend, precision, whole = CONFIGS[name]
    t = load_registry([backend]).get(backend).load_target(str(model_dir), device="cpu", precision=precision,
                                                          options={"threads": threads})
    if backend == "onnx_cpu":
        t.bind_capacity = whole
    return t


def _cpu_busy(interval: float) -> float:
    """Fraction of the machine's CPU time spent busy over ``interval`` (we sleep meanwhile)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
        return sum(v), v[3] + v[4]

    try:
        t1, i1 = sample()
        time.sleep(interval)
        t2, i2 = sample()
    except OSError:
        return 0.0
    return 1 - (i2 - i1) / max(1, t2 - t1)


def wait_quiet(max_wait: float = 60.0, threshold: float = 0.15) -> bool:
    """Wait (at most ``max_wait`` s) until other processes leave the CPUs idle: the machine is shared."""
    end = time.monotonic() + max_wait
    while time.monotonic() < end:
        if _cpu_busy(0.3) < threshold:
            return True
    return False


def step_costs(targets: dict, reps: int, capacity: int = 2048, blocks: tuple[int, ...] = (1, 5)) -> dict:
    """Min and median cost (ms) of each (T, context) case.  Per context the cache is filled once
    (a fresh reset, so buffers sized by use are sized for that context); each timed block is
    rolled back; the block sizes are interleaved over repetitions."""
    rng = np.random.default_rng(0)
    context = rng.integers(100, 40000, 1500).tolist()
    times: dict = {}
    for ctx in (1500, 100):
        for t in targets.values():
            t.reset(capacity)
            t.forward(context[:ctx], all_logits=False)
        for rep in range(reps + 1):  # the first round warms up
            wait_quiet()
            for t in targets.values():  # threads that slept while we waited for quiet: wake them
                for _ in range(2):
                    t.forward([7])
                    t.rollback(ctx)
            for name, t in targets.items():
                for T in blocks:
                    block = [int(x) for x in rng.integers(100, 40000, T)]
                    t0 = time.perf_counter()
                    t.forward(block)
                    dt = time.perf_counter() - t0
                    t.rollback(ctx)
                    if rep:
                        times.setdefault((name, (T, ctx)), []).append(dt)
    return {k: (min(v) * 1e3, statistics.median(v) * 1e3) for k, v in times.items()}


def decode_speed(target, ids: list[int], drafter: str, new_tokens: int) -> tuple[float, float]:
    from specrun.decode import SpeculativeDecoder
    from specrun.drafters import NgramDrafter, NoDrafter

    best = (0.0, 0.0)
    for _ in range(3):  # best of 3 quiet-started runs: other jobs on a shared machine only slow it down
        wait_quiet()
        dec = SpeculativeDecoder(target, NoDrafter() if drafter == "none" else NgramDrafter(), 4)
        for _ in dec.generate(ids, new_tokens, None, eos_token_ids=()):
            pass
        best = max(best, (dec.stats.tokens_per_second, dec.stats.acceptance_length))
    return best


def cli_startup(args, backend: str) -> str:
    """Time from process start to the first streamed character, and peak RSS (/usr/bin/time -v)."""
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv/bin/specrun"), "generate", PROMPT, "--backend", backend,
           "--threads", str(args.threads), "-n", "32", "--drafter", "ngram"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = None
    while p.stdout.read(1):
        if first is None:
            first = time.perf_counter() - t0
    err = p.stderr.read().decode()
    p.wait()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    summary = next((line for line in err.splitlines() if line.startswith(f"[{backend}")), "")
    first_s = f"{first:.2f} s" if first is not None else "n/a"
    rss_s = f"{int(rss.group(1)) / 1024:.0f} MB" if rss else "n/a"
    return f"specrun generate --backend {backend}: first token {first_s} after process start, peak RSS {rss_s}\n  {summary}"


def measure(name: str, args, model_dir, ids) -> dict:
    """One configuration, in this process (the parent runs each in its own process so that
    thread pools of different runtimes never compete)."""
    t = load_target(name, args.threads, model_dir)
    costs = step_costs({name: t}, args.reps, blocks=args.blocks)
    out = {"costs": {f"{T}@{ctx}": v[0] for (_, (T, ctx)), v in costs.items()},
           "medians": {f"{T}@{ctx}": v[1] for (_, (T, ctx)), v in costs.items()}}
    if "whole-capacity" not in name:
        plain, _ = decode_speed(t, ids, "none", args.new_tokens)
        spec, acc = decode_speed(t, ids, "ngram", args.new_tokens)
        out["decode"] = [plain, spec, acc]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--blocks", type=lambda v: tuple(sorted({1, 5, *map(int, v.split(","))})), default=(1, 5),
                    help="verification block sizes to time, e.g. 1,2,3,4,5,6 (1 and 5 always): a table of cost by k")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--int8", action="store_true", help="also the int8 export (with --openvino: int8 and int4 weights)")
    ap.add_argument("--torch", action="store_true", help="also torch_cuda on CPU (the reference)")
    ap.add_argument("--openvino", action="store_true", help="also openvino at bf16 and f32")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama_cpp at int4 (Q4_1) and int8 (Q8_0)")
    ap.add_argument("--no-onnx", action="store_true", help="skip onnx f32")
    ap.add_argument("--no-ablation", action="store_true", help="skip the whole-capacity binding ablation")
    ap.add_argument("--cli", action="store_true", help="also time `specrun generate` start-up in a subprocess")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: measure one configuration, print JSON
    args = ap.parse_args()

    from specrun.models import resolve_model
    from specrun.pipeline import load_tokenizer

    model_dir = resolve_model(None)
    if args.only:
        tok = load_tokenizer(model_dir)
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        from specrun.plugins import load_registry

        backend, precision, _ = CONFIGS[args.only]
        supported = load_registry([backend]).get(backend).precisions("cpu")
        if precision not in supported:  # e.g. bf16 on a CPU without bf16 units: the table goes on without it
            result = {"skipped": f"{backend} cannot run {precision} on this CPU (it can: {', '.join(supported)})"}
        else:
            result = measure(args.only, args, model_dir, ids)
        print("RESULT " + json.dumps(result))
        return

    names = ([] if args.no_onnx else ["onnx f32"]) + ([] if args.no_ablation else ["onnx f32, whole-capacity binding"])
    names += ["openvino bf16", "openvino f32"] if args.openvino else []
    names += ["openvino int8", "openvino int4"] if args.openvino and args.int8 else []
    names += (["onnx int8"] if args.int8 else []) + (["torch_cuda cpu f32"] if args.torch else [])
    names += ["llama_cpp int4", "llama_cpp int8"] if args.llama_cpp else []
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--only", name, "--threads", str(args.threads), "--reps", str(args.reps),
               "--new-tokens", str(args.new_tokens), "--blocks", ",".join(map(str, args.blocks))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        results[name] = json.loads(line[len("RESULT "):])
        if "skipped" in results[name]:
            print(f"{name}: skipped ({results.pop(name)['skipped']})")
    names = [n for n in names if n in results]
    if not names:
        sys.exit("no configuration to measure on this machine")

    w = max(len(n) for n in names) + 2
    print(f"SmolLM2-135M-Instruct, {args.threads} threads, one process per row; step cost (ms) = best of {args.reps} "
          "interleaved repetitions, each started on idle CPUs (medians below); decoding: best of 3 runs")
    head = ["1 tok @100", "5 tok @100", "1 tok @1500", "5 tok @1500", "5/1 @100", "1500/100", "plain tok/s", "ngram tok/s (acc)"]
    print(" " * w + "".join(f"{h:>13}" for h in head[:6]) + f"{head[6]:>13}{head[7]:>20}")
    for n in names:
        r = results[n]
        c = [r["costs"][k] for k in ("1@100", "5@100", "1@1500", "5@1500")]
        row = f"{n:<{w}}" + "".join(f"{x:13.1f}" for x in c) + f"{c[1] / c[0]:13.2f}{c[2] / c[0]:13.2f}"
        if "decode" in r:
            plain, spec, acc = r["decode"]
            row += f"{plain:13.1f}{spec:13.1f} ({acc:.2f})"
        print(row)
    for n in names:
        med = results[n]["medians"]
        print(f"  medians, {n}: " + ", ".join(f"{k.replace('@', ' tok @')} {v:.1f}" for k, v in med.items()))
    if args.blocks != (1, 5):
        print("verification block cost by k, relative to a 1-token step at the same context (best of reps):")
        for ctx in (100, 1500):
            print(f"{'@' + str(ctx):<{w}}" + "".join(f"{'k=' + str(T):>9}" for T in args.blocks))
            for n in names:
                c = results[n]["costs"]
                print(f"{n:<{w}}" + "".join(f"{c[f'{T}@{ctx}'] / c[f'1@{ctx}']:9.2f}" for T in args.blocks))
    print("targets: plain >= 40 tok/s (f32, 2 threads); 5-token block <= 1.3x a 1-token step; step @1500 <= 1.5x step @100")
    if args.cli:
        for backend in ["onnx_cpu"] + (["openvino"] if args.openvino else []):
            print(cli_startup(args, backend))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
