"""``specrun bench``: plain decoding and speculative configurations side by side on real prompts.

One target is loaded per backend; the drafters are swapped in front of it.  For every prompt the
configurations run back to back, in an order that alternates from one round to the next, so that
machine noise hits plain and speculative decoding alike; speed-ups are ratios of such pairs.
Outside systems (``--baseline``: transformers ``generate``, llama.cpp, OpenVINO GenAI; plain and
with their prompt lookup) run in the same schedule; with llama.cpp among them every configuration is
also compared with llama.cpp's plain decoding on the same prompt.  Outputs: ``report.md``, ``results.json`` (every raw measurement) and two PNG plots."""

from __future__ import annotations

import copy
import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import click

from specrun.cli import threads_option
from specrun.drafters import DEFAULT_LOOKUP_MIN_PROB, DEFAULT_MIN_PROB
from specrun.eagle3 import parse_tree
from specrun.errors import SpecrunError
from specrun.interfaces import Draft, Drafter, Target
from specrun.plugins import Registry, load_registry

from . import baselines as bl
from . import report
from .prompts import DATASETS, Prompt, load_prompts

OUTPUT_FILES = ("report.md", "results.json", report.ACCEPTANCE_PNG, report.TOKENS_PNG)
BASELINE = "transformers"  # the default --baseline
REFERENCE = "llama.cpp"  # with it in --baseline, every configuration's speed is also given relative to its plain run
VERSION_PACKAGES = ("specrun", "torch", "transformers", "onnxruntime", "openvino", "numpy", "tokenizers")


# --------------------------------------------------------------------------- settings


@attrs.define
class BenchSettings:
    backends: list[str]
    drafters: list[str]
    dataset: str = "mt-bench"
    limit: int | None = 10
    max_new_tokens: int = 128
    num_draft_tokens: int = 4
    drafts: dict[str, str] = attrs.field(factory=dict)  # drafter name -> draft model / head folder
    target: str | None = None
    devices: dict[str, str | None] = attrs.field(factory=dict)  # None: the backend's CPU device
    precisions: dict[str, str | None] = attrs.field(factory=dict)
    threads: int | None = None
    tree: tuple[int, int, int] | None = None  # eagle3 dynamic tree: depth, top-k, nodes
    draft_min_prob: float | None = None  # eagle3 chain: None = the pipeline's default
    draft_gate: bool = True  # model drafters pause where drafts do not pay (PayingDrafter); lookup drafts by cost
    warmup: int = 1
    repeats: int = 1
    baseline: list[str] = attrs.field(factory=lambda: [BASELINE])
    baseline_device: str = "cpu"
    baseline_weights: str = "int4"  # openvino-genai's export
    raw: bool = False
    humaneval_raw: bool = False
    out: Path = Path("bench-out")
    force: bool = False
    command: str = "specrun bench"


def split_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise SpecrunError(f"--{what} needs at least one name")
    return list(dict.fromkeys(items))  # drop repeats, keep order


def per_backend(value: str | None, backends: Sequence[str], what: str, default: str | None) -> dict[str, str | None]:
    """``f32`` (every backend) or ``onnx_cpu=f32,openvino=bf16`` (per backend), or both mixed."""
    out: dict[str, str | None] = {b: default for b in backends}
    if value is None:
        return out
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if "=" in part:
            b, v = (x.strip() for x in part.split("=", 1))
            if b not in backends:
                raise SpecrunError(f"--{what} names backend '{b}', which is not in --backend ({', '.join(backends)})")
            out[b] = v
        else:
            for b in backends:
                out[b] = part
    return out


def default_device(backend) -> str:
    """The backend's CPU device (``cpu``, ``CPU`` ...) when it has one, else its first device."""
    try:
        present = backend.devices()
    except Exception:  # a plugin bug: let load_target report it
        return "cpu"
    return next((d for d in present if d.lower() == "cpu"), present[0] if present else "cpu")


