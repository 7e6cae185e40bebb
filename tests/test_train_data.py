"""The data stage's engine: continuous batching computes what one-at-a-time greedy decoding does,
multi-turn conversations are tokenized as the chat template renders them, shards round-trip and a
rerun resumes, MT-bench questions never become training prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specrun_train.data import (
    BenchmarkFilter,
    Conversation,
    TurnTokenizer,
    data_summary,
    read_shard,
    read_shards,
    records_from_shards,
    regenerate,
    write_shard,
)


def greedy_alone(model, ids: list[int], n: int) -> list[int]:
    """Reference: batch 1, the model's own cache, one token at a time."""
    k, v = model.new_cache(len(ids) + n + 1, "cpu", model.lm_head.weight.dtype)
    out = []
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]), 0, k, v, last_only=True)
        pos = len(ids)
        for _ in range(n):
            t = int(logits[-1].argmax())
            out.append(t)
            logits, _ = model(torch.tensor([[t]]), pos, k, v)
            pos += 1
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_slot_engine_decodes_what_batch_one_decodes(tiny_models, torch_backend, arch):
    """Slots of different lengths stepping together, one slot refilled mid-run and one given a
    second turn on top of its cache: every generated token equals the batch-1 greedy prediction
    from the sequence before it (f32 cache)."""
    engine = torch_backend.slot_engine(str(tiny_models[arch]), slots=3, capacity=128, kv_dtype="f32")
    model = engine.model
    rng = np.random.default_rng(0)

    def rand(n):
        return [int(t) for t in rng.integers(10, 40000, n)]

    seqs = [rand(5), rand(17), rand(9)]
    generated: list[set[int]] = [set(), set(), set()]  # positions holding generated tokens
    nxt = [engine.prefill(s, seqs[s]) for s in range(3)]
    for step in range(12):
        if step == 5:  # slot 1's sequence ends; a new prompt takes the slot at once
            engine.reset(1)
            seqs[1], generated[1] = rand(11), set()
            nxt[1] = engine.prefill(1, seqs[1])
        if step == 8:  # slot 2: the answer's last token enters the cache, then a new turn on top
            generated[2].add(len(seqs[2]))
            seqs[2].append(nxt[2])
            engine.step([2], [nxt[2]])
            turn = rand(4)
            seqs[2] += turn
            nxt[2] = engine.prefill(2, turn)
        got = engine.step([0, 1, 2], nxt)
        for s in range(3):
            generated[s].add(len(seqs[s]))
            seqs[s].append(nxt[s])
        nxt = got
    for s in range(3):
        k, v = model.new_cache(len(seqs[s]) + 1, "cpu", torch.float32)
        with torch.inference_mode():
            logits, _ = model(torch.tensor([seqs[s]]), 0, k, v)
        pred = logits.argmax(-1).tolist()
        assert generated[s] and all(seqs[s][i] == pred[i - 1] for i in generated[s]), (arch, s)
        assert nxt[s] == pred[-1]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_slot_engine_blocks_predict_what_steps_predict(tiny_models, torch_backend, arch):
    """Blocks of several tokens per slot (a pending token and a draft), slots of other block sizes
    beside them, rejected rows rolled back: every row's prediction is the batch-1 greedy prediction
    after the sequence up to it (mistral: a sliding window of 16, exceeded here)."""
    engine = torch_backend.slot_engine(str(tiny_models[arch]), slots=3, capacity=128, kv_dtype="f32")
    rng = np.random.default_rng(1)

    def rand(n):
        return [int(t) for t in rng.integers(10, 40000, n)]

    seqs = [rand(6), rand(19), rand(3)]
    for s in range(3):
        engine.prefill(s, seqs[s])
    checked = 0
    for step in range(6):
        blocks = [rand(1 + (s + step) % 4) for s in range(3)]
        got = engine.forward_blocks([0, 1, 2], blocks)
        for s in range(3):
            k, v = engine.model.new_cache(len(seqs[s]) + len(blocks[s]) + 1, "cpu", torch.float32)
            with torch.inference_mode():
                logits, _ = engine.model(torch.tensor([seqs[s] + blocks[s]]), 0, k, v)
            assert got[s] == logits.argmax(-1).tolist()[len(seqs[s]):], (arch, step, s)
            checked += len(blocks[s])
            keep = 1 + step % len(blocks[s])  # as if the draft was accepted up to here
            seqs[s] += blocks[s][:keep]
            engine.rollback(s, len(seqs[s]))
            assert engine.length[s] == len(seqs[s])
    assert checked > 18


