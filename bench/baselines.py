"""Outside systems that ``specrun bench --baseline`` runs on the same prompts, token budget and
schedule as specrun: transformers ``generate``, llama.cpp (llama-cpp-python) and OpenVINO GenAI.
Each is measured the way its users run it (whole results, not streaming) and its decode speed is
decode tokens / decode seconds, as specrun's own.

A baseline is optional: a missing package is one line saying how to install it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from specrun.errors import SpecrunError
from specrun_kit.genai import GENAI_WEIGHTS, INSTALL_GENAI

BASELINES = ("transformers", "llama.cpp", "openvino-genai")
clock = time.perf_counter  # the baselines' timer (one name, so tests can drive it)
INSTALL = {
    "llama.cpp": "pip install llama-cpp-python (compiles llama.cpp, ~8 min on 2 cores), or pip install 'specrun[baselines]'",
    "openvino-genai": INSTALL_GENAI,
}


def check_available(names: Sequence[str], target: str | None, weights: str) -> None:
    """Everything about the baselines that can fail before a model loads: packages, files, options."""
    import importlib.util
    import sys

    for name in names:
        if name == "llama.cpp":
            gguf_for(target)
        if name == "openvino-genai" and weights not in GENAI_WEIGHTS:
            raise SpecrunError(f"--baseline-weights takes one of {', '.join(GENAI_WEIGHTS)}, got '{weights}'")
        module, package = {"llama.cpp": ("llama_cpp", "llama-cpp-python"),
                           "openvino-genai": ("openvino_genai", "openvino-genai")}.get(name, (None, None))
        if module in sys.modules:  # imported already (or None: import refused)
            missing = sys.modules[module] is None
        else:
            missing = module is not None and importlib.util.find_spec(module) is None
        if missing:
            raise SpecrunError(f"the {name} baseline needs {package}: {INSTALL[name]}")


def parse_baselines(value: str | None) -> list[str]:
    """``transformers,llama.cpp`` -> the names, checked; ``none`` or empty -> []."""
    names = [v.strip() for v in (value or "").split(",") if v.strip() and v.strip() != "none"]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise SpecrunError(f"unknown baseline '{unknown[0]}'; choose from: {', '.join(BASELINES)} (or none)")
    return list(dict.fromkeys(names))


def measurement(*, precision: str, new: list[int], stop: str, calls: int | None, prefill: float, decode: float,
                total: float) -> dict:
    """A baseline run in the shape of specrun's measurements (no draft statistics)."""
    decode_tokens = max(len(new) - 1, 0)
    return {
        "precision": precision,
        "new_tokens": len(new),
        "decode_tokens": decode_tokens,
        "target_calls": calls or 0,  # 0: the system does not say (its acceptance length is unknown)
        "drafted": None,
        "accepted": None,
        "drafted_per_position": None,
        "accepted_per_position": None,
        "tokens_per_call": None,
        "acceptance_length": decode_tokens / calls if calls else None,
        "tokens_per_second": decode_tokens / decode if decode > 0 and decode_tokens else 0.0,
        "time_to_first_token": prefill,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "draft_seconds": None,
        "total_seconds": total,
        "stop_reason": stop,
        "token_ids": new,
    }


def cut_at_eos(new: list[int], eos: Sequence[int]) -> tuple[list[int], str]:
    for i, tok in enumerate(new):
        if tok in eos:
            return new[:i], "eos"
    return new, "length"


@attrs.define
class Baseline:
    """What the bench needs of an outside system: its configurations (the first is plain decoding),
    a label per configuration, and a runner per configuration."""

    name: str
    short: str  # the name in tables, e.g. "transformers `generate`"
    title: str  # e.g. "llama.cpp (llama-cpp-python 0.3.36, ...)"
    device: str
    precision: str
    methods: dict[str, str]  # config -> label in the report
    run: Callable[[str, list[int], int], dict]

    @property
    def configs(self) -> list[str]:
        return list(self.methods)

    @property
    def plain(self) -> str:
        return self.configs[0]

    def runner(self, config: str) -> Callable[[list[int], int], dict]:
        return lambda ids, n: self.run(config, ids, n)

    def system(self) -> dict:
        return {"name": self.name, "kind": "baseline", "short": self.short, "title": self.title, "device": self.device,
                "precision": self.precision, "configs": self.configs, "plain": self.plain, "methods": self.methods}


