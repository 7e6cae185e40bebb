"""Step costs and decoding speed of the onnx_cpu backend on the default model, side by side.

    .venv/bin/python bench/onnx_cpu_steps.py                 # onnx f32 (+ the bind-whole-capacity ablation)
    .venv/bin/python bench/onnx_cpu_steps.py --int8 --torch  # also int8 and the torch_cuda CPU reference
    .venv/bin/python bench/onnx_cpu_steps.py --cli           # also `specrun generate` start-up: first token, peak RSS

Prints, per configuration: the cost of a 1-token step and of a 5-token verification block at 100
and at 1,500 tokens of context (median of interleaved repetitions; the cache is filled once and
moved with rollback), the ratios the issue asks about, and plain / n-gram speculative greedy
decoding speed (128 new tokens, EOS ignored).  The machine is shared: run it when it is quiet,
and compare columns of the same run rather than runs.
"""

from __future__ import annotations

import argparse
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


def load_targets(args, model_dir):
    from specrun.plugins import load_registry

    reg = load_registry()
    opts = {"threads": args.threads}
    out = {}
    onnx = reg.get("onnx_cpu")
    out["onnx f32"] = onnx.load_target(str(model_dir), device="cpu", precision="f32", options=opts)
    if not args.no_ablation:
        t = onnx.load_target(str(model_dir), device="cpu", precision="f32", options=opts)
        t.bind_capacity = True
        out["onnx f32, whole-capacity binding"] = t
    if args.int8:
        out["onnx int8"] = onnx.load_target(str(model_dir), device="cpu", precision="int8", options=opts)
    if args.torch:
        out["torch_cuda cpu f32"] = reg.get("torch_cuda").load_target(str(model_dir), device="cpu", options=opts)
    return out


def step_costs(targets: dict, reps: int, capacity: int = 2048) -> dict:
    rng = np.random.default_rng(0)
    context = rng.integers(100, 40000, 1500).tolist()
    for t in targets.values():
        t.reset(capacity)
        t.forward(context, all_logits=False)
    cases = [(1, 1500), (5, 1500), (1, 100), (5, 100)]
    times: dict = {(name, c): [] for name in targets for c in cases}
    for rep in range(reps + 1):  # the first round warms up
        for name, t in targets.items():
            for T, ctx in cases:
                # Timing only: rows 0..1499 stay in the buffers, so a short context is a rollback
                # and the long one is restored by moving the length back (the few rows the short
                # steps overwrote hold other tokens' keys, which changes no cost).
                t._len = ctx
                block = context[ctx : ctx + T] if ctx + T <= len(context) else [7] * T
                t0 = time.perf_counter()
                t.forward(block)
                dt = time.perf_counter() - t0
                if rep:
                    times[(name, (T, ctx))].append(dt)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def decode_speed(target, ids: list[int], drafter: str, new_tokens: int) -> tuple[float, float]:
    from specrun.decode import SpeculativeDecoder
    from specrun.drafters import NgramDrafter, NoDrafter

    d = NoDrafter() if drafter == "none" else NgramDrafter()
    dec = SpeculativeDecoder(target, d, 4)
    for _ in dec.generate(ids, new_tokens, None, eos_token_ids=()):
        pass
    return dec.stats.tokens_per_second, dec.stats.acceptance_length


def cli_startup(args) -> str:
    """Time from process start to the first streamed character, and peak RSS (/usr/bin/time -v)."""
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv/bin/specrun"), "generate", PROMPT, "--backend", "onnx_cpu",
           "--threads", str(args.threads), "-n", "32"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = None
    while p.stdout.read(1):
        if first is None:
            first = time.perf_counter() - t0
    err = p.stderr.read().decode()
    p.wait()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    summary = next((line for line in err.splitlines() if line.startswith("[onnx_cpu")), "")
    first_s = f"{first:.2f} s" if first is not None else "n/a"
    rss_s = f"{int(rss.group(1)) / 1024:.0f} MB" if rss else "n/a"
    return f"specrun generate --backend onnx_cpu: first token {first_s} after process start, peak RSS {rss_s}\n  {summary}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--int8", action="store_true", help="also the int8 export")
    ap.add_argument("--torch", action="store_true", help="also torch_cuda on CPU (the reference)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the whole-capacity binding ablation")
    ap.add_argument("--cli", action="store_true", help="also time `specrun generate` start-up in a subprocess")
    args = ap.parse_args()

    from specrun.models import resolve_model
    from specrun.pipeline import load_tokenizer

    model_dir = resolve_model(None)
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    targets = load_targets(args, model_dir)

    costs = step_costs(targets, args.reps)
    speeds = {}
    for name, t in targets.items():
        if "whole-capacity" in name:
            continue
        plain, _ = decode_speed(t, ids, "none", args.new_tokens)
        spec, acc = decode_speed(t, ids, "ngram", args.new_tokens)
        speeds[name] = (plain, spec, acc)

    names = list(targets)
    w = max(len(n) for n in names) + 2
    print(f"SmolLM2-135M-Instruct, {args.threads} threads, step cost = median of {args.reps} (ms)")
    head = ["1 tok @100", "5 tok @100", "1 tok @1500", "5 tok @1500", "5/1 @100", "1500/100", "plain tok/s", "ngram tok/s (acc)"]
    print(" " * w + "".join(f"{h:>14}" for h in head[:6]) + f"{head[6]:>13}{head[7]:>20}")
    for n in names:
        c = [costs[(n, k)] for k in ((1, 100), (5, 100), (1, 1500), (5, 1500))]
        row = f"{n:<{w}}" + "".join(f"{x:14.1f}" for x in c) + f"{c[1] / c[0]:14.2f}{c[2] / c[0]:14.2f}"
        if n in speeds:
            plain, spec, acc = speeds[n]
            row += f"{plain:13.1f}{spec:14.1f} ({acc:.2f})"
        print(row)
    print("targets: plain >= 40 tok/s (f32, 2 threads); 5-token block <= 1.3x a 1-token step; step @1500 <= 1.5x step @100")
    if args.cli:
        for t in targets.values():
            t.close()
        targets.clear()
        print(cli_startup(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
