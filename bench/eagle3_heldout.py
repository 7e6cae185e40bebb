"""Held-out acceptance estimate of trained EAGLE-3 heads on a training run's own evaluation set
(issue 13): the reference line for a run's acceptance curve.

A run of ``specrun train-draft`` estimates its head at every checkpoint on the first
``--eval-sequences`` held-out conversations (greedy chains of ``--ttt-steps`` drafts from every
answer position, the target's features at the run's precision).  This computes the same estimate
for finished heads — the shipped one, another run's export — on the same conversations, cut at the
same length, so the curve can be read against them (the held-out records are chosen by a hash of
the seed and each record's id: a head trained on an earlier, smaller set of the shards never saw
them either).

    .venv/bin/python bench/eagle3_heldout.py core/heads/smollm2-135m-instruct [HEAD ...] \\
        [--data-dir ../eagle3-work/run512.shards] [--max-length 512] [--sequences 32]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("heads", nargs="+", help="EAGLE-3 head folders (SpecForge format) for the default model")
    p.add_argument("--data-dir", default="../eagle3-work/run512.shards", help="the run's shards")
    p.add_argument("--max-length", type=int, default=512, help="the run's --max-length")
    p.add_argument("--sequences", type=int, default=32, help="the run's --eval-sequences")
    p.add_argument("--ttt-steps", type=int, default=5, help="the run's --ttt-steps (the chain's length)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from specrun.eagle3 import Eagle3Checkpoint, read_target_embedding
    from specrun.errors import SpecrunError
    from specrun.models import ModelConfig, resolve_model
    from specrun_train.trainer import (
        TargetRunner,
        TrainOptions,
        estimate,
        load_records,
        new_head_module,
        split_data,
        target_precision,
    )

    torch.set_num_threads(args.threads)
    try:
        model_dir = resolve_model(None)
        tc = ModelConfig.load(model_dir)
        opts = TrainOptions(target=None, out="-", data_dir=args.data_dir, max_length=args.max_length,
                            ttt_steps=args.ttt_steps, cache_target=False)
        _, held = split_data(load_records(opts), opts.val_fraction, opts.seed)
        held = held[: args.sequences]
        if not held:
            raise SpecrunError(f"no held-out conversations in {args.data_dir}")
        for head in args.heads:
            t0 = time.perf_counter()
            ck = Eagle3Checkpoint.load(head, model_dir)
            module = new_head_module(ck.config, read_target_embedding(model_dir), opts.seed)
            module.load_checkpoint(ck)
            d2t, t2d = ck.tensors["d2t"], ck.tensors["t2d"].astype(np.bool_)
            used = torch.as_tensor(np.arange(len(d2t)) + d2t)
            runner = TargetRunner(model_dir, ck.config.aux_layers_for(tc.num_layers), "cpu", used, None,
                                  target_precision(opts))
            point = estimate(module, held, runner, used, torch.as_tensor(t2d), opts, "cpu")
            print(f"{head}: held-out acceptance length {point['acceptance_length']:.3f} (step accuracies "
                  f"{', '.join(f'{a:.3f}' for a in point['accuracy'])}; {point['sequences']} conversations, "
                  f"{point['positions']} positions, {args.max_length} tokens, draft vocabulary {len(d2t)}; "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
    except SpecrunError as exc:
        sys.exit(f"eagle3_heldout: {exc}")


if __name__ == "__main__":
    main()
