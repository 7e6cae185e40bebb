"""specrun train-draft: the training-time test against the inference head, the data readers,
and the four stages end to end on a tiny target (loss goes down, resume reproduces the
uninterrupted run, the exported head loads back bit-identically and decodes losslessly)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from specrun.drafters import Eagle3Drafter
from specrun.eagle3 import Eagle3Checkpoint, read_safetensors
from specrun_kit.headfile import save_head
from specrun_train.trainer import (
    TrainOptions,
    batch_indices,
    jsonl_prompts,
    load_records,
    lr_at,
    sharegpt_prompts,
    train,
)

from .test_eagle3 import make_head


def test_ttt_equals_chain_drafting_with_the_inference_head(tmp_path, tiny_models, torch_backend):
    """Step i of the training-time test at position t == the i-th chain draft step after the final
    entries 0..t, fed with the real next tokens (what greedy acceptance would feed)."""
    from specrun_kit.torch_eagle3 import Eagle3Module

    hd = make_head(tmp_path / "h", seed=9)
    ck = Eagle3Checkpoint.load(hd, tiny_models["llama"])
    module = Eagle3Module(ck.config)
    module.load_checkpoint(ck)
    head = torch_backend.load_eagle3_head(str(hd), str(tiny_models["llama"]), device="cpu")
    rng = np.random.default_rng(1)
    S, steps = 10, 3
    seq = [int(t) for t in rng.integers(0, 49152, S + 1)]  # ids[t] = token t+1
    hidden = rng.normal(size=(S, 3 * 64)).astype(np.float32)
    with torch.no_grad():
        outs = module.ttt(torch.tensor([seq[1:]]), torch.from_numpy(hidden)[None], torch.ones(1, S, dtype=torch.bool), steps)
    for t in range(S - steps):
        head.reset(32)
        o = head.forward(seq[1 : t + 2], hidden[: t + 1])
        assert np.abs(o.logits[-1] - outs[0][0, t].numpy()).max() < 1e-3
        h = o.hidden[-1]
        for i in range(1, steps):
            o = head.forward([seq[t + 1 + i]], h[None], from_target=False)
            h = o.hidden[-1]
            assert np.abs(o.logits[-1] - outs[i][0, t].numpy()).max() < 1e-3, (t, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ttt_flash_attention_equals_the_materialized_scores(dtype):
    """The CPU training-time test merges PyTorch's flash attention with the diagonal terms through
    its log-sum-exp, with a hand-written backward: output and gradients on valid rows equal the
    full-score computation (right padding included)."""
    from specrun_kit.torch_eagle3 import ttt_attention, ttt_attention_reference

    g = torch.Generator().manual_seed(3)
    B, H, S, D, steps = 2, 3, 29, 16, 4
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, 21:] = False
    leaves = [torch.randn(B, H, S, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(2 * steps + 1)]
    q, k0, v0 = leaves[:3]
    diag_k, diag_v = leaves[3 : 3 + steps - 1], leaves[3 + steps - 1 :]
    weight = torch.randn(B, H, S, D, generator=g) * valid[:, None, :, None]  # loss on valid rows only
    grads, outs = [], []
    for fn in (ttt_attention, ttt_attention_reference):
        for t in leaves:
            t.grad = None
        o = fn(q, k0, v0, diag_k, diag_v, valid, 0.3)
        (o.float() * weight).sum().backward()
        outs.append(o.float() * valid[:, None, :, None])
        grads.append([t.grad.float() for t in leaves])
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (outs[0] - outs[1]).abs().max() < tol
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() < tol * max(1.0, b.abs().max().item())
    assert grads[0][0].abs().max() > 0.01  # the queries got a gradient at all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_soft_cross_entropy_equals_log_softmax(dtype):
    """The fused loss (chunks of rows, gradient made in the forward) equals
    -sum(p * log_softmax(z)) and its autograd gradient; hits are the rows whose argmax is best."""
    from specrun_train.trainer import _soft_cross_entropy

    g = torch.Generator().manual_seed(5)
    N, V = 77, 301  # more rows than one chunk, a ragged last chunk
    z = (torch.randn(N, V, generator=g) * 3).to(dtype).requires_grad_(True)
    p = torch.softmax(torch.randn(N, V, generator=g) * 2, dim=-1)
    best = p.argmax(-1)
    best[:40] = z.detach().float().argmax(-1)[:40]
    loss, hits = _soft_cross_entropy(z, p, best)
    (0.7 * loss).backward()
    fused = z.grad.float().clone()
    z.grad = None
    ref = -(p * torch.log_softmax(z.float(), dim=-1)).sum()
    (0.7 * ref).backward()
    assert abs(loss.item() - ref.item()) < 1e-3 * abs(ref.item())
    assert (fused - z.grad.float()).abs().max() < (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(hits, z.float().argmax(-1) == best)
    with torch.no_grad():  # evaluation takes the same pass without building a gradient
        loss_eval, hits_eval = _soft_cross_entropy(z, p, best)
    assert loss_eval.item() == loss.item() and torch.equal(hits_eval, hits)
    assert 0 < int(hits.sum()) < N or N < 2  # some rows hit, some do not: the comparison is real


def test_sharegpt_reader_survives_the_truncated_file(tmp_path):
    conv = [
        {"id": "a", "conversations": [{"from": "human", "value": "first"}, {"from": "gpt", "value": "x"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "starts with the model"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "second"}]},
    ]
    text = json.dumps(conv)
    cut = text[: text.rindex('"second"') + 3]  # cut mid-record, as the packaged file is
    f = tmp_path / "sg.json"
    f.write_text(cut)
    assert list(sharegpt_prompts(path=f)) == ["first"]
    f.write_text(text)
    assert list(sharegpt_prompts(path=f)) == ["first", "second"]
    assert list(sharegpt_prompts(1, path=f)) == ["first"]


def test_jsonl_prompts_and_bad_lines(tmp_path):
    from specrun.errors import SpecrunError

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"turns": ["b", "b2"]}\n"c"\n{"messages": [{"role": "user", "content": "d"}]}\n\n')
    assert list(jsonl_prompts(f)) == ["a", "b", "c", "d"]
    f.write_text('{"prompt": "a"}\n{"nothing": 1}\n')
    with pytest.raises(SpecrunError, match="p.jsonl:2: no prompt field"):
        list(jsonl_prompts(f))
    with pytest.raises(SpecrunError, match="does not exist"):
        list(jsonl_prompts(tmp_path / "none.jsonl"))


def test_data_fractions_are_nested_and_keep_the_held_out_records():
    from specrun_train.trainer import data_subset, split_data

    records = [{"id": f"c{i}", "input_ids": [1, 2, 3]} for i in range(2000)]
    train_recs, val = split_data(records, 0.05, 0)
    quarter, half = data_subset(train_recs, 0.25, 0), data_subset(train_recs, 0.5, 0)
    assert {r["id"] for r in quarter} < {r["id"] for r in half} < {r["id"] for r in train_recs}
    assert 0.2 < len(quarter) / len(train_recs) < 0.3 and 0.45 < len(half) / len(train_recs) < 0.55
    assert data_subset(train_recs, 1.0, 0) == train_recs
    assert not {r["id"] for r in half} & {r["id"] for r in val}


def test_data_fraction_out_of_range_is_one_line(tmp_path):
    from click.testing import CliRunner

    from specrun.cli import main

    r = CliRunner().invoke(main, ["train-draft", "--out", str(tmp_path / "o"), "--data-fraction", "0"])
    assert r.exit_code == 2 and "--data-fraction must be in (0, 1]" in r.stderr


def test_schedule_and_batches_are_functions_of_the_step():
    assert lr_at(0, 200, 1e-4, 0.015) == pytest.approx(1e-4 / 3)
    assert lr_at(2, 200, 1e-4, 0.015) == pytest.approx(1e-4)
    assert lr_at(199, 200, 1e-4, 0.015) < 1e-6
    assert batch_indices(3, 4, 10, 0) == batch_indices(3, 4, 10, 0)
    seen = [i for s in range(5) for i in batch_indices(s, 2, 10, 0)]
    assert sorted(seen) == list(range(10))  # one epoch covers every item once


def test_validation_split_is_stable_when_data_grows():
    """Resuming after the data stage added records must not move a record between the sets."""
    from specrun_train.trainer import split_data

    records = [{"id": i} for i in range(2000)]
    train_a, val_a = split_data(records[:600], 0.05, 0)
    train_b, val_b = split_data(records, 0.05, 0)
    ids = lambda rs: {r["id"] for r in rs}  # noqa: E731
    assert ids(val_a) <= ids(val_b) and ids(train_a) <= ids(train_b)
    assert ids(val_b).isdisjoint(ids(train_b)) and len(val_b) + len(train_b) == 2000
    assert 60 < len(val_b) < 140  # ~5%
    assert ids(split_data(records, 0.05, 1)[1]) != ids(val_b)  # the seed picks another set
    assert [len(x) for x in split_data(records[:2], 0.05, 0)] == [1, 1]  # tiny data: one of each


def copy_data(src, dst):
    """The data and vocabulary stages' output of one run, for another."""
    shutil.copytree(src / "work" / "shards", dst / "work" / "shards")
    shutil.copy(src / "work" / "vocab.safetensors", dst / "work" / "vocab.safetensors")