# --------------------------------------------------------------------------- transformers


def transformers_baseline(model_dir: Path, k: int, eos: Sequence[int], device: str = "cpu") -> Baseline:
    """transformers ``generate``, fp32, greedy: plain and with prompt lookup (k tokens)."""
    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(device)
    except Exception as exc:  # transformers and torch raise many types here
        raise SpecrunError(f"the transformers baseline cannot load {model_dir} on {device}: "
                           f"{str(exc).splitlines()[0]}; leave it out of --baseline") from None
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    eos = list(eos)

    def run(config: str, ids: list[int], max_new_tokens: int) -> dict:
        times: list[float] = []

        class Streamer:  # only timestamps: generate still returns the whole sequence
            first = True

            def put(self, value):
                if self.first:  # generate hands the prompt over first
                    self.first = False
                    return
                times.append(clock())

            def end(self):
                pass

        kwargs = {"prompt_lookup_num_tokens": k} if config == "prompt_lookup" else {}
        inp = torch.tensor([ids], dtype=torch.long, device=device)
        calls[0] = 0
        t0 = clock()
        with torch.inference_mode():
            seq = model.generate(
                input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, eos_token_id=eos or None,
                pad_token_id=eos[0] if eos else None, streamer=Streamer(), **kwargs,
            )
        end = clock()
        new, stop = cut_at_eos(seq[0, len(ids):].tolist(), eos)
        first = times[0] if times else end
        return measurement(precision="f32", new=new, stop=stop, calls=max(calls[0] - 1, 0), prefill=first - t0,
                           decode=end - first, total=end - t0)

    return Baseline("transformers", "transformers `generate`", f"transformers `generate` {md.version('transformers')}", device, "f32",
                    {"generate": "`generate` (plain)", "prompt_lookup": f"`generate(prompt_lookup_num_tokens={k})`"}, run)


# --------------------------------------------------------------------------- llama.cpp


def llama_cpp_baseline(gguf: Path, k: int, eos: Sequence[int], threads: int | None = None, n_ctx: int = 4096
                       ) -> Baseline:
    """llama.cpp through llama-cpp-python, on the target's GGUF, greedy, non-streaming (its
    streaming path measured ~3x slower here): plain, and its prompt lookup
    (``LlamaPromptLookupDecoding(num_pred_tokens=k)``).

    Decode speed is measured as its users would see it: each prompt runs twice from an empty
    cache (``reset``), once for 1 token and once for all; decode seconds = t(n) - t(1) for the
    n - 1 tokens after the first."""
    try:
        import llama_cpp
    except ImportError:
        raise SpecrunError(f"the llama.cpp baseline needs llama-cpp-python: {INSTALL['llama.cpp']}") from None
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    threads = threads or len(os.sched_getaffinity(0))

    def load(**extra):
        try:
            return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   verbose=False, **extra)
        except Exception as exc:  # llama-cpp-python raises ValueError / RuntimeError for files it cannot load
            raise SpecrunError(f"llama.cpp cannot load {gguf}: {str(exc).splitlines()[0]}") from None

    # as its documentation shows each: plain, and prompt lookup (which needs logits_all=True)
    llms = {"generate": load(), "prompt_lookup": load(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k),
                                                      logits_all=True)}
    quant = gguf.stem.rsplit(".", 1)[-1] if "." in gguf.stem else "gguf"
    eos = list(eos)

    def complete(llm, ids: list[int], n: int) -> tuple[dict, float]:
        llm.reset()  # else it reuses the previous prompt's cache
        t0 = clock()
        out = llm.create_completion(ids, max_tokens=n, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0, stream=False)
        return out, clock() - t0

    def run(config: str, ids: list[int], max_new_tokens: int) -> dict:
        llm = llms[config]
        _, t1 = complete(llm, ids, 1)
        out, tn = complete(llm, ids, max_new_tokens)
        text = out["choices"][0]["text"]
        new = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []
        new, stop = cut_at_eos(new, eos)
        if out["choices"][0].get("finish_reason") == "stop":
            stop = "eos"
        return measurement(precision=quant, new=new, stop=stop, calls=None, prefill=t1, decode=max(tn - t1, 0.0),
                           total=tn)

    return Baseline("llama.cpp", "llama.cpp", f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, {gguf.name}, {threads} threads)",
                    "cpu", quant, {"generate": "`create_completion` (plain)",
                                   "prompt_lookup": f"prompt lookup (`LlamaPromptLookupDecoding(num_pred_tokens={k})`)"}, run)


