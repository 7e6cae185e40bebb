"""The data stage's speed, side by side in one run: the slot engine (continuous batching, what
``specrun train-draft --stage data`` runs) against the stage it replaced (batched
``transformers.generate``, left padding, prompts sorted by length), on the same ShareGPT first turns,
and the share of the engine's greedy answers identical to specrun's plain greedy decoding
(torch_cuda, CPU, f32, one sequence at a time).

    .venv/bin/python bench/data_engine.py [--prompts 96] [--new-tokens 128] [--identity 50] [--variant bf16-bf16] [--out FILE]

``--replay N`` measures the stage's real work instead: the last N conversations of the committed
shards (training-data/smollm2-135m-instruct), every turn, regenerated again as the data stage does
(answers up to 512 tokens in context), once per ``--lookup`` value and, with ``--variant genai-f32``,
on OpenVINO GenAI as ``train-draft --data-engine genai`` runs it; the identity check is then the
share of answers equal to the committed ones (made by the f32 slot engine).

``--variant genai-f32`` / ``genai-default`` need openvino-genai and optimum-cli on PATH (its own
export of the target: ``bash bench/optimum_env.sh``).

Pause a background data run first (``kill -STOP $(cat OUT.data.pid)``, ``bench/eagle3_data.sh``): both
measure the same CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

VARIANTS = ["f32-f32", "f32-bf16", "bf16-bf16"]
#: OpenVINO GenAI's ContinuousBatchingPipeline on its own export of the target (f32 weights), with its
#: inference and KV-cache precision: f32 (the target's own arithmetic) or the CPU plugin's defaults
GENAI_VARIANTS = ("genai-f32", "genai-default")


def first_turns(tok, n: int, max_prompt_tokens: int) -> list[list[int]]:
    from specrun_train.data import TurnTokenizer, conversations

    tt = TurnTokenizer(tok)
    out = []
    for conv in conversations("sharegpt"):
        ids = tt.first(conv.turns[0])
        if len(ids) <= max_prompt_tokens:
            out.append(ids)
        if len(out) >= n:
            break
    return out


def run_engine(model_dir, prompts, new_tokens, slots, kv, eos, tok, weights="f32", lookup=0) -> tuple[dict, list[list[int]]]:
    """(counts, answers in prompt order) of the slot engine on single-turn prompts; ``lookup``: draft
    tokens verified per slot and step (prompt lookup)."""
    from specrun.plugins import load_registry
    from specrun_train.data import Conversation, regenerate

    engine = load_registry(["torch_cuda"]).get("torch_cuda").slot_engine(model_dir, slots=slots, capacity=2048, kv_dtype=kv,
                                                                         weights=weights)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        # the prompts as pre-tokenized one-turn conversations: a tokenizer stub returns them as they are
        class Pre:
            def __init__(self):
                self.eos_token_id = tok.eos_token_id

            def decode(self, ids, **kw):
                return tok.decode(ids, **kw)

        convs = [Conversation(i, [str(i)]) for i in range(len(prompts))]
        pre = Pre()
        pre.chat_template = None
        pre.encode = lambda text, **kw: list(prompts[int(text)])  # noqa: E731
        counts = regenerate(engine, pre, iter(convs), out=Path(d), meta={}, max_new_tokens=new_tokens, eos=eos,
                            vocab_size=49152, quiet=True, lookup=lookup)
        from specrun_train.data import read_shards

        answers = {c["id"]: c["tokens"][c["turns"][0][1] : c["turns"][0][2]] for _, c in read_shards(Path(d))}
    return counts, [answers[i] for i in range(len(prompts))]


def run_genai(model_dir, prompts, new_tokens, slots, eos, props: dict) -> tuple[dict, list[list[int]]]:
    """(counts, answers in prompt order) of OpenVINO GenAI's continuous-batching pipeline (paged KV
    cache, ``slots`` sequences at most in a step) on the same single-turn prompts, greedy."""
    import numpy as np
    import openvino as ov

    from specrun_kit.genai import continuous_batching, genai_export, greedy_config

    pipe = continuous_batching(genai_export(model_dir, "fp32", who="data_engine"), slots=slots, cache_gb=4, threads=2,
                               properties=props)
    cfg = greedy_config(new_tokens, eos)
    inputs = [ov.Tensor(np.array([p], dtype=np.int64)) for p in prompts]
    t0 = time.perf_counter()
    res = pipe.generate(inputs, [cfg] * len(inputs))
    seconds = time.perf_counter() - t0
    answers = [[int(t) for t in r.m_generation_ids[0]] for r in res]
    n = sum(len(a) for a in answers)
    return {"answer_tokens_per_s": n / seconds, "answer_tokens": n}, answers


def run_replay(model_dir, n: int, slots: int, lookups: list[int], out: str, genai: bool = False) -> None:
    """The data stage on the last ``n`` committed conversations, per lookup value of the slot engine
    and, with ``genai``, on OpenVINO GenAI's continuous batching (f32, prefix caching, as
    ``train-draft --data-engine genai`` runs it), side by side."""
    import tempfile

    from specrun.models import ModelConfig
    from specrun.pipeline import load_tokenizer
    from specrun.plugins import load_registry
    from specrun_train.data import conversations, read_shards, regenerate

    shards = Path(__file__).resolve().parent.parent / "training-data" / "smollm2-135m-instruct"
    every = list(read_shards(shards))  # the last n: multi-turn, as the stage's remaining work is
    meta = every[-1][0]
    committed = {c["id"]: c for _, c in every[-n:]}
    wanted = set(committed)
    convs = [c for c in conversations("sharegpt", max(wanted) + 1) if c.id in wanted]
    tok = load_tokenizer(model_dir, full=True)
    eos = set(ModelConfig.load(model_dir).eos_token_ids) | {tok.eos_token_id}
    res: dict = {"conversations": len(convs), "slots": slots, "max_new_tokens": meta["max_new_tokens"]}
    for k, on_genai in [(k, g) for k in lookups for g in ([False, True] if genai else [False])]:
        if on_genai:
            from specrun_train.trainer import TrainOptions, _genai_engine

            opts = TrainOptions(target=None, out="-", gen_batch_size=slots, max_context=meta["max_context"], threads=2,
                                data_lookup=k)
            engine = _genai_engine(opts, model_dir, ModelConfig.load(model_dir), eos)
        else:
            engine = load_registry(["torch_cuda"]).get("torch_cuda").slot_engine(model_dir, slots=slots, capacity=meta["max_context"])
        with tempfile.TemporaryDirectory() as d:
            counts = regenerate(engine, tok, iter(convs), out=Path(d), meta={}, max_new_tokens=meta["max_new_tokens"],
                                eos=eos, vocab_size=49152, total_turns=sum(len(c.turns) for c in convs), lookup=k)
            same = total = 0
            for _, c in read_shards(Path(d)):
                ref = committed[c["id"]]
                for t, r in zip(c["turns"], ref["turns"], strict=False):
                    total += 1
                    same += c["tokens"][t[1] : t[2]] == ref["tokens"][r[1] : r[2]] and t[:2] == r[:2]
        row = {"answer_tokens_per_s": counts["answer_tokens_per_s"], "answer_tokens": counts["answer_tokens"],
               "seconds": counts["seconds"], "answers_identical_to_committed": f"{same}/{total}"}
        if "slot_steps" in counts:  # the slot engine's own counts
            row["tokens_per_slot_step"] = round(counts["answer_tokens"] / max(1, counts["slot_steps"]), 2)
            row["rows_per_token"] = round(counts["rows"] / max(1, counts["answer_tokens"]), 2)
        name = f"genai-f32-lookup{k}" if on_genai else f"lookup{k}"
        res[name] = row
        click.echo(f"{name}: {json.dumps(row)}", err=True)
        del engine  # one engine's KV cache at a time
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))
    click.echo(json.dumps(res))


def run_transformers(model_dir, prompts, new_tokens, batch, eos) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    order = sorted(prompts, key=len)
    t0, n = time.perf_counter(), 0
    for b in range(0, len(order), batch):
        chunk = order[b : b + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), 0, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            att[r, width - len(p) :] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, temperature=None, top_p=None, top_k=None)
        for r in range(len(chunk)):
            a = gen[r, width:].tolist()
            n += next((j + 1 for j, t in enumerate(a) if t in eos), len(a))
    return n / (time.perf_counter() - t0)


@click.command()
@click.option("--prompts", default=96, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--slots", default=64, show_default=True)
@click.option("--batch", default=16, show_default=True, help="Batch of the transformers stage.")
@click.option("--identity", default=50, show_default=True, help="Prompts compared with plain greedy decoding.")
@click.option("--max-prompt-tokens", default=512, show_default=True)
@click.option("--variant", multiple=True, type=click.Choice([*VARIANTS, *GENAI_VARIANTS]),
              help="Engine precisions WEIGHTS-KVCACHE, or genai-f32 / genai-default: OpenVINO GenAI's "
                   "ContinuousBatchingPipeline (repeatable) [default: the engine's three].")
@click.option("--lookup", default="0", show_default=True,
              help="Prompt-lookup draft tokens per slot and step, comma-separated values each run (e.g. 0,3).")
@click.option("--no-transformers", is_flag=True, help="Leave out the transformers stage (the engine variants only).")
@click.option("--replay", type=int, default=0, help="Replay the last N committed conversations instead (see above).")
@click.option("--out", default="bench-out/data-engine.json", show_default=True)
def main(prompts, new_tokens, slots, batch, identity, max_prompt_tokens, variant, lookup, no_transformers, replay, out):
    import torch

    from specrun.models import ModelConfig, resolve_model
    from specrun.pipeline import Pipeline, load_tokenizer

    torch.set_num_threads(2)
    model_dir = resolve_model(None)
    if replay:
        if set(variant) - {"genai-f32"}:
            raise click.UsageError("--replay runs the slot engine (f32) and, with --variant genai-f32, GenAI at f32 only")
        return run_replay(model_dir, replay, slots, [int(x) for x in lookup.split(",")], out, "genai-f32" in variant)
    tok = load_tokenizer(model_dir, full=True)
    eos = set(ModelConfig.load(model_dir).eos_token_ids) | {tok.eos_token_id}
    ps = first_turns(tok, prompts, max_prompt_tokens)
    res: dict = {"prompts": len(ps), "new_tokens": new_tokens, "slots": slots, "transformers_batch": batch}
    lookups = [int(x) for x in lookup.split(",")]
    variants = []
    for base in [v for v in VARIANTS if v in set(variant)] if variant else VARIANTS:
        for k in lookups:
            name = base if k == 0 else f"{base}-lookup{k}"
            variants.append(name)
            weights, kv = base.split("-")
            counts, answers = run_engine(model_dir, ps, new_tokens, slots, kv, eos, tok, weights, lookup=k)
            tps = counts["answer_tokens_per_s"]
            res[f"engine_{name}_tokens_per_s"] = round(tps, 1)
            # answer tokens per slot and step (1 without lookup; EOS rows count too) and rows computed per token
            res[f"engine_{name}_tokens_per_slot_step"] = round(counts["answer_tokens"] / max(1, counts["slot_steps"]), 2)
            res[f"engine_{name}_rows_per_token"] = round(counts["rows"] / max(1, counts["answer_tokens"]), 2)
            res.setdefault("answers", {})[name] = answers
            click.echo(f"slot engine ({slots} slots, {weights} weights, {kv} KV cache, lookup {k}): {tps:.1f} answer "
                       f"tokens/s", err=True)
    for name in [v for v in GENAI_VARIANTS if v in set(variant)]:
        from specrun_kit.genai import F32

        variants.append(name)
        counts, answers = run_genai(model_dir, ps, new_tokens, slots, eos, F32 if name == "genai-f32" else {})
        res[f"engine_{name}_tokens_per_s"] = round(counts["answer_tokens_per_s"], 1)
        res.setdefault("answers", {})[name] = answers
        click.echo(f"OpenVINO GenAI ContinuousBatchingPipeline ({name}, {slots} sequences): "
                   f"{counts['answer_tokens_per_s']:.1f} answer tokens/s", err=True)
    if not no_transformers:
        tps = run_transformers(model_dir, ps, new_tokens, batch, eos)
        res["transformers_tokens_per_s"] = round(tps, 1)
        click.echo(f"transformers generate (batch {batch}): {tps:.1f} answer tokens/s", err=True)
    pipe = Pipeline.load(None, backend="torch_cuda", device="cpu", precision="f32", drafter="none")
    plain = []
    for p in ps[:identity]:
        got: list[int] = []
        for chunk in pipe.decoder.generate(p, new_tokens, eos_token_ids=sorted(eos)):
            got += chunk
        plain.append(got)
    for kv in variants:
        same = 0
        first_diff = []
        for a, b in zip(res["answers"][kv][:identity], plain, strict=True):
            a = [t for t in a if t not in eos]
            same += a == b
            if a != b:
                first_diff.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))))
        res[f"identical_{kv}"] = f"{same}/{len(plain)}"
        res[f"first_difference_{kv}"] = sorted(first_diff)
        click.echo(f"{kv} (weights-KV cache): {same}/{len(plain)} answers identical to plain greedy decoding; "
                   f"first differing token at {sorted(first_diff)}", err=True)
    del res["answers"]
    for kv in variants if not no_transformers else []:
        res[f"speedup_{kv}"] = round(res[f"engine_{kv}_tokens_per_s"] / res["transformers_tokens_per_s"], 2)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))
    click.echo(json.dumps(res))


if __name__ == "__main__":
    main()