def test_train_draft_end_to_end_and_resume(tmp_path, tiny_models, torch_backend):
    from click.testing import CliRunner

    from specrun.cli import main

    target = str(tiny_models["llama"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in ("cats", "rain", "maps", "tea", "jazz")))
    out = tmp_path / "head"
    args = ["train-draft", "--target", target, "--out", str(out), "--data", str(prompts), "--num-prompts", "5",
            "--max-new-tokens", "10", "--gen-batch-size", "5", "--batch-size", "2", "--draft-vocab-size", "200",
            "--ttt-steps", "2", "--lr", "5e-3", "--save-every", "4", "--quiet",
            "--data-weights", "f32"]  # the answers the f32 target below replays (tiny random models: near-ties)
    r = CliRunner().invoke(main, [*args, "--steps", "16"])
    assert r.exit_code == 0, (r.output, r.exception)
    summary = json.loads(r.stdout)
    assert summary["step"] == 16 and 1.0 <= summary["acceptance_length_estimate"] <= 3.0
    records = load_records(TrainOptions(target=target, out=str(out)))
    assert sorted(rec["id"] for rec in records) == [0, 1, 2, 3, 4]
    assert all(len(rec["input_ids"]) > rec["prompt_len"] for rec in records)
    assert len(list((out / "work" / "target-cache").glob("*.safetensors"))) == 5  # 4 train + 1 validation
    losses = json.loads((out / "specrun-train.json").read_text())["losses"]
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4])

    # the head loads back (SpecForge format) and equals the last checkpoint bit for bit
    ck = Eagle3Checkpoint.load(out, target)
    assert ck.config.draft_vocab_size == 200 and ck.config.vocab_size == 49152
    state = read_safetensors(next((out / "work").glob("ckpt-*")) / "state.safetensors")
    for name, t in ck.tensors.items():
        if name not in ("d2t", "t2d"):
            assert np.array_equal(t, state[f"model.{name}"]), name
    save_head(ck, tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    # a rerun without --resume is refused; stopping at step 8 and resuming reproduces step 16 exactly
    again = CliRunner().invoke(main, [*args, "--steps", "16"])
    assert again.exit_code == 2 and "--resume" in again.stderr
    part = tmp_path / "part"
    (part / "work").mkdir(parents=True)
    copy_data(out, part)
    opts = TrainOptions(target=target, out=str(part), batch_size=2, ttt_steps=2, lr=5e-3, save_every=4, quiet=True,
                        steps=16, stop_at=8)
    assert len(train(opts, tiny_models["llama"])["losses"]) == 8
    opts.stop_at, opts.resume = None, True
    resumed = train(opts, tiny_models["llama"])
    assert resumed["losses"] == losses  # the first 8 come from the checkpoint, the rest recomputed
    a = read_safetensors(next((part / "work").glob("ckpt-*")) / "state.safetensors")
    assert set(a) == set(state) and all(np.array_equal(a[k], state[k]) for k in state)

    # --init-from-target (default): before any update, lm_head holds the target's rows of the draft
    # vocabulary and norm its final norm; --random-init does not
    from pathlib import Path

    vocab = read_safetensors(out / "work" / "vocab.safetensors")
    used = np.arange(len(vocab["d2t"])) + vocab["d2t"]
    tw = {}
    for f in Path(target).glob("*.safetensors"):
        tw.update(read_safetensors(f))
    target_rows = tw.get("lm_head.weight", tw["model.embed_tokens.weight"])[used]
    for init in (True, False):
        zero = tmp_path / f"zero-{init}"
        (zero / "work").mkdir(parents=True)
        copy_data(out, zero)
        train(TrainOptions(target=target, out=str(zero), batch_size=2, ttt_steps=2, lr=0.0, steps=1, quiet=True,
                           init_from_target=init), tiny_models["llama"])
        st = read_safetensors(next((zero / "work").glob("ckpt-*")) / "state.safetensors")
        assert np.array_equal(st["model.lm_head.weight"], target_rows) == init

    # the trained head decodes losslessly through the CLI
    same = ["--target", target, "-n", "12", "--json", "--backend", "openvino"]  # a backend that runs heads
    plain = CliRunner().invoke(main, ["generate", "Say something about cats.", *same, "--drafter", "none"])
    spec = CliRunner().invoke(main, ["generate", "Say something about cats.", *same, "--drafter", "eagle3", "--draft", str(out), "-k", "2"])
    assert json.loads(spec.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]

    # ... and has learnt its training answers: drafts get accepted there
    from specrun.decode import SpeculativeDecoder
    from specrun_train.trainer import split_data

    train_recs, _ = split_data(records, 0.05, 0)
    head = torch_backend.load_eagle3_head(str(out), target, device="cpu")
    drafter = Eagle3Drafter(head, num_target_layers=3)
    tgt = torch_backend.load_target(target, device="cpu", aux_hidden_layers=drafter.aux_hidden_layers)
    rates = []
    for rec in train_recs:
        dec = SpeculativeDecoder(tgt, drafter, 2)
        list(dec.generate(rec["input_ids"][: rec["prompt_len"]], 10))
        rates.append(dec.stats.acceptance_length)
    assert np.mean(rates) > 1.3, rates


def test_training_stage_under_torchrun_with_two_processes(tmp_path, tiny_models):
    """The DistributedDataParallel path: two gloo ranks on CPU share each batch; rank 0 writes the
    checkpoint, which loads and exports like a single-process one."""
    import os
    import subprocess
    import sys

    from click.testing import CliRunner

    from specrun.cli import main

    target = str(tiny_models["llama"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in ("owls", "snow", "rust", "figs")))
    out = tmp_path / "ddp"
    common = ["--target", target, "--out", str(out), "--data", str(prompts), "--num-prompts", "4", "--max-new-tokens", "8",
              "--gen-batch-size", "4", "--draft-vocab-size", "200", "--quiet"]
    r = CliRunner().invoke(main, ["train-draft", *common, "--stage", "data", "--stage", "vocab"])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "specrun_train.trainer", *common, "--stage", "train", "--steps", "3", "--batch-size", "2", "--ttt-steps", "2",
           "--save-every", "3", "--resume"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    state = json.loads(next((out / "work").glob("ckpt-*")).joinpath("state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    r = CliRunner().invoke(main, ["train-draft", *common, "--stage", "export", "--resume"])
    assert r.exit_code == 0, r.output
    assert Eagle3Checkpoint.load(out, target).config.draft_vocab_size == 200


def test_preconditioned_training_exports_the_same_function(tmp_path, tiny_models):
    """--precondition trains fc on x / s; the exported head (fc folded) computes from raw x what the
    trained module computes from x / s."""
    from click.testing import CliRunner

    from specrun.cli import main
    from specrun_train.trainer import SCALE_FILE

    target = str(tiny_models["llama"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe {w}."}) + "\n" for w in ("moss", "tin", "kelp", "opal")))
    out = tmp_path / "pre"
    args = ["train-draft", "--target", target, "--out", str(out), "--data", str(prompts), "--num-prompts", "4",
            "--max-new-tokens", "8", "--gen-batch-size", "4", "--draft-vocab-size", "200", "--batch-size", "2",
            "--ttt-steps", "2", "--steps", "3", "--save-every", "3", "--quiet", "--precondition"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    scale = read_safetensors(out / "work" / SCALE_FILE)["scale"]
    assert scale.shape == (3 * 64,) and (scale >= 1.0).all() and scale.max() > 1.0
    state = read_safetensors(next((out / "work").glob("ckpt-*")) / "state.safetensors")
    ck = Eagle3Checkpoint.load(out, target)
    assert np.allclose(ck.tensors["fc.weight"], state["model.fc.weight"] / scale[None, :], rtol=1e-6, atol=0)
    x = np.random.default_rng(0).normal(size=(5, 3 * 64)).astype(np.float32) * scale
    assert np.allclose(x @ ck.tensors["fc.weight"].T, (x / scale) @ state["model.fc.weight"].T, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad input: one line, nothing lost


def train_cli(*args):
    from click.testing import CliRunner

    from specrun.cli import main

    return CliRunner().invoke(main, ["train-draft", *map(str, args)])


def assert_one_line(r, fragment):
    assert r.exit_code == 2, (r.output, r.exception)
    assert "Traceback" not in r.output
    err = r.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("specrun: error:") and fragment in err, err


def test_out_that_is_not_its_own_run_is_refused(tmp_path, tiny_models):
    """--out pointed at the target's folder, at a head made elsewhere, or at a folder of the user's:
    nothing is written there (a head made elsewhere and the target: not even with --force)."""
    from specrun_train.trainer import check_out_dir

    target = tiny_models["llama"]
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    r = train_cli("--target", target, "--out", target, "--data", tmp_path / "none.jsonl", "--force")
    assert_one_line(r, "is the target model's own folder")
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    head = make_head(tmp_path / "head", seed=3)
    head_files = {p.name: p.read_bytes() for p in head.iterdir()}
    r = train_cli("--target", target, "--out", head, "--data", tmp_path / "none.jsonl", "--force")
    assert_one_line(r, "holds a model or head that train-draft did not make")
    assert {p.name: p.read_bytes() for p in head.iterdir()} == head_files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    r = train_cli("--target", target, "--out", mine, "--data", tmp_path / "none.jsonl")
    assert_one_line(r, "is not empty and is not a train-draft run")
    assert "--force" in r.stderr and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    check_out_dir(mine, target, force=True)  # --force: written into (a folder without a model)
    own = tmp_path / "own"
    (own / "work" / "shards").mkdir(parents=True)
    (own / "config.json").write_text("{}")  # a head its own export wrote
    check_out_dir(own, target, force=False)
    check_out_dir(tmp_path / "new", target, force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="is a file"):
        check_out_dir(tmp_path / "file", target, force=True)


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, tiny_models):
    """Two train-draft processes on one --out (a resume started before the first run had exported)
    would write the same checkpoints: the second is refused in one line, and runs once the lock is free."""
    import filelock

    out = tmp_path / "o"
    (out / "work").mkdir(parents=True)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say something."}) + "\n")
    args = ("--target", tiny_models["llama"], "--out", out, "--data", prompts, "--stage", "vocab", "--resume",
            "--draft-vocab-size", "50", "--quiet")
    lock = filelock.FileLock(out / "work" / "run.lock")
    with lock.acquire(timeout=0):
        r = train_cli(*args)
        assert_one_line(r, "another train-draft is running on")
        assert sorted(p.name for p in (out / "work").iterdir()) == ["run.lock"]
    r = train_cli(*args)  # free now: the vocabulary stage runs, and finds no data shards
    assert_one_line(r, "no training data in")
    assert lock.acquire(timeout=0)  # the run let go of its lock


def test_max_length_shorter_than_every_prompt_is_refused(tmp_path, tiny_models, monkeypatch):
    """--max-length below the chat template's length trained on no label (loss 0.000) and wrote a
    useless head; now training refuses before it starts."""
    import specrun_train.trainer as tr
    from specrun.errors import SpecrunError
    from specrun_kit.headfile import write_safetensors

    records = [{"id": i, "input_ids": list(range(60)), "spans": [[40 + i, 60]]} for i in range(6)]
    opts = TrainOptions(target=str(tiny_models["llama"]), out=str(tmp_path / "o"), max_length=32, quiet=True)
    with pytest.raises(SpecrunError, match="--max-length 32 leaves no answer token .* the shortest prompt, chat template included, is 40 tokens"):
        tr.check_max_length(records, opts)
    tr.check_max_length(records, attrs_evolve(opts, max_length=42))  # one label in the first record: trains
    (tmp_path / "o" / "work").mkdir(parents=True)
    write_safetensors(tmp_path / "o" / "work" / "vocab.safetensors",
                      {"d2t": np.zeros(200, dtype=np.int64), "t2d": np.zeros(49152, dtype=np.bool_)})
    monkeypatch.setattr(tr, "load_records", lambda _opts: records)
    with pytest.raises(SpecrunError, match="leaves no answer token"):
        train(opts, tiny_models["llama"])
    assert not list((tmp_path / "o" / "work").glob("ckpt-*"))


def attrs_evolve(opts, **kw):
    import attrs

    return attrs.evolve(opts, **kw)


@pytest.mark.parametrize("latest", ["{not json", '{"checkpoint": "../../elsewhere", "step": 4}',
                                    '{"checkpoint": "ckpt-00000004", "step": 4}', "[]"])
def test_damaged_checkpoint_on_resume_is_one_line(tmp_path, latest):
    from specrun.errors import SpecrunError
    from specrun_train.trainer import _load_checkpoint

    wd = tmp_path / "work"
    wd.mkdir()
    (wd / "latest.json").write_text(latest)
    with pytest.raises(SpecrunError, match="the training checkpoint in .* cannot be used"):
        _load_checkpoint(wd, None, None)
    assert (wd / "latest.json").read_text() == latest  # left as it was


def test_data_file_that_is_not_utf8_is_one_line(tmp_path, tiny_models):
    from specrun.errors import SpecrunError
    from specrun_train.data import jsonl_conversations

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    for reader in (jsonl_prompts, jsonl_conversations):
        with pytest.raises(SpecrunError, match=r"bad.jsonl:2: not UTF-8 text \(byte 0xe9"):
            list(reader(bad))
    r = train_cli("--target", tiny_models["llama"], "--out", tmp_path / "o", "--data", bad, "--num-prompts", "2", "--quiet")
    assert_one_line(r, "bad.jsonl:2: not UTF-8 text")
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "x\\udcff"}\n')
    with pytest.raises(SpecrunError, match="lone surrogate"):
        list(jsonl_prompts(tmp_path / "surrogate.jsonl"))


def test_threads_below_one_is_one_line(tmp_path):
    assert_one_line(train_cli("--out", tmp_path / "o", "--threads", "0"), "--threads must be >= 1, got 0")


def test_chat_template_that_fails_in_the_data_stage_is_one_line():
    """The data stage renders with transformers' tokenizer: its template errors are one line too."""
    from jinja2.exceptions import TemplateSyntaxError

    from specrun.errors import SpecrunError
    from specrun_train.data import TurnTokenizer

    class Tok:
        chat_template, eos_token_id, name_or_path = "{{ x }", None, "/models/target"

        def apply_chat_template(self, *_a, **_k):
            raise TemplateSyntaxError("unexpected '}'", 3)

    with pytest.raises(SpecrunError, match="the chat template of /models/target cannot be rendered at line 3"):
        TurnTokenizer(Tok()).first("hi")


def train_first_head(tmp_path, tiny_models):
    """A head trained 3 steps on 4 prompts (150 draft tokens): the start of the warm-start tests.
    Returns the target, the head's folder and the options those tests share."""
    target = str(tiny_models["llama"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name {w}."}) + "\n" for w in ("fish", "hills", "ink", "oak")))
    first = tmp_path / "first"
    common = ["--target", target, "--batch-size", "2", "--ttt-steps", "2", "--quiet"]
    r = train_cli(*common, "--out", first, "--data", prompts, "--num-prompts", 4, "--max-new-tokens", 8,
                  "--gen-batch-size", 4, "--draft-vocab-size", 150, "--steps", 3, "--save-every", 3, "--lr", "5e-3")
    assert r.exit_code == 0, r.output
    return target, first, common


def test_warm_start_from_a_head_keeps_its_weights_and_vocabulary(tmp_path, tiny_models):
    """--init-from HEAD: the vocabulary stage takes the head's d2t, and training starts from its
    weights (at lr 0 the first checkpoint equals the head); bad combinations are one line."""
    target, first, common = train_first_head(tmp_path, tiny_models)
    head = Eagle3Checkpoint.load(first, target)

    warm = tmp_path / "warm"
    r = train_cli(*common, "--out", warm, "--data-dir", first / "work" / "shards", "--draft-vocab-size", 300,
                  "--init-from", first, "--stage", "vocab", "--stage", "train", "--steps", 1, "--lr", 0)
    assert r.exit_code == 0, r.output
    vocab = read_safetensors(warm / "work" / "vocab.safetensors")
    assert np.array_equal(vocab["d2t"], head.tensors["d2t"]) and len(vocab["d2t"]) == 150  # not 300
    state = read_safetensors(next((warm / "work").glob("ckpt-*")) / "state.safetensors")
    for name, t in head.tensors.items():
        if name not in ("d2t", "t2d"):
            assert np.array_equal(state[f"model.{name}"], t), name

    assert_one_line(train_cli(*common, "--out", tmp_path / "x", "--data-dir", first / "work" / "shards",
                              "--init-from", tmp_path / "nothing", "--stage", "vocab"), "--init-from")
    assert_one_line(train_cli(*common, "--out", tmp_path / "y", "--init-from", first, "--precondition"),
                    "--init-from and --precondition")


def test_widened_warm_start_computes_what_the_head_computed(tmp_path, tiny_models, monkeypatch):
    """--init-from HEAD --intermediate-size W (wider): the run starts from the head with silent extra
    MLP units, so at lr 0 the exported head computes the same draft logits; the export and a resume
    keep the width, and a resume asking for another width is one line."""
    from specrun_kit.torch_eagle3 import Eagle3Module

    target, first, common = train_first_head(tmp_path, tiny_models)
    head = Eagle3Checkpoint.load(first, target)
    width = head.config.intermediate_size * 3

    wide = tmp_path / "wide"
    r = train_cli(*common, "--out", wide, "--data-dir", first / "work" / "shards", "--init-from", first,
                  "--intermediate-size", width, "--steps", 1, "--lr", 0, "--stage", "vocab", "--stage", "train",
                  "--stage", "export")
    assert r.exit_code == 0, r.output
    grown = Eagle3Checkpoint.load(wide, target)
    assert grown.config.intermediate_size == width
    assert json.loads((wide / "config.json").read_text())["intermediate_size"] == width
    down = grown.tensors["midlayer.mlp.down_proj.weight"]
    assert down.shape[1] == width and not down[:, head.config.intermediate_size:].any()
    assert grown.tensors["midlayer.mlp.gate_proj.weight"][head.config.intermediate_size:].any()  # new units exist

    torch.manual_seed(0)
    ids = torch.randint(0, head.config.vocab_size, (2, 12))
    hidden = torch.randn(2, 12, head.config.num_aux * head.config.target_hidden_size)
    valid = torch.ones(2, 12, dtype=torch.bool)
    outs = []
    for ck in (head, grown):
        m = Eagle3Module(ck.config)
        m.load_checkpoint(ck)
        with torch.no_grad():
            outs.append(m.ttt(ids, hidden, valid, 3))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    assert_one_line(train_cli(*common, "--out", wide, "--data-dir", first / "work" / "shards", "--init-from", first,
                              "--intermediate-size", width + 8, "--steps", 2, "--resume", "--stage", "train"),
                    "--intermediate-size")
    assert_one_line(train_cli(*common, "--out", tmp_path / "narrow", "--data-dir", first / "work" / "shards",
                              "--init-from", first, "--intermediate-size", 4, "--stage", "vocab", "--stage", "train"),
                    "narrower")

    # --data-offset N: step s trains on the batch of step s+N, recorded for resumes
    from specrun_train import trainer as tr

    seen = []
    real = tr.batch_indices
    monkeypatch.setattr(tr, "batch_indices", lambda step, *a: seen.append(step) or real(step, *a))
    off = tmp_path / "off"
    r = train_cli(*common, "--out", off, "--data-dir", first / "work" / "shards", "--init-from", first,
                  "--data-offset", 5, "--steps", 2, "--eval-sequences", 0, "--stage", "vocab", "--stage", "train")
    assert r.exit_code == 0, r.output
    assert seen == [5, 6]
    assert json.loads((off / "work" / "run.json").read_text())["data_offset"] == 5
    assert_one_line(train_cli(*common, "--out", off, "--data-dir", first / "work" / "shards", "--init-from", first,
                              "--data-offset", 0, "--steps", 3, "--resume", "--stage", "train"), "--data-offset 5")


def test_target_precision_bf16_features_are_close_and_cached_apart(tmp_path, tiny_models, monkeypatch):
    """The target's forward in training: bf16 autocast gives features near f32's (not equal), the
    two are cached under different names, and ``auto`` follows the CPU's bf16 units."""
    from specrun_train import trainer as tr

    target = tiny_models["llama"]
    used = torch.arange(40)
    rec = {"id": "r1", "input_ids": list(range(3, 40)), "prompt_len": 5}
    got = {}
    for prec in ("f32", "bf16"):
        runner = tr.TargetRunner(target, (1, 2), "cpu", used, tmp_path / "cache", prec)
        got[prec] = runner.features(rec, rec["input_ids"])
        again = runner.features(rec, rec["input_ids"])  # read back from the cache
        for a, b in zip(got[prec], again, strict=True):
            assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["r1-37-bf16.safetensors", "r1-37.safetensors"]
    (f32_final, f32_aux, _), (bf_final, bf_aux, _) = got["f32"], got["bf16"]
    assert not torch.equal(f32_aux, bf_aux)
    assert (f32_aux - bf_aux).norm() / f32_aux.norm() < 0.05
    assert (f32_final - bf_final).norm() / f32_final.norm() < 0.05
    with pytest.raises(tr.SpecrunError, match="f32 or bf16"):
        tr.TargetRunner(target, (1,), "cpu", used, None, "int8")

    opts = TrainOptions(target=None, out=str(tmp_path / "o"))
    monkeypatch.setattr(tr, "cpu_has_bf16_units", lambda: True)
    assert tr.target_precision(opts) == "bf16"
    monkeypatch.setattr(tr, "cpu_has_bf16_units", lambda: False)
    assert tr.target_precision(opts) == "f32"
    assert tr.target_precision(attrs_evolve(opts, device="cuda")) == "bf16"
    assert tr.target_precision(attrs_evolve(opts, target_precision="f32", device="cuda")) == "f32"


def test_a_batch_run_one_sequence_at_a_time_equals_the_padded_batch(tiny_models):
    """Training runs a step's sequences one at a time (no padding): with the whole batch's label
    counts as denominators, the parts' losses and gradients add up to the padded batch's."""
    from specrun.models import ModelConfig
    from specrun_kit.headfile import head_config_for
    from specrun_train import trainer as tr

    target = tiny_models["llama"]
    tc = ModelConfig.load(target)
    cfg = head_config_for(tc.raw, draft_vocab_size=tc.vocab_size)
    used = torch.arange(tc.vocab_size)
    t2d = torch.ones(tc.vocab_size, dtype=torch.bool)
    runner = tr.TargetRunner(target, cfg.aux_layers_for(tc.num_layers), "cpu", used, None, "f32")
    rng = np.random.default_rng(0)
    recs = [{"id": f"r{n}", "input_ids": rng.integers(0, 60, n).tolist(), "prompt_len": 4} for n in (9, 23, 15)]
    module = tr.new_head_module(cfg, np.random.default_rng(1).standard_normal((tc.vocab_size, cfg.hidden_size)).astype(np.float32), 0)

    def grads_of(batches, denominators):
        module.zero_grad(set_to_none=True)
        total, accs = 0.0, np.zeros(3)
        for b in batches:
            loss, _, acc, _ = tr.ttt_loss(module, b, 3, denominators)
            loss.backward()
            total += loss.item()
            accs += acc
        return total, accs, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    whole = tr.make_batch(recs, runner, used, t2d, 64, "cpu")
    parts = [tr.make_batch([r], runner, used, t2d, 64, "cpu") for r in recs]
    counts = [sum(c) for c in zip(*(tr.label_counts(b, 3) for b in parts), strict=True)]
    assert counts == tr.label_counts(whole, 3) and min(counts) > 10
    loss_a, acc_a, grad_a = grads_of([whole], None)
    loss_b, acc_b, grad_b = grads_of(parts, counts)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    np.testing.assert_allclose(acc_a, acc_b, atol=1e-9)
    assert grad_a.keys() == grad_b.keys() and grad_a
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-4, atol=1e-6)
    loss_c, _, _ = grads_of(parts, None)  # normalised per part instead: another loss (the test can fail)
    assert loss_c != pytest.approx(loss_a, rel=1e-3)


def test_heldout_script_reproduces_the_runs_own_estimate(tmp_path, tiny_models):
    """bench/eagle3_heldout.py (the reference line for a run's curve) computes what the run logged at
    its last checkpoint, from the run folder and from the exported head, with features made afresh."""
    from pathlib import Path

    from click.testing import CliRunner

    from specrun.cli import main
    from specrun_bench.eagle3_heldout import head_estimate
    from specrun_train.trainer import split_data

    target = str(tiny_models["llama"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in ("owls", "snow", "bread", "ink")))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train-draft", "--target", target, "--out", str(out), "--data", str(prompts),
                                  "--max-new-tokens", "10", "--gen-batch-size", "4", "--batch-size", "2", "--steps", "4",
                                  "--draft-vocab-size", "200", "--ttt-steps", "2", "--lr", "5e-3", "--save-every", "4",
                                  "--eval-sequences", "1", "--data-weights", "f32", "--quiet"])
    assert r.exit_code == 0, (r.output, r.exception)
    logged = json.loads((out / "work" / "acceptance-curve.json").read_text())[-1]
    assert logged["step"] == 4
    opts = TrainOptions(target=target, out=str(out), ttt_steps=2)
    _, held = split_data(load_records(opts), opts.val_fraction, opts.seed)
    head = tmp_path / "head"
    head.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(out / name, head / name)
    for i, folder in enumerate((out, head)):
        what, point = head_estimate(str(folder), held[:1], Path(target), opts, tmp_path / f"features-{i}")
        assert what == ("step 4" if folder == out else "head")
        assert point["acceptance_length"] == logged["acceptance_length"], (folder, point, logged)
        assert point["accuracy"] == logged["accuracy"] and point["positions"] == logged["positions"]


def test_genai_data_engine_refusals_are_one_line(tmp_path, tiny_models, monkeypatch):
    """--data-engine genai runs the target at f32 from GenAI's own export: other weights or caches
    and a missing optimum-cli (the export) are each one clear line; the engines' lookup defaults."""
    from specrun_train.trainer import TrainOptions, data_lookup

    assert [data_lookup(TrainOptions(target=None, out="-", data_engine=e)) for e in ("slots", "genai")] == [4, 0]
    assert data_lookup(TrainOptions(target=None, out="-", data_engine="genai", data_lookup=3)) == 3
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi?"}\n')
    common = ["--target", tiny_models["llama"], "--data", prompts, "--num-prompts", 1, "--max-new-tokens", 4,
              "--stage", "data", "--quiet", "--data-engine", "genai"]
    assert_one_line(train_cli(*common, "--out", tmp_path / "a", "--data-weights", "bf16"), "runs the target in f32")
    assert_one_line(train_cli(*common, "--out", tmp_path / "b", "--data-kv-dtype", "bf16"), "runs the target in f32")
    pytest.importorskip("openvino_genai")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no optimum-cli anywhere
    monkeypatch.setattr("sys.executable", str(tmp_path / "empty" / "python"))
    assert_one_line(train_cli(*common, "--out", tmp_path / "d"), "optimum-cli, which is not on PATH")
