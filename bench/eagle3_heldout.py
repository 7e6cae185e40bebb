"""Acceptance estimates of EAGLE-3 heads, teacher-forced: on a training run's own held-out set (the
reference line for its acceptance curve) or on the target's own answers to MT-bench (issue 13).

A run of ``specrun train-draft`` estimates its head at every checkpoint on the first
``--eval-sequences`` held-out conversations (greedy chains of ``--ttt-steps`` drafts from every
answer position, the target's features at the run's precision).  This computes the same estimate
for finished heads — the shipped one, another run's export — on the same conversations, cut at the
same length, so the curve can be read against them (the held-out records are chosen by a hash of
the seed and each record's id: a head trained on an earlier, smaller set of the shards never saw
them either).

``--set mt-bench`` estimates on the target's own greedy answers (f32, the data engine: exact) to
the 80 MT-bench first turns, 256 new tokens each — what ``specrun bench --dataset mt-bench -n 256``
decodes — made once into ``--mt-bench-dir``: a minute-scale predictor of the benchmark's tokens per
call (the benchmark's chains may also stop early at ``--draft-min-prob``; use ``--ttt-steps`` = its
``-k``).  A HEAD is a head folder (SpecForge format) or a training run's ``--out`` folder (its
latest checkpoint, while it trains).

    .venv/bin/python bench/eagle3_heldout.py core/heads/smollm2-135m-instruct [HEAD ...] \\
        [--set heldout|mt-bench] [--data-dir ../eagle3-work/run512.shards] [--max-length N] [--sequences 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from specrun.errors import SpecrunError


def mtbench_records(folder: Path, model_dir: Path, threads: int) -> list[dict]:
    """The target's greedy answers (256 tokens) to the 80 MT-bench first turns, as training-data records;
    generated into ``folder`` by the data engine where missing (a minute or two on 2 cores)."""
    from specrun.models import ModelConfig
    from specrun.pipeline import load_tokenizer
    from specrun_bench.prompts import load_prompts
    from specrun_train.data import Conversation, read_shards, records_from_shards, regenerate
    from specrun_train.trainer import _torch_backend, answer_eos

    convs = [Conversation(i, [p.text]) for i, p in enumerate(load_prompts("mt-bench"))]
    done = {c["id"] for _, c in read_shards(folder)} if folder.is_dir() else set()
    todo = [c for c in convs if c.id not in done]
    if todo:
        import torch

        torch.set_num_threads(threads)
        tc = ModelConfig.load(model_dir)
        tok = load_tokenizer(model_dir, full=True)
        eos = answer_eos(tok, tc)
        engine = _torch_backend().slot_engine(model_dir, slots=16, capacity=2048, kv_dtype="f32", weights="f32")
        meta = {"target": Path(model_dir).name, "max_new_tokens": 256, "kv_cache": "f32", "weights": "f32",
                "engine": "specrun slot engine (torch), greedy", "set": "mt-bench first turns"}
        regenerate(engine, tok, iter(todo), out=folder, meta=meta, max_new_tokens=256, eos=eos,
                   vocab_size=tc.vocab_size, total_turns=len(todo), lookup=4)
    for m, _ in read_shards(folder):
        if m.get("target") != Path(model_dir).name or m.get("max_new_tokens") != 256 or m.get("weights") != "f32":
            raise SpecrunError(f"{folder} holds answers made otherwise ({m.get('target')}, {m.get('max_new_tokens')} tokens, "
                               f"{m.get('weights')} weights): give another --mt-bench-dir")
    records = records_from_shards(folder)
    if sorted(r["id"] for r in records) != [c.id for c in convs]:
        raise SpecrunError(f"{folder} does not hold exactly one answer to each of the {len(convs)} MT-bench first turns "
                           f"({len(records)} records): give another --mt-bench-dir")
    return records


def load_module(head: str, model_dir: Path):
    """(module, d2t, t2d, what, fc input scale or None) of a head folder, or of a training run's latest
    checkpoint (read again if the run replaced it meanwhile)."""
    import torch

    from specrun.eagle3 import Eagle3Checkpoint, read_safetensors, read_target_embedding
    from specrun_train.trainer import SCALE_FILE, TrainOptions, load_run_head, new_head_module

    work = Path(head) / "work"
    if (work / "latest.json").exists():  # a run folder: its vocabulary and latest checkpoint
        for attempt in range(3):  # a live run writes the next checkpoint, then deletes this one
            try:
                module, d2t, t2d, _, step, _ = load_run_head(TrainOptions(target=None, out=head), model_dir)
                break
            except SpecrunError:
                if attempt == 2:
                    raise
                time.sleep(5)
        scale = None
        if (work / SCALE_FILE).exists():  # trained on scaled fc inputs (--precondition)
            scale = torch.from_numpy(read_safetensors(work / SCALE_FILE)["scale"])
        return module, d2t, t2d, f"step {step}", scale
    ck = Eagle3Checkpoint.load(head, model_dir)
    module = new_head_module(ck.config, read_target_embedding(model_dir), 0)
    module.load_checkpoint(ck)
    return module, ck.tensors["d2t"], ck.tensors["t2d"].astype(np.bool_), "head", None


def head_estimate(head: str, records: list[dict], model_dir: Path, opts, features: Path | None) -> tuple[str, dict]:
    """(what was read, the estimate) of one head or run folder on ``records``, as the trainer's
    ``estimate`` computes it with ``opts``' length and chain (``features``: the float16 feature cache)."""
    import torch

    from specrun.models import ModelConfig
    from specrun_train.trainer import TargetRunner, estimate, target_precision

    tc = ModelConfig.load(model_dir)
    module, d2t, t2d, what, scale = load_module(head, model_dir)
    used = torch.as_tensor(np.arange(len(d2t)) + d2t)
    runner = TargetRunner(model_dir, module.cfg.aux_layers_for(tc.num_layers), "cpu", used, features, target_precision(opts))
    return what, {**estimate(module, records, runner, used, torch.as_tensor(t2d), opts, "cpu", scale),
                  "draft_vocab": len(d2t)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("heads", nargs="+", help="EAGLE-3 head folders (SpecForge format) or training runs' --out folders")
    p.add_argument("--set", choices=["heldout", "mt-bench"], default="heldout")
    p.add_argument("--data-dir", default="../eagle3-work/run512.shards", help="the run's shards (--set heldout)")
    p.add_argument("--mt-bench-dir", default="../eagle3-work/mtbench-answers", help="the target's MT-bench answers")
    p.add_argument("--features-dir", help="where the target's features are kept, rounded to float16 as a run with a "
                   "feature cache uses them [default: DATA_DIR-features, or MT_BENCH_DIR/features]")
    p.add_argument("--max-length", type=int, help="tokens per sequence [default: 512 (the run's) for heldout, 1024 "
                   "for mt-bench, where 3 of the 80 prompts and answers pass 512]")
    p.add_argument("--sequences", type=int, default=32, help="the run's --eval-sequences (--set heldout)")
    p.add_argument("--ttt-steps", type=int, default=5, help="the chain's length (the run's --ttt-steps)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from specrun.models import resolve_model
    from specrun_train.trainer import TrainOptions, load_records, split_data

    torch.set_num_threads(args.threads)
    try:
        model_dir = resolve_model(None)
        mt = args.set == "mt-bench"
        max_length = args.max_length or (1024 if mt else 512)
        features = Path(args.features_dir or (Path(args.mt_bench_dir) / "features" if mt else args.data_dir.rstrip("/") + "-features"))
        opts = TrainOptions(target=None, out="-", data_dir=args.data_dir, max_length=max_length, ttt_steps=args.ttt_steps)
        if mt:
            records = mtbench_records(Path(args.mt_bench_dir), model_dir, args.threads)
        else:
            _, records = split_data(load_records(opts), opts.val_fraction, opts.seed)
            records = records[: args.sequences]
        if not records:
            raise SpecrunError(f"no held-out conversations in {args.data_dir}")
        for head in args.heads:
            t0 = time.perf_counter()
            what, point = head_estimate(head, records, model_dir, opts, features)
            print(f"{head} ({what}): {args.set} acceptance length {point['acceptance_length']:.3f} (chains of "
                  f"{args.ttt_steps}; step accuracies {', '.join(f'{a:.3f}' for a in point['accuracy'])}; "
                  f"{point['sequences']} conversations, {point['positions']} positions, {max_length} tokens, "
                  f"draft vocabulary {point['draft_vocab']}; {time.perf_counter() - t0:.0f} s)", flush=True)
    except SpecrunError as exc:
        sys.exit(f"eagle3_heldout: {exc}")


if __name__ == "__main__":
    main()
