"""OpenVINO GenAI, shared by the tools that run it: its own export of a target (``optimum-cli export
openvino``, as its users make it), built once in the cache and verified whole before each use, and
its continuous-batching pipeline (the benchmark's baseline and the data stage's fast engine).

optimum-intel pins other torch / transformers versions than specrun's, so it lives in an
environment of its own whose ``optimum-cli`` is found on ``PATH`` (``bench/optimum_env.sh``)."""

from __future__ import annotations

import hashlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

from specrun.errors import SpecrunError

GENAI_WEIGHTS = ("fp32", "int8", "int4")
INSTALL_GENAI = ("pip install openvino-genai openvino-tokenizers (the versions matching openvino), "
                 "or pip install 'specrun[genai]'")
INSTALL_OPTIMUM = ("pip install 'optimum-intel[openvino]' in an environment of its own (it pins other torch/transformers "
                   "versions; bash bench/optimum_env.sh makes ../optimum-env) and put its bin folder on PATH")


def require_genai() -> None:
    """One clear line where openvino-genai is missing (before any export is made for it)."""
    import importlib.util

    if importlib.util.find_spec("openvino_genai") is None:
        raise SpecrunError(f"OpenVINO GenAI is not installed: {INSTALL_GENAI}")


def genai_export(model_dir: Path, weights: str = "int4", *, who: str = "specrun") -> Path:
    """The folder of OpenVINO GenAI's export of the target at ``weights`` (int4 with group size 64,
    the size this model's 576-wide layers allow)."""
    from specrun.store import build_once, cache_dir, content_digest

    if weights not in GENAI_WEIGHTS:
        raise SpecrunError(f"OpenVINO GenAI's export takes weights {', '.join(GENAI_WEIGHTS)}, got '{weights}'")
    weights_file = sorted(Path(model_dir).glob("*.safetensors"))
    key = hashlib.sha256("|".join([weights, *(content_digest(f) for f in weights_file)]).encode()).hexdigest()[:16]
    folder = cache_dir() / "openvino-genai" / f"{Path(model_dir).name}-{key}-{weights}"

    def build(tmp: Path) -> None:
        cli = shutil.which("optimum-cli") or str(Path(sys.executable).parent / "optimum-cli")
        if not Path(cli).exists():
            raise SpecrunError(f"{who} exports the target for OpenVINO GenAI with optimum-cli, which is not on PATH: "
                               f"{INSTALL_OPTIMUM}")
        cmd = [cli, "export", "openvino", "-m", str(model_dir), "--task", "text-generation-with-past",
               "--weight-format", weights]
        if weights == "int4":
            cmd += ["--group-size", "64", "--ratio", "1.0"]
        print(f"{who}: exporting {Path(model_dir).name} for OpenVINO GenAI ({weights}, once) ...", file=sys.stderr, flush=True)
        done = subprocess.run([*cmd, str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SpecrunError(f"optimum-cli export for OpenVINO GenAI failed: {last}")

    return build_once(folder, "openvino_model.xml", build, version="1", info={"weights": weights}).parent


#: the precision of the f32 pipeline: the target's own arithmetic (the CPU plugin's default is bf16
#: compute on CPUs with bf16 units, and a u8 KV cache in the continuous-batching pipeline)
F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}


def greedy_config(budget: int, eos: set[int], lookup: int = 0):
    """A request's greedy config: up to ``budget`` new tokens, ending on the target's own end tokens
    only (``eos_token_id`` set, else the pipeline adds its export's end token to the stop tokens);
    ``lookup``: draft tokens of GenAI's prompt lookup (trigram matches)."""
    import openvino_genai as ov_genai

    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample = budget, False
    cfg.eos_token_id = min(eos)
    cfg.stop_token_ids = set(eos)
    if lookup > 0:
        cfg.num_assistant_tokens, cfg.max_ngram_size = lookup, 3
    return cfg


def continuous_batching(export: Path, *, slots: int, cache_gb: float, threads: int | None = None,
                        prefix_caching: bool = False, prompt_lookup: bool = False, properties: dict | None = None):
    """A ``ContinuousBatchingPipeline`` on ``export``: at most ``slots`` sequences a step, ``cache_gb``
    of KV blocks, prompts split into chunks of up to 2,048 tokens between decode steps;
    ``prompt_lookup``: requests whose config sets ``num_assistant_tokens`` are drafted by GenAI's
    prompt lookup and verified by the model (greedy: the same tokens)."""
    require_genai()
    import openvino_genai as ov_genai

    sc = ov_genai.SchedulerConfig()
    sc.max_num_seqs = slots
    sc.max_num_batched_tokens = 2048
    sc.cache_size = max(1, math.ceil(cache_gb))
    sc.dynamic_split_fuse = True
    sc.enable_prefix_caching = prefix_caching
    props = {**({"INFERENCE_NUM_THREADS": threads} if threads else {}), **({"prompt_lookup": True} if prompt_lookup else {}),
             **(properties or {})}
    try:
        return ov_genai.ContinuousBatchingPipeline(str(export), sc, "CPU", props)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["no message"])[0]
        raise SpecrunError(f"OpenVINO GenAI could not load {export}: {first}; remove that cache folder to rebuild it") from None