class RuleEngine:
    """A stand-in for the slot engine whose model is a known rule over each slot's cached sequence
    (it repeats itself, as the target's long answers do, so prompt lookup finds drafts); a cache
    that regenerate rolled back wrongly would change every later token."""

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.seq: list[list[int]] = [[] for _ in range(slots)]

    @staticmethod
    def rule(seq: list[int]) -> int:
        if len(seq) % 97 == 0:
            return 2  # the end-of-turn token, also inside verified blocks
        return 100 + (seq[-1] * 3 + len(seq) // 5) % 7

    def reset(self, slot: int) -> None:
        self.seq[slot] = []

    def prefill(self, slot: int, ids: list[int]) -> int:
        self.seq[slot] += ids
        return self.rule(self.seq[slot])

    def forward_blocks(self, slots, blocks):
        out = []
        for slot, block in zip(slots, blocks, strict=True):
            rows = []
            for t in block:
                self.seq[slot].append(t)
                rows.append(self.rule(self.seq[slot]))
            out.append(rows)
        return out

    def rollback(self, slot: int, length: int) -> None:
        del self.seq[slot][length:]


def test_regenerate_with_lookup_keeps_the_answers(tmp_path, tiny_models):
    """Prompt lookup in the data stage: the same conversations and answers as one token per step
    (answers ending at the end-of-turn token inside a block and at the length limit), in fewer steps."""
    from specrun.pipeline import load_tokenizer

    tok = load_tokenizer(tiny_models["llama"], full=True)
    convs = [Conversation(i, [f"Question {i}?", "Go on.", "Why?"][: 1 + i % 3]) for i in range(5)]
    runs = {}
    for k in (0, 4):
        out = tmp_path / f"k{k}"
        counts = regenerate(RuleEngine(2, 512), tok, iter(convs), out=out, meta={}, max_new_tokens=60, eos={2},
                            vocab_size=49152, quiet=True, lookup=k)
        runs[k] = (counts, {c["id"]: c for _, c in read_shards(out)})
    (c0, got0), (c4, got4) = runs[0], runs[4]
    assert got0 == got4 and c0["turns"] == c4["turns"] == 1 + 2 + 3 + 1 + 2
    ends = [c["tokens"][e - 1] for c in got0.values() for _, _, e, _ in c["turns"]]
    assert 2 in ends and any(t != 2 for t in ends)  # turns ended by the end-of-turn token and by the limit
    for c in got0.values():  # every answer token is the rule's prediction from the tokens before it
        for _, a, e, _ in c["turns"]:
            assert all(c["tokens"][i] == RuleEngine.rule(c["tokens"][:i]) for i in range(a, e))
    assert c0["rows"] == c0["slot_steps"]  # one row per slot and step without lookup
    assert c4["rows"] > c4["slot_steps"] and c4["slot_steps"] < c0["slot_steps"]  # drafts made, some accepted


@pytest.mark.parametrize("weights", ["f32", "bf16"])
def test_slot_engine_bf16_cache_stays_close(tiny_models, torch_backend, weights):
    a = torch_backend.slot_engine(str(tiny_models["llama"]), slots=2, capacity=64, kv_dtype="bf16", weights=weights)
    ref = greedy_alone(a.model, [5, 6, 7, 8], 6)  # the same weights, one sequence, its own cache
    t = a.prefill(0, [5, 6, 7, 8])
    got = [t]
    for _ in range(5):
        t = a.step([0], [t])[0]
        got.append(t)
    # a random tiny model has near-ties everywhere; the first token comes from an f32 prefill
    assert got[0] == ref[0] and sum(x == y for x, y in zip(got, ref, strict=True)) >= 3


def test_turn_tokenizer_matches_the_chat_template(default_model_dir):
    """Tokens built turn by turn (the generated end-of-turn token standing for the template's)
    decode to exactly the chat template's text of the whole conversation."""
    from specrun.pipeline import load_tokenizer

    tok = load_tokenizer(default_model_dir, full=True)
    tt = TurnTokenizer(tok)
    turns = ["Name a colour.", "And a fruit?", "Thanks!\nBye."]
    answers = ["Blue.", "An apple, of course.", "Goodbye!"]
    ids = tt.first(turns[0])
    msgs: list[dict] = []
    for i, turn in enumerate(turns):
        if i:
            seg = tt.next(msgs, True, turn)
            assert seg is not None
            ids += seg
        answer_ids = tok.encode(answers[i], add_special_tokens=False) + [tok.eos_token_id]
        ids += answer_ids
        msgs += [{"role": "user", "content": turn}, {"role": "assistant", "content": answers[i]}]
    want = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) + "\n" == want
    # a truncated answer (no end-of-turn token) gets the template's closing text
    seg = tt.next(msgs[:2], False, "More?")
    assert tok.decode(seg).startswith("<|im_end|>\n<|im_start|>user\nMore?")