def draft_paths(value: str | None, drafters: Sequence[str]) -> dict[str, str]:
    """``DIR`` (for whichever of model / eagle3 is asked for) or ``model=DIR,eagle3=DIR``."""
    from specrun.pipeline import DRAFTERS

    if not value:
        return {}
    parts = [p.strip() for p in value.split(",") if p.strip()]
    keyed = [p.split("=", 1) for p in parts if p.split("=", 1)[0] in DRAFTERS and "=" in p]
    if keyed and len(keyed) == len(parts):
        return {k: v for k, v in keyed}
    if keyed:
        raise SpecrunError("--draft takes one folder, or drafter=folder pairs (model=DIR,eagle3=DIR), not a mix")
    needing = list(dict.fromkeys(d.split("+")[0] for d in drafters if d not in ("none", "ngram")))  # eagle3+ngram: eagle3's
    if len(needing) > 1:
        raise SpecrunError(f"--draft gives one folder but {' and '.join(needing)} each need one: "
                           f"--draft {needing[0]}=DIR,{needing[1]}=DIR")
    if not needing:
        raise SpecrunError("--draft is only used by the model and eagle3 drafters; add one to --drafter")
    return {needing[0]: value}


def _min_prob(s: BenchSettings) -> float:
    return DEFAULT_MIN_PROB if s.draft_min_prob is None else s.draft_min_prob


