"""How far OpenVINO 4-bit forms of the default model stray from its f32 form (issue 15: openvino's
int4 is fast but degenerates), and what a step costs in each.

The f32 openvino target decodes 64 greedy tokens after each of the first 16 MT-bench questions
(chat template); every candidate is then teacher-forced on those sequences (one block per
question) and scored by the share of positions where its greedy choice equals f32's next token.
Candidates: specrun's int8 and int4 (nncf INT4_SYM, groups of 64) and nncf INT4_ASYM with groups
of 32 — the GGUF's own block size, so each group's values are d * q + m of the model's Q4_1 file
and only the zero point -m/d is rounded to an integer (every weight of a group moves by the same
amount, at most d/2).  Step: median ms of a 1-token step at 300 tokens of context.

    .venv/bin/python bench/ov_int4_agreement.py

Measured 2026-12-07 (Intel Xeon, AVX-512 VNNI, 2 vCPUs, data stage paused), agreement with f32:
int8 95.0% (973/1024), int4 66.8% (684/1024), int4 asym groups of 32 69.5% (712/1024) — rounding
the zero point costs as much as nncf's symmetric re-quantization; llama.cpp's own Q4_1 kernels agree
96.7% (an ad-hoc run of the earlier session, same questions).  Steps 14.5 / 14.8 / 16.2 ms in a
noisy run (the 4-bit forms are not faster than int8 here either).  So no OpenVINO 4-bit form of this
model is both fast and faithful: the exact Q4_1 form (``bench/ov_int4_forms.py --model``) is
faithful and slower than int8.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from specrun.models import resolve_model
    from specrun.plugins import load_registry
    from specrun.tokenizer import load_tokenizer
    from specrun_bench.prompts import load_prompts

    be = load_registry(["openvino"]).get("openvino")
    B = sys.modules[type(be).__module__]  # noqa: N806 - the backend's module
    md = str(resolve_model(None))
    tok = load_tokenizer(md)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False)
               for p in load_prompts("mt-bench", 16)]
    ref = be.load_target(md, device="cpu", precision="f32", options={"threads": 2})
    seqs = []
    for ids in prompts:
        ref.reset(len(ids) + 80)
        nxt = int(ref.forward(ids, all_logits=False).logits[-1].argmax())
        out = [nxt]
        for _ in range(63):
            out.append(int(ref.forward([out[-1]]).logits[0].argmax()))
        seqs.append((ids, out))
    ref.close()

    def asym32(model, weights):
        import nncf

        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=32, ratio=1.0)

    for name in ("int8", "int4", "int4-asym-g32"):
        if name == "int4-asym-g32":
            saved = B._compress, B.cache_dir
            tmp = Path(tempfile.mkdtemp(prefix="ov-asym32-"))
            B._compress, B.cache_dir = asym32, (lambda tmp=tmp: tmp)
            try:
                t = be.load_target(md, device="cpu", precision="int4", options={"threads": 2})
            finally:
                B._compress, B.cache_dir = saved
        else:
            t = be.load_target(md, device="cpu", precision=name, options={"threads": 2})
        agree = total = 0
        for ids, out in seqs:
            t.reset(len(ids) + 80)
            t.forward(ids[:-1])
            logits = t.forward([ids[-1], *out[:-1]]).logits  # row i predicts out[i]
            agree += int((logits.argmax(-1) == np.array(out)).sum())
            total += len(out)
        ctx = [(i * 7919) % 40000 + 100 for i in range(300)]
        t.prepare(1)
        t.reset(400)
        t.forward(ctx)
        times = []
        for _ in range(40):
            a = time.perf_counter()
            t.forward([5])
            times.append(time.perf_counter() - a)
            t.rollback(300)
        print(f"{name:14s} agreement with f32's greedy tokens {agree / total:.1%} ({agree}/{total}); "
              f"1-token step at 300 tokens {1e3 * statistics.median(times[5:]):.2f} ms; static graphs {t.static}, "
              f"exact blocks {t.exact_blocks}", flush=True)
        t.close()


if __name__ == "__main__":
    main()