def test_shards_round_trip_and_records(tmp_path):
    convs = [{"id": 7, "tokens": [1, 2, 3, 4, 5, 6], "turns": [(0, 2, 4, 0), (4, 5, 6, 1)]},
             {"id": 9, "tokens": [60000, 2], "turns": [(0, 1, 2, 0)]}]
    p = write_shard(tmp_path, 3, convs, {"max_new_tokens": 5}, 65536)
    meta, back = read_shard(p)
    assert meta == {"max_new_tokens": 5} and back == convs
    recs = records_from_shards(tmp_path)
    assert recs[0] == {"id": 7, "prompt_len": 2, "input_ids": [1, 2, 3, 4, 5, 6], "spans": [[2, 4], [5, 6]]}
    s = data_summary(tmp_path)
    assert (s["conversations"], s["turns"], s["tokens"], s["answer_tokens"], s["truncated_answers"]) == (2, 3, 8, 4, 1)
    # a damaged shard is one clear error, never half-read
    from specrun.errors import SpecrunError

    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(SpecrunError, match="damaged"):
        list(read_shards(tmp_path))


def test_regenerate_writes_conversations_and_resumes(tmp_path, tiny_models, torch_backend):
    from specrun.pipeline import load_tokenizer

    tok = load_tokenizer(tiny_models["llama"], full=True)
    engine = torch_backend.slot_engine(str(tiny_models["llama"]), slots=2, capacity=256, kv_dtype="f32")
    convs = [Conversation(i, [f"Question {i}?", "Go on.", "Why?"][: 1 + i % 3]) for i in range(5)]
    counts = regenerate(engine, tok, iter(convs[:3]), out=tmp_path, meta={"m": 1}, max_new_tokens=6, eos={2},
                        vocab_size=49152, quiet=True, shard_conversations=2)
    assert counts["conversations"] == 3 and counts["turns"] == 1 + 2 + 3
    assert len(list(tmp_path.glob("shard-*.npz"))) == 2  # a shard of 2 and the rest at the end
    got = {c["id"]: c for _, c in read_shards(tmp_path)}
    assert sorted(got) == [0, 1, 2] and [len(got[i]["turns"]) for i in range(3)] == [1, 2, 3]
    for c in got.values():  # turns follow each other: prompt, answer, next prompt...
        prev = 0
        for ps, a, e, _ in c["turns"]:
            assert ps == prev and ps < a < e and e - a <= 6
            prev = e
        assert prev == len(c["tokens"])
    # the rest later: new shards after the old ones, nothing rewritten
    before = {p.name: p.read_bytes() for p in tmp_path.glob("shard-*.npz")}
    regenerate(engine, tok, iter(convs[3:]), out=tmp_path, meta={"m": 1}, max_new_tokens=6, eos={2},
               vocab_size=49152, quiet=True)
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())
    assert sorted(c["id"] for _, c in read_shards(tmp_path)) == [0, 1, 2, 3, 4]


def test_mtbench_questions_are_never_training_prompts():
    from specrun_train.data import mtbench_questions

    qs = mtbench_questions()
    assert len(qs) == 160
    f = BenchmarkFilter(qs)
    assert f(Conversation(0, ["hello", qs[0]]))
    assert f(Conversation(0, ["Please help: " + qs[5] + " Thanks."]))
    assert not f(Conversation(0, ["Write a poem about the sea."]))