def check_outputs(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SpecrunError(f"--out {out} is a file; give a folder")
    clash = [f for f in OUTPUT_FILES if (out / f).exists() and not (out / f).is_file()]
    if clash:
        raise SpecrunError(f"{out / clash[0]} exists and is not a file; give another --out")
    if force:
        return
    # every file the run writes (OUTPUT_FILES), results first: a user's own plot is not overwritten either
    existing = [f for f in dict.fromkeys(("results.json", *OUTPUT_FILES)) if (out / f).exists()]
    if existing:
        more = f" (and {', '.join(existing[1:])})" if len(existing) > 1 else ""
        raise SpecrunError(f"{out / existing[0]} exists{more}; use --force to overwrite, or another --out")


# --------------------------------------------------------------------------- machine facts


def machine_facts() -> dict:
    facts: dict = {
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "memory_gib": None,
        "cpu_flags": [],
        "gpu": None,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and val.strip():
                    facts["cpu"] = val.strip()
                elif key == "flags":
                    flags = set(val.split())
                    facts["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "fma"})
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    facts["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            facts["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        facts["torch_threads"] = torch.get_num_threads()
    except Exception:  # facts are best effort
        pass
    return facts


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- running one configuration


class RecordingDrafter(Drafter):
    """Wraps a drafter to record how many draft tokens each target call accepted."""

    def __init__(self, inner: Drafter):
        self.inner = inner
        self.name = inner.name
        self.aux_hidden_layers = inner.aux_hidden_layers
        self.accepted_per_call: list[int] = []

    @property
    def runs_on(self) -> str:
        return self.inner.runs_on

    def start(self, prompt, capacity):
        self.accepted_per_call = []
        self.inner.start(prompt, capacity)

    def propose(self, tokens, k, rng) -> Draft:
        return self.inner.propose(tokens, k, rng)

    def propose_tree(self, tokens, depth, max_nodes):
        fn = getattr(self.inner, "propose_tree", None)
        return fn(tokens, depth, max_nodes) if fn is not None else None

    def accepted(self, tokens, n_accepted, hidden_states=None):
        self.accepted_per_call.append(n_accepted)  # also called after the prefill: runs keep the last calls only
        self.inner.accepted(tokens, n_accepted, hidden_states)


@attrs.define
class Config:
    """One measured configuration: ``run(ids, max_new_tokens)`` returns a measurement dict."""

    system: str
    name: str
    run: Callable[[list[int], int], dict]


def specrun_runner(target: Target, drafter: Drafter, k: int, eos: Sequence[int], template=None
                   ) -> Callable[[list[int], int], dict]:
    """A runner for one configuration.  ``template``: a decoder whose kind and settings to reuse
    (a pipeline's own decoder, e.g. a tree decoder for eagle3); default: the chain loop."""
    from specrun.decode import SpeculativeDecoder
    from specrun.drafters import NoDrafter

    plain = isinstance(drafter, NoDrafter)
    rec = None if plain else RecordingDrafter(drafter)
    if template is not None:
        decoder = copy.copy(template)
        decoder.target, decoder.drafter = target, drafter if rec is None else rec
    else:
        decoder = SpeculativeDecoder(target, drafter if rec is None else rec, k)

    def run(ids: list[int], max_new_tokens: int) -> dict:
        out: list[int] = []
        t0 = time.perf_counter()
        for chunk in decoder.generate(ids, max_new_tokens, None, eos):
            out.extend(chunk)
        total = time.perf_counter() - t0
        st = decoder.stats
        if rec is None:
            hist = [st.target_calls]
        else:
            kk = max(decoder.k, k)  # a tree decoder drafts up to its depth
            hist = [0] * (kk + 1)
            calls = rec.accepted_per_call
            for n in calls[len(calls) - st.target_calls :] if st.target_calls else []:
                hist[min(n, kk)] += 1
        return {
            "precision": st.precision,
            "draft_runs_on": st.draft_runs_on,
            "new_tokens": st.new_tokens,
            "decode_tokens": st.decode_tokens,
            "target_calls": st.target_calls,
            "drafted": st.drafted,
            "accepted": st.accepted,
            "drafted_per_position": list(st.drafted_per_position),
            "accepted_per_position": list(st.accepted_per_position),
            "tokens_per_call": hist,
            "acceptance_length": st.acceptance_length,
            "tokens_per_second": st.tokens_per_second,
            "time_to_first_token": st.time_to_first_token,
            "prefill_seconds": st.prefill_seconds,
            "decode_seconds": st.decode_seconds,
            "draft_seconds": st.draft_seconds,
            "total_seconds": total,
            "stop_reason": st.stop_reason,
            "token_ids": out,
        }

    return run


# --------------------------------------------------------------------------- the run


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_plot(path: Path, plot: Callable[[dict, object], None], results: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        plot(results, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(results: dict, out: Path) -> None:
    """results.json, report.md and the two plots, each written atomically."""
    report.pair_with_plain(results)
    results["summary"] = report.summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.json", json.dumps(results, indent=1))
    _atomic_plot(out / report.ACCEPTANCE_PNG, report.plot_acceptance, results)
    _atomic_plot(out / report.TOKENS_PNG, report.plot_tokens_per_second, results)
    _atomic_write(out / "report.md", report.render_markdown(results))


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SpecrunError("specrun bench draws its plots with matplotlib: pip install 'specrun[bench]'") from None


def run_bench(s: BenchSettings, registry: Registry | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Measure, write the outputs to ``s.out`` and return the results.  On Ctrl-C the partial results
    are written (marked partial) and KeyboardInterrupt propagates."""
    from specrun.drafters import NgramDrafter, NoDrafter
    from specrun.models import resolve_model
    from specrun.pipeline import DRAFTERS, Pipeline

    log = log or (lambda msg: click.echo(msg, err=True))
    # --- everything that can be checked before loading a model
    check_outputs(s.out, s.force)
    for d in s.drafters:
        if d not in DRAFTERS:
            raise SpecrunError(f"unknown drafter '{d}'; choose from: {', '.join(DRAFTERS)}")
    if "model" in s.drafters and not s.drafts.get("model"):
        raise SpecrunError("the 'model' drafter needs --draft PATH (a small model sharing the target's tokenizer)")
    for d in s.drafts:
        if d not in s.drafters:
            raise SpecrunError(f"--draft names drafter '{d}', which is not in --drafter ({', '.join(s.drafters)})")
    for name, v in (("--max-new-tokens", s.max_new_tokens), ("--num-draft-tokens", s.num_draft_tokens),
                    ("--repeats", s.repeats)):
        if v < 1:
            raise SpecrunError(f"{name} must be >= 1, got {v}")
    if s.tree is not None and "eagle3" not in s.drafters:
        raise SpecrunError("--tree applies to the eagle3 drafter; add it to --drafter")
    if s.warmup < 0:
        raise SpecrunError(f"--warmup must be >= 0, got {s.warmup}")
    clash = [b for b in s.backends if b in bl.BASELINES]
    if clash:
        raise SpecrunError(f"'{clash[0]}' is an outside baseline, not a backend; give it with --baseline")
    bl.check_available(s.baseline, s.target, s.baseline_weights)
    _require_matplotlib()
    prompts = load_prompts(s.dataset, s.limit, humaneval_raw=s.humaneval_raw)
    registry = registry or load_registry()
    backend_objs = {b: registry.get(b) for b in s.backends}  # unknown or unavailable: one clear line, before loading
    drafters = ["none"] + [d for d in s.drafters if d != "none"]  # plain decoding always runs
    model_dir = resolve_model(s.target)
    options = {"threads": s.threads} if s.threads else None

    # --- load one target per backend and build the configurations
    configs: list[Config] = []
    systems: list[dict] = []
    pipes: list[Pipeline] = []
    for b in s.backends:
        device = s.devices.get(b) or default_device(backend_objs[b])
        common = dict(backend=b, device=device, precision=s.precisions.get(b), registry=registry,
                      num_draft_tokens=s.num_draft_tokens, options=options)
        # drafters with their own pipeline first (eagle3: the target returns hidden states): they fail fast
        own: dict[str, Pipeline] = {}
        for d in drafters:
            if d not in ("none", "ngram", "model"):
                log(f"specrun bench: loading {model_dir.name} with the {d} drafter on {b}/{device} ...")
                try:
                    tree = {"tree": s.tree} if d == "eagle3" and s.tree else {}
                    own[d] = Pipeline.load(s.target, drafter=d, draft=s.drafts.get(d.split("+")[0]), draft_min_prob=s.draft_min_prob,
                                           draft_gate=s.draft_gate, **common, **tree)
                except SpecrunError as exc:
                    raise SpecrunError(f"drafter '{d}' on backend '{b}': {exc}") from None
                pipes.append(own[d])
        log(f"specrun bench: loading {model_dir.name} on {b}/{device} ...")
        pipe = Pipeline.load(s.target, drafter="model" if "model" in drafters else "none",
                             draft=s.drafts.get("model"), draft_gate=s.draft_gate, **common)
        pipes.append(pipe)
        for d in drafters:
            if d in own:
                o = own[d]
                runner = specrun_runner(o.target, o.drafter, s.num_draft_tokens, pipe.eos_token_ids, template=o.decoder)
            else:
                dr = {"none": NoDrafter(), "ngram": NgramDrafter(min_prob=s.draft_min_prob, paying=s.draft_gate)}[d] \
                    if d != "model" else pipe.drafter
                runner = specrun_runner(pipe.target, dr, s.num_draft_tokens, pipe.eos_token_ids)
            configs.append(Config(b, d, runner))
        systems.append({"name": b, "kind": "specrun", "device": pipe.target.device, "precision": pipe.target.precision,
                        "configs": list(drafters), "plain": "none",
                        "exact_blocks": getattr(pipe.target, "exact_blocks", None)})
    first = pipes[0]  # every pipeline holds the same target model, hence the same tokenizer and EOS ids
    for name in s.baseline:
        log(f"specrun bench: loading the {name} baseline ...")
        base = load_baseline(name, s, model_dir, first.eos_token_ids)
        configs += [Config(name, c, base.runner(c)) for c in base.configs]
        systems.append(base.system())

    # --- prompts to token ids (the chat template applied as `generate` applies it)
    limit = min(p.target.info.context_length for p in pipes)
    encoded: list[tuple[Prompt, list[int]]] = []
    skipped = []
    for p in prompts:
        ids = first.encode(p.text, raw=p.raw or s.raw)
        if len(ids) + s.max_new_tokens + s.num_draft_tokens + 1 > limit:
            skipped.append({"id": p.id, "prompt_tokens": len(ids),
                            "reason": f"{len(ids)} prompt tokens + {s.max_new_tokens} new exceed the context of {limit}"})
            continue
        encoded.append((p, ids))
    if not encoded:
        raise SpecrunError(f"every prompt is too long for the model's context of {limit} tokens; lower --max-new-tokens")
    for sk in skipped:
        log(f"specrun bench: skipping prompt {sk['id']}: {sk['reason']}")

    results: dict = {
        "schema": report.SCHEMA,
        "partial": False,
        "stopped_by": None,
        "command": s.command,
        "started_at": _now(),
        "finished_at": None,
        "elapsed_seconds": None,
        "machine": machine_facts(),
        "versions": versions(),
        "settings": {
            "dataset": s.dataset, "limit": s.limit, "max_new_tokens": s.max_new_tokens,
            "num_draft_tokens": s.num_draft_tokens, "warmup": s.warmup, "repeats": s.repeats,
            "backends": s.backends, "drafters": drafters, "target_name": s.target or "smollm2-135m-instruct",
            "model_dir": str(model_dir), "drafts": s.drafts, "threads": s.threads, "baseline": s.baseline,
            "reference": REFERENCE if REFERENCE in s.baseline else None, "baseline_device": s.baseline_device, "tree": list(s.tree) if s.tree else None,
            "draft_min_prob": _min_prob(s) if any(d.startswith("eagle3") for d in drafters) and not s.tree else None,
            "draft_gate": s.draft_gate if any(d.startswith(("eagle3", "model", "ngram")) for d in drafters) and not s.tree else None,
            "chat_template": not s.raw, "requested_devices": s.devices, "requested_precisions": s.precisions,
            "schedule": "per prompt and repeat, every configuration back to back; the order reverses every round",
        },
        "systems": systems,
        "prompts": [{"index": i, "id": p.id, "category": p.category, "prompt_tokens": len(ids), "text": p.text}
                    for i, (p, ids) in enumerate(encoded)],
        "skipped_prompts": skipped,
        "planned_runs": len(encoded) * s.repeats * len(configs),
        "measurements": [],
    }

    from tqdm import tqdm

    t_start = time.perf_counter()
    total = len(configs) * s.warmup + results["planned_runs"]
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        # warm-up: every configuration on the first prompt, not recorded
        for w in range(s.warmup):
            for c in configs:
                bar.set_postfix_str(f"warm-up {w + 1}: {c.system}/{c.name}", refresh=False)
                c.run(encoded[0][1], s.max_new_tokens)
                bar.update()
        rnd = 0
        for pi, (p, ids) in enumerate(encoded):
            for r in range(s.repeats):
                order = configs if rnd % 2 == 0 else configs[::-1]
                rnd += 1
                for pos, c in enumerate(order):
                    bar.set_postfix_str(f"prompt {pi + 1}/{len(encoded)}: {c.system}/{c.name}", refresh=False)
                    m = c.run(ids, s.max_new_tokens)
                    results["measurements"].append({
                        "system": c.system, "config": c.name, "prompt": pi, "prompt_id": p.id,
                        "category": p.category, "repeat": r, "order": pos, **m,
                    })
                    bar.update()
    except KeyboardInterrupt:
        bar.close()
        _finish(results, t_start, partial="interrupted (Ctrl-C)")
        write_outputs(results, s.out)
        log(f"specrun bench: interrupted; the partial report ({len(results['measurements'])} runs) is in {s.out}")
        raise
    except Exception as exc:
        bar.close()
        if results["measurements"]:
            _finish(results, t_start, partial=f"error: {type(exc).__name__}: {exc}".splitlines()[0])
            write_outputs(results, s.out)
            log(f"specrun bench: stopped by an error; the partial report is in {s.out}")
        raise
    finally:
        bar.close()
        for pipe in pipes:
            pipe.target.close()
            inner = getattr(pipe.drafter, "model", None)
            if isinstance(inner, Target):
                inner.close()
    _finish(results, t_start, partial=None)
    write_outputs(results, s.out)
    return results


def load_baseline(name: str, s: BenchSettings, model_dir: Path, eos: Sequence[int]) -> bl.Baseline:
    k = s.num_draft_tokens
    if name == "transformers":
        return bl.transformers_baseline(model_dir, k, eos, s.baseline_device)
    if name == "llama.cpp":
        return bl.llama_cpp_baseline(bl.gguf_for(s.target), k, eos, s.threads)
    return bl.openvino_genai_baseline(bl.genai_export(model_dir, s.baseline_weights), k, eos, s.threads)


def _finish(results: dict, t_start: float, partial: str | None) -> None:
    results["finished_at"] = _now()
    results["elapsed_seconds"] = time.perf_counter() - t_start
    results["partial"] = partial is not None
    results["stopped_by"] = partial


# --------------------------------------------------------------------------- command line


def _command_line(ctx: click.Context) -> str:
    """The command as typed, reconstructed from the parameters that were not left at their defaults."""
    from click.core import ParameterSource

    parts = ["specrun", ctx.info_name or "bench"]
    for param in ctx.command.params:
        # DEFAULT_MAP: `specrun --backend X bench ...` (the group's option) is written as bench's own
        if not isinstance(param, click.Option) or ctx.get_parameter_source(param.name) not in (
                ParameterSource.COMMANDLINE, ParameterSource.DEFAULT_MAP):
            continue
        value = ctx.params[param.name]
        flag = max(param.opts, key=len)
        if param.is_flag:
            if param.secondary_opts and not value:
                parts.append(max(param.secondary_opts, key=len))
            elif value:
                parts.append(flag)
        else:
            parts += [flag, str(value)]
    import shlex

    return " ".join(shlex.quote(p) if i > 1 else p for i, p in enumerate(parts))


@click.command("bench")
@click.option("--backend", "-b", default="auto", show_default=True,
              help="Backends, comma-separated; auto: the fastest installed for the device (as generate picks).")
@click.option("--drafter", default="none,ngram", show_default=True,
              help="Drafters, comma-separated: none, ngram, model, eagle3, eagle3+ngram (plain decoding always runs).")
@click.option("--dataset", default="mt-bench", show_default=True,
              help=f"{', '.join(DATASETS)}, or a FILE.jsonl with one {{\"prompt\": ...}} a line.")
@click.option("--limit", type=int, default=10, show_default=True, help="Number of prompts (0 = all).")
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--num-draft-tokens", "-k", type=int, default=4, show_default=True, help="Draft tokens per target call.")
@click.option("--draft", default=None,
              help="Draft folder: a small model (--drafter model) or an EAGLE-3 head (eagle3); both: model=DIR,eagle3=DIR.")
@click.option("--target", "-m", default=None, help="Model id or local transformers folder [default: smollm2-135m-instruct].")
@click.option("--device", "-d", default=None, help="Device for every backend, or backend=device pairs [default: cpu].")
@click.option("--precision", default=None, help="Precision for every backend (f32 ...), or backend=precision pairs.")
@threads_option("CPU threads for the backends.")
@click.option("--tree", default=None, metavar="DEPTH,TOPK,NODES",
              help="eagle3: EAGLE-2/3 dynamic tree drafting (e.g. 5,4,16) instead of a chain of k tokens.")
@click.option("--draft-min-prob", type=float, default=None,
              help=f"Stop a draft below this estimated acceptance (eagle3: top draft probability [default: "
                   f"{DEFAULT_MIN_PROB}]; prompt lookup: its acceptance record [default: {DEFAULT_LOOKUP_MIN_PROB}]).")
@click.option("--draft-gate/--no-draft-gate", default=True, show_default=True,
              help="Greedy: a model-backed drafter (eagle3 chains, a draft model) drafts only while its drafts "
                   "measure faster than plain steps on the request, and prompt lookup drafts the length with the most "
                   "expected tokens per measured second; --no-draft-gate: every call drafts all it can.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Unrecorded rounds over every configuration first.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Measured rounds per prompt.")
@click.option("--baseline", "baseline", default=BASELINE, show_default=True,
              help=f"Outside systems to run on the same prompts, comma-separated: {', '.join(bl.BASELINES)} or none "
                   f"(plain and their prompt lookup; with {REFERENCE}, speeds are also given relative to it).")
@click.option("--no-baseline", is_flag=True, help="Run no outside system (= --baseline none).")
@click.option("--baseline-device", default="cpu", show_default=True, help="torch device of the transformers baseline.")
@click.option("--baseline-weights", default="int4", show_default=True,
              help="Weight format of the openvino-genai baseline's export: fp32, int8 or int4 (its fastest here).")
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--humaneval-raw", is_flag=True, help="HumanEval: the code prompt as it is, not a chat request.")
@click.option("--out", "-o", default="bench-out", show_default=True, type=click.Path(path_type=Path),
              help="Folder for report.md, results.json and the plots.")
@click.option("--force", is_flag=True, help="Overwrite an earlier report in --out.")
@click.option("--readme", "readme", default=None, type=click.Path(path_type=Path),
              help="Print the README's performance section from a results.json, and measure nothing.")
@click.pass_context
def bench_command(ctx, backend, drafter, dataset, limit, max_new_tokens, num_draft_tokens, draft, target, device,
                  precision, threads, tree, draft_min_prob, draft_gate, warmup, repeats, baseline, no_baseline, baseline_device, baseline_weights, raw, humaneval_raw, out, force, readme):
    """Measure plain and speculative decoding side by side on real prompts.

    Writes report.md (tables), results.json (every measurement, machine facts, versions) and
    PNG plots to --out.  Ctrl-C writes what was measured so far."""
    if readme is not None:
        click.echo(render_readme(readme), nl=False)
        return
    backends = split_list(backend, "backend")
    auto_precision = None
    if "auto" in backends:
        from specrun.plugins import choose_backend, load_registry

        first_device = (device or "cpu").split(",")[0].split("=")[-1]
        wanted = split_list(drafter, "drafter")  # EAGLE-3 heads need hidden states, trees one-call verification
        needs = ({"hidden_states"} if any(d.startswith("eagle3") for d in wanted) else set()) | \
            ({"tree_attention"} if tree else set())
        name, auto_precision = choose_backend(load_registry(), first_device, needs)
        backends = list(dict.fromkeys(name if b == "auto" else b for b in backends))
        click.echo(f"specrun bench: --backend auto is {name} at {auto_precision} here", err=True)
        if precision is None:
            precision = f"{name}={auto_precision}"
    drafters = split_list(drafter, "drafter")
    settings = BenchSettings(
        backends=backends, drafters=drafters, dataset=dataset, limit=limit or None,
        max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, target=target,
        drafts=draft_paths(draft, drafters),
        devices=per_backend(device, backends, "device", None),
        precisions=per_backend(precision, backends, "precision", None), threads=threads, tree=parse_tree(tree), draft_min_prob=draft_min_prob, draft_gate=draft_gate, warmup=warmup,
        repeats=repeats, baseline=[] if no_baseline else bl.parse_baselines(baseline), baseline_device=baseline_device, baseline_weights=baseline_weights, raw=raw, humaneval_raw=humaneval_raw, out=out, force=force,
        command=_command_line(ctx),
    )
    results = run_bench(settings)
    click.echo(f"specrun bench: wrote {', '.join(str(out / f) for f in OUTPUT_FILES)}", err=True)
    click.echo(report.render_markdown(results).split("## Plots")[0].rstrip())


def render_readme(path: Path) -> str:
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpecrunError(f"{path} not found; give the results.json of a bench run") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecrunError(f"cannot read {path}: {exc}") from None
    if not isinstance(results, dict) or results.get("schema") != report.SCHEMA:
        raise SpecrunError(f"{path} is not a results.json written by specrun bench")
    return report.render_readme_section(results)