def gguf_for(target: str | None) -> Path:
    """The GGUF file of the target: the default model's package file, or the single .gguf in a
    target folder."""
    from specrun.models import DEFAULT_MODEL, GGUF_MODELS, gguf_file

    name = target or DEFAULT_MODEL
    folder = Path(name).expanduser()
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    path = gguf_file(name) if name in GGUF_MODELS else found[0] if len(found) == 1 else None
    if path is None:
        raise SpecrunError(f"the llama.cpp baseline needs a GGUF of the target: put one .gguf file in {target} "
                           "(llama.cpp's convert_hf_to_gguf.py makes one) or leave llama.cpp out of --baseline")
    return path


# --------------------------------------------------------------------------- OpenVINO GenAI


def openvino_genai_baseline(export_dir: Path, k: int, eos: Sequence[int], threads: int | None = None) -> Baseline:
    """OpenVINO GenAI ``LLMPipeline`` on its own (optimum-intel) export of the target: plain and
    its prompt lookup (``num_assistant_tokens=k, max_ngram_size=3``).  Decode time from its
    perf metrics (mean time per output token after the first)."""
    try:
        import openvino_genai as ov_genai
    except ImportError:
        raise SpecrunError(f"the openvino-genai baseline needs openvino-genai: {INSTALL['openvino-genai']}") from None
    props = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    plain = ov_genai.LLMPipeline(str(export_dir), "CPU", **props)
    lookup = ov_genai.LLMPipeline(str(export_dir), "CPU", prompt_lookup=True, **props)
    eos = list(eos)
    precision = export_dir.name.rsplit("-", 1)[-1]

    def run(config: str, ids: list[int], max_new_tokens: int) -> dict:
        import numpy as np
        import openvino as ov

        pipe = lookup if config == "prompt_lookup" else plain
        cfg = pipe.get_generation_config()
        cfg.max_new_tokens, cfg.do_sample = max_new_tokens, False
        cfg.eos_token_id = eos[0] if eos else cfg.eos_token_id
        if config == "prompt_lookup":
            cfg.num_assistant_tokens, cfg.max_ngram_size = k, 3
        arr = np.array([ids], dtype=np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr)))
        t0 = clock()
        res = pipe.generate(inputs, cfg)
        total = clock() - t0
        new, stop = cut_at_eos([int(t) for t in res.tokens[0]], eos)
        pm = res.perf_metrics
        ttft = pm.get_ttft().mean / 1000
        decode = pm.get_tpot().mean / 1000 * max(len(new) - 1, 0)
        return measurement(precision=precision, new=new, stop=stop, calls=None, prefill=ttft, decode=decode, total=total)

    return Baseline("openvino-genai", "OpenVINO GenAI", f"OpenVINO GenAI `LLMPipeline` {ov_genai.__version__} ({precision} weights)",
                    "CPU", precision, {"generate": "`generate` (plain)",
                                       "prompt_lookup": f"prompt lookup (`num_assistant_tokens={k}`)"}, run)


def genai_export(model_dir: Path, weights: str = "int4") -> Path:
    """OpenVINO GenAI's own export of the target (``specrun_kit.genai``)."""
    from specrun_kit.genai import genai_export as export

    return export(model_dir, weights, who="specrun bench")