def test_data_stage_cli_refuses_other_settings(tmp_path, tiny_models):
    from click.testing import CliRunner

    from specrun.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["Hi.", "Again."]}) + "\n" + json.dumps({"prompt": "Tea?"}) + "\n")
    args = ["train-draft", "--target", str(tiny_models["llama"]), "--out", str(tmp_path / "o"), "--data", str(prompts),
            "--stage", "data", "--gen-batch-size", "2", "--quiet"]
    r = CliRunner().invoke(main, [*args, "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert data_summary(tmp_path / "o" / "work" / "shards")["turns"] == 3
    r = CliRunner().invoke(main, [*args, "--max-new-tokens", "5"])
    assert r.exit_code == 2 and "other settings" in r.stderr


def test_data_stage_reruns_with_shards_outside_out(tmp_path, tiny_models):
    """bench/eagle3_data.sh's way: --data-dir outside --out; rerunning the same command resumes
    (it used to refuse: the first run leaves an empty OUT/work/)."""
    from click.testing import CliRunner

    from specrun.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tea {i}?"}) + "\n" for i in range(3)))
    args = ["train-draft", "--target", str(tiny_models["llama"]), "--out", str(tmp_path / "o"), "--data", str(prompts),
            "--stage", "data", "--gen-batch-size", "2", "--max-new-tokens", "4", "--quiet", "--data-dir", str(tmp_path / "d")]
    for _ in range(2):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    assert data_summary(tmp_path / "d")["conversations"] == 3


def test_an_interrupted_run_keeps_the_conversations_it_finished(tmp_path, tiny_models, torch_backend):
    """Ctrl-C (kill -INT) during the data stage: conversations already finished but not yet in a
    shard are written before the interrupt goes on; the ones in flight are redone on resume."""
    from specrun.pipeline import load_tokenizer

    tok = load_tokenizer(tiny_models["llama"], full=True)
    engine = torch_backend.slot_engine(str(tiny_models["llama"]), slots=1, capacity=256, kv_dtype="f32")
    real_step, calls = engine.forward_blocks, []

    def step(slots, blocks):
        calls.append(1)
        if len(calls) == 9:  # the first conversation (6 answer tokens, 6 steps) is done, the second is running
            raise KeyboardInterrupt
        return real_step(slots, blocks)

    engine.forward_blocks = step
    convs = [Conversation(i, [f"Question {i}?"]) for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        regenerate(engine, tok, iter(convs), out=tmp_path, meta={}, max_new_tokens=6, eos={-1}, vocab_size=49152,
                   quiet=True)
    assert [c["id"] for _, c in read_shards(tmp_path)] == [0]


def test_kill_during_the_data_stage_writes_what_finished(tmp_path, tiny_models):
    """`kill` (SIGTERM) of a data stage running in the background, as bench/eagle3_data.sh starts it
    (SIGINT ignored): the finished conversations reach a shard, the stage ends in one line."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(3000)))
    log = tmp_path / "log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "specrun", "train-draft", "--target", str(tiny_models["llama"]),
                                 "--out", str(tmp_path / "o"), "--data", str(prompts), "--stage", "data",
                                 "--gen-batch-size", "2", "--max-new-tokens", "8", "--threads", "1"],
                                stderr=err, stdout=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        deadline = time.time() + 120
        while time.time() < deadline:  # until the progress bar shows finished answers
            done = [int(n) for n in re.findall(r"\| *(\d+)/\d+", log.read_text(errors="replace"))]
            if done and max(done) >= 3:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 130, log.read_text()[-500:]
    assert "specrun: interrupted" in log.read_text()
    finished = data_summary(tmp_path / "o" / "work" / "shards")
    assert finished["conversations"] >= 1 and os.path.getsize(next((tmp_path / "o" / "work" / "shards").glob("*.npz"))) > 0


class FakeGenAIPipe:
    """A stand-in for OpenVINO GenAI's ContinuousBatchingPipeline whose model is RuleEngine's rule:
    requests are the whole conversation so far; each ``step`` gives every running request one
    token, the stop token included in the output, as the real pipeline does."""

    def __init__(self):
        import openvino_genai as ov_genai

        self.status = ov_genai.GenerationStatus
        self.running: list[FakeGenAIPipe.Handle] = []
        self.prompts: list[list[int]] = []

    class Handle:
        def __init__(self, pipe, ids, cfg):
            self.pipe, self.seq, self.cfg, self.out, self.unread = pipe, list(ids), cfg, [], []
            self.status = pipe.status.RUNNING

        def can_read(self):
            return bool(self.unread)

        def read(self):
            part = type("Out", (), {"generated_ids": self.unread})()
            self.unread = []
            return {0: part}

        def get_status(self):
            return self.status

        def cancel(self):
            self.status = self.pipe.status.CANCEL
            self.pipe.running.remove(self)

    def add_request(self, request_id, tensor, cfg):
        ids = [int(t) for t in tensor.data[0]]
        self.prompts.append(ids)
        h = self.Handle(self, ids, cfg)
        self.running.append(h)
        return h

    def step(self):
        for h in self.running:
            t = RuleEngine.rule(h.seq)
            h.seq.append(t)
            h.out.append(t)
            h.unread.append(t)
            if t in h.cfg.stop_token_ids or len(h.out) >= h.cfg.max_new_tokens:
                h.status = self.status.FINISHED
        self.running = [h for h in self.running if h.status == self.status.RUNNING]


def test_genai_turns_regenerate_what_the_slot_engine_regenerates(tmp_path, tiny_models):
    """The data stage on OpenVINO GenAI's request API (GenAITurns) writes the same conversations as
    on the slot engine, each turn's request holding the whole conversation so far (the earlier
    answers exactly as generated); a request the pipeline drops is one clear error."""
    pytest.importorskip("openvino_genai")
    from specrun.errors import SpecrunError
    from specrun.pipeline import load_tokenizer
    from specrun_train.data import GenAITurns

    tok = load_tokenizer(tiny_models["llama"], full=True)
    convs = [Conversation(i, [f"Question {i}?", "Go on.", "Why?"][: 1 + i % 3]) for i in range(5)]
    ref = tmp_path / "slots"
    regenerate(RuleEngine(2, 512), tok, iter(convs), out=ref, meta={}, max_new_tokens=60, eos={2}, vocab_size=49152,
               quiet=True, lookup=4)
    pipe = FakeGenAIPipe()
    out = tmp_path / "genai"
    counts = regenerate(GenAITurns(pipe, slots=2, capacity=512, eos={2}), tok, iter(convs), out=out, meta={},
                        max_new_tokens=60, eos={2}, vocab_size=49152, quiet=True)
    got = {c["id"]: c for _, c in read_shards(out)}
    assert got == {c["id"]: c for _, c in read_shards(ref)} and counts["turns"] == 9
    for c in got.values():  # a later turn's request is the conversation up to its prompt's end
        for _, a, _, _ in c["turns"]:
            assert c["tokens"][:a] in pipe.prompts

    class Dropping(FakeGenAIPipe):
        def step(self):
            for h in self.running:
                h.status = self.status.IGNORED

    with pytest.raises(SpecrunError, match="did not finish a request"):
        regenerate(GenAITurns(Dropping(), slots=2, capacity=512, eos={2}), tok, iter(convs), out=tmp_path / "x",
                   meta={}, max_new_tokens=60, eos={2}, vocab_size=49152, quiet=True)

    class OtherEnd(FakeGenAIPipe):  # a pipeline that also stops on a token the target's answers do not end with
        def add_request(self, request_id, tensor, cfg):
            cfg.stop_token_ids = {*cfg.stop_token_ids, 100}
            return super().add_request(request_id, tensor, cfg)

    with pytest.raises(SpecrunError, match="not an end-of-turn token"):
        regenerate(GenAITurns(OtherEnd(), slots=2, capacity=512, eos={2}), tok, iter(convs), out=tmp_path / "y",
                   meta={}, max_new_tokens=60, eos={2}, vocab_size=49152, quiet=True)

    turns = GenAITurns(pipe := FakeGenAIPipe(), slots=2, capacity=512, eos={2})  # a reset mid-answer cancels it
    turns.start(0, [5, 6, 7], 60)
    turns.advance()
    turns.reset(0)
    assert not pipe.running and turns.advance() == []
