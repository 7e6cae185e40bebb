"""The conformance checks and the runner.

Every check has a stable id (C01..C12).  A run is one backend on one device at one precision; it
produces one CheckResult per (check, model).  The reference is torch_cuda on CPU in fp32."""

from __future__ import annotations

import fnmatch
import itertools
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import numpy as np

from specrun.decode import SpeculativeDecoder
from specrun.drafters import ModelDrafter, NgramDrafter, NoDrafter
from specrun.errors import SpecrunError
from specrun.interfaces import Backend, Draft, Drafter, Target
from specrun.plugins import Registry, load_registry
from specrun.sampling import Sampler, SamplingParams
from specrun.tokenizer import render_chat

from .models import ARCHS, tiny_model

HERE = Path(__file__).parent
REFERENCE = ("torch_cuda", "cpu", "f32")
SAMPLING_ALPHA = 1e-3  # false-alarm rate of the sampling test (C09) for a correct backend
STATUSES = ("passed", "failed", "xfail", "xpass", "not_applicable", "error")


# ----------------------------------------------------------------------------- data


@attrs.frozen
class Tolerance:
    logits_atol: float
    self_atol: float
    hidden_rtol: float
    near_tie: float
    source: str  # "f32" or "override openvino/bf16: <reason>"


TOLERANCE_KEYS = ("logits_atol", "self_atol", "hidden_rtol", "near_tie")


def _read_toml(path: Path, what: str) -> dict:
    """A TOML file of the suite's data, or one line saying why it cannot be used."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecrunError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecrunError(f"cannot read {what} {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecrunError(f"{what} {path} is not valid TOML: {exc}") from None


def backend_requirements(backend_obj) -> Path | None:
    """The conformance file a backend ships with itself (``Backend.conformance_requirements``):
    its tolerance overrides (``[overrides.BACKEND.PRECISION]``) and expected failures
    (``[[xfail]]``), kept with the backend as SQLAlchemy dialects keep their ``Requirements``."""
    get = getattr(backend_obj, "conformance_requirements", None)
    path = get() if get is not None else None
    if path is not None and not Path(path).is_file():
        raise SpecrunError(f"backend conformance file {path} is missing; reinstall the backend's package")
    return None if path is None else Path(path)


def load_tolerances(backend: str, precision: str, extra: Path | None = None, own: Path | None = None) -> Tolerance:
    data = _read_toml(HERE / "tolerances.toml", "tolerance file")
    where = HERE / "tolerances.toml"
    for more_path in [p for p in (own, extra) if p is not None]:
        more = _read_toml(more_path, "tolerance file")
        overrides = more.get("overrides", {})
        if not isinstance(overrides, dict) or not all(
                isinstance(v, dict) and all(isinstance(o, dict) for o in v.values()) for v in overrides.values()):
            raise SpecrunError(f"tolerance file {more_path}: overrides must be tables [overrides.BACKEND.PRECISION]")
        for k, v in overrides.items():
            data.setdefault("overrides", {}).setdefault(k, {}).update(v)
        where = f"{where} + {more_path}"
    for be_name, tables in data.get("overrides", {}).items():  # every override, not only this run's
        for prec, override in tables.items():
            if not override.get("reason"):
                raise SpecrunError(f"tolerance override for {be_name}/{prec} has no reason; every override needs one")
            unknown = sorted(set(override) - {*TOLERANCE_KEYS, "reason"})
            if unknown:
                raise SpecrunError(f"tolerance override for {be_name}/{prec} sets unknown key '{unknown[0]}'; "
                                   f"known: {', '.join(TOLERANCE_KEYS)}, reason ({where})")
            for k in TOLERANCE_KEYS:
                if k in override:
                    _tolerance_value(override[k], f"tolerance {k} for {be_name}/{prec}", where)
    base_precision = precision if precision in data else "f32"
    values = dict(data[base_precision])
    source = base_precision
    override = data.get("overrides", {}).get(backend, {}).get(precision)
    if override:
        values.update({k: v for k, v in override.items() if k != "reason"})
        source = f"{base_precision}, override for {backend}: {override['reason']}"
    out = {k: _tolerance_value(values.get(k), f"tolerance {k} for {backend}/{precision}", where) for k in TOLERANCE_KEYS}
    return Tolerance(source=source, **out)


def _tolerance_value(v, what: str, where) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not (v >= 0):
        raise SpecrunError(f"{what} must be a number >= 0, got {v!r} ({where})")
    return float(v)


@attrs.frozen
class ExpectedFailure:
    backend: str
    check: str
    reason: str
    precision: str = "*"
    model: str = "*"
    device: str = "*"

    def matches(self, backend: str, device: str, precision: str, check: Check, model: str) -> bool:
        return (
            fnmatch.fnmatch(backend, self.backend)
            and fnmatch.fnmatch(device, self.device)
            and fnmatch.fnmatch(precision, self.precision)
            and (self.check in ("*", check.id, check.name))
            and fnmatch.fnmatch(model, self.model)
        )


def load_expected_failures(extra: Path | None = None, own: Path | None = None) -> list[ExpectedFailure]:
    entries = []
    for path in [HERE / "expected_failures.toml", *([Path(own)] if own else []), *([Path(extra)] if extra else [])]:
        data = _read_toml(path, "expected-failure list")
        listed = data.get("xfail", [])
        if not isinstance(listed, list):
            raise SpecrunError(f"{path}: 'xfail' must be an array of tables ([[xfail]] entries)")
        for i, e in enumerate(listed):
            if not isinstance(e, dict):
                raise SpecrunError(f"{path}: xfail entry {i + 1} is not a table; write it as [[xfail]]")
            if not e.get("reason"):
                raise SpecrunError(f"{path}: xfail entry {i + 1} has no reason; every entry needs one")
            wrong = next((k for k, v in e.items() if not isinstance(v, str)), None)
            if wrong is not None:
                raise SpecrunError(f"{path}: xfail entry {i + 1}: {wrong} must be a string, got {e[wrong]!r}")
            try:
                entries.append(ExpectedFailure(**e))
            except TypeError as exc:
                raise SpecrunError(f"{path}: xfail entry {i + 1}: {exc}") from None
    return entries


@attrs.define
class CheckResult:
    check: str
    name: str
    model: str
    status: str
    message: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: float | None = None
    worst_position: list[int] | None = None
    shapes: str = ""
    seconds: float = 0.0
    details: dict = attrs.field(factory=dict)


class CheckFailed(AssertionError):
    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.fields = fields


class NotApplicable(Exception):
    pass


@attrs.frozen
class Check:
    id: str
    name: str
    description: str
    fn: Callable[[Context], dict]
    needs: frozenset[str] = frozenset()
    models: str = "all"  # "all" | "first": run on every model, or only on the first (a tiny one)


# ----------------------------------------------------------------------------- context


class Context:
    """Everything one check needs for one (backend, device, precision, model)."""

    def __init__(self, run: Run, model: str, model_dir: Path):
        self.run, self.model, self.model_dir = run, model, model_dir
        self.tol = run.tolerance
        self._targets: dict[tuple, Target] = {}
        rng = np.random.default_rng(1234)
        from specrun.models import ModelConfig

        self.config = ModelConfig.load(model_dir)
        self.vocab = self.config.vocab_size
        self.prompt = [int(t) for t in rng.integers(3, min(self.vocab, 30000), 24)]
        self.text_prompt = self._text_prompt()

    def _text_prompt(self) -> list[int]:
        """A real chat prompt for models with a tokenizer; random ids otherwise."""
        if not (self.model_dir / "tokenizer.json").exists():
            return self.prompt
        from specrun.pipeline import load_tokenizer

        tok = load_tokenizer(self.model_dir)
        msgs = [{"role": "user", "content": "Rewrite with one word changed: the quick brown fox jumps over the lazy dog."}]
        if getattr(tok, "chat_template", None):
            return tok.encode(render_chat(tok, msgs, add_generation_prompt=True), add_special_tokens=False)
        return tok.encode(msgs[0]["content"])

    def label(self) -> str:
        r = self.run
        return f"[{r.backend_name} {r.device} {r.precision}] model={self.model}"

    def aux_layers(self) -> tuple[int, ...]:
        n = self.config.num_layers
        return tuple(sorted({0, n // 2, n - 1}))

    def target(self, *, reference: bool = False, aux: bool = False, model_dir: Path | None = None, role: str = "target") -> Target:
        """A loaded target (cached per role: a drafter needs its own instance even of the same model)."""
        model_dir = model_dir or self.model_dir
        key = (reference, aux, str(model_dir), role)
        if key not in self._targets:
            layers = self.aux_layers() if aux else ()
            if reference:
                be, dev, prec = self.run.reference_backend, REFERENCE[1], REFERENCE[2]
            else:
                be, dev, prec = self.run.backend, self.run.device, self.run.precision
            self._targets[key] = be.load_target(str(model_dir), device=dev, precision=prec, aux_hidden_layers=layers,
                                                **self.run.load_options(reference))
        return self._targets[key]

    def draft_model_dir(self) -> Path:
        """A different model with the same vocabulary (the tiny llama; the tiny qwen2 for the tiny llama)."""
        return tiny_model("qwen2" if self.model == "tiny-llama" else "llama")

    def close(self) -> None:
        for t in self._targets.values():
            t.close()
        self._targets.clear()


def compare(got: np.ndarray, ref: np.ndarray, atol: float, what: str, ctx: Context, rtol: float = 0.0) -> dict:
    """Element-wise |got - ref| <= atol + rtol * |ref|; reports the worst element."""
    if got.shape != ref.shape:
        raise CheckFailed(f"{what}: shape {got.shape} differs from the reference's {ref.shape}", shapes=f"{got.shape} vs {ref.shape}")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(g - r)
    excess = diff - rtol * np.abs(r)
    worst = np.unravel_index(int(np.argmax(excess)), diff.shape)
    max_abs = float(diff.max())
    max_rel = float((diff / np.maximum(np.abs(r), 1e-6)).max()) if rtol else max_abs / (float(np.abs(r).max()) or 1.0)
    fields = dict(max_abs=max_abs, max_rel=max_rel, tolerance=atol, worst_position=[int(i) for i in worst], shapes=str(tuple(got.shape)))
    if not float(excess[worst]) <= atol:
        bound = f"{atol:.3g} + {rtol:.3g} * |ref|" if rtol else f"{atol:.3g}"
        raise CheckFailed(
            f"{what}: abs error {float(diff[worst]):.3g} > tolerance {bound} at position {tuple(int(i) for i in worst)} "
            f"(got {float(got[worst]):.5g}, reference {float(ref[worst]):.5g}), shape {got.shape}",
            **fields,
        )
    return fields


def greedy_trace(target: Target, prompt: Sequence[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Plain greedy decoding one token at a time, keeping every step's logits."""
    target.reset(len(prompt) + n + 1)
    logits = target.forward(list(prompt), all_logits=False).logits[-1]
    toks, all_logits = [], []
    for _ in range(n):
        all_logits.append(logits)
        tok = int(np.argmax(logits))
        toks.append(tok)
        logits = target.forward([tok]).logits[0]
    return toks, all_logits


def decode(target: Target, drafter: Drafter, prompt: Sequence[int], n: int, k: int = 4, sampling=None) -> tuple[list[int], object]:
    dec = SpeculativeDecoder(target, drafter, k)
    out = [t for chunk in dec.generate(list(prompt), n, sampling) for t in chunk]
    return out, dec.stats


def top2_margin(logits: np.ndarray) -> float:
    a, b = np.partition(logits, -2)[-2:]
    return float(abs(b - a))


# ----------------------------------------------------------------------------- checks


def c01_prefill(ctx: Context) -> dict:
    got = _fresh(ctx.target(), ctx.prompt)
    ref = _fresh(ctx.target(reference=True), ctx.prompt)
    return compare(got, ref, ctx.tol.logits_atol, "prefill logits vs reference", ctx)


def _fresh(target: Target, tokens: Sequence[int]) -> np.ndarray:
    target.reset(len(tokens) + 8)
    return target.forward(list(tokens)).logits


def c02_incremental(ctx: Context) -> dict:
    t = ctx.target()
    t.reset(len(ctx.prompt) + 8)
    got = np.stack([t.forward([tok]).logits[0] for tok in ctx.prompt])
    ref = _fresh(ctx.target(reference=True), ctx.prompt)
    return compare(got, ref, ctx.tol.logits_atol, "one-token-at-a-time logits vs reference prefill", ctx)


def c03_block(ctx: Context) -> dict:
    t, k = ctx.target(), 5
    t.reset(len(ctx.prompt) + 8)
    t.forward(ctx.prompt[:12])
    block = t.forward(ctx.prompt[12 : 12 + k]).logits
    t.rollback(12)
    steps = np.stack([t.forward([tok]).logits[0] for tok in ctx.prompt[12 : 12 + k]])
    if t.length != 12 + k:
        raise CheckFailed(f"cache length is {t.length} after 12 + {k} tokens")
    if getattr(t, "exact_blocks", None) is True:  # the target promises bit-identical blocks
        diff = int((block != steps).sum())
        if diff:
            raise CheckFailed(f"the target claims exact_blocks, but a block of {k} tokens differs from {k} single steps "
                              f"in {diff} logits (max abs {float(np.abs(block - steps).max()):.3g}); set exact_blocks = False "
                              "or make blocks batch-invariant")
    return compare(block, steps, ctx.tol.self_atol, f"block of {k} tokens vs {k} single steps (same backend)", ctx)


def c04_rollback(ctx: Context) -> dict:
    t = ctx.target()
    p = ctx.prompt
    t.reset(len(p) + 16)
    t.forward(p[:12])
    t.forward([(x * 7 + 3) % ctx.vocab for x in p[12:17]])  # a draft that gets rejected
    t.rollback(12)
    if t.length != 12:
        raise CheckFailed(f"length is {t.length} after rollback(12)")
    cont = t.forward(p[12:18]).logits
    t.forward([5, 6])
    t.rollback(13)  # roll back into the middle of an accepted block
    cont2 = t.forward(p[13:18]).logits
    fresh = _fresh(t, p[:18])[12:]
    fields = compare(cont, fresh, ctx.tol.self_atol, "rollback then continue vs a fresh run on the prefix", ctx)
    compare(cont2, fresh[1:], ctx.tol.self_atol, "second rollback (mid-block) then continue vs a fresh run", ctx)
    return fields


def c05_hidden(ctx: Context) -> dict:
    got = ctx.target(aux=True)
    ref = ctx.target(reference=True, aux=True)
    got.reset(32)
    ref.reset(32)
    g = got.forward(ctx.prompt[:16]).hidden_states
    r = ref.forward(ctx.prompt[:16]).hidden_states
    if g is None:
        raise CheckFailed(f"backend declared hidden_states but returned none for layers {ctx.aux_layers()}")
    fields = _rows_close(g, r, ctx, f"hidden states (inputs of layers {ctx.aux_layers()})")
    g2 = got.forward(ctx.prompt[16:18], all_logits=False).hidden_states
    r2 = ref.forward(ctx.prompt[16:18], all_logits=False).hidden_states
    _rows_close(g2, r2, ctx, "hidden states with all_logits=False (must cover every position)")
    return fields


def _rows_close(got: np.ndarray | None, ref: np.ndarray, ctx: Context, what: str) -> dict:
    """Per position, the relative L2 error ||got - ref|| / ||ref|| of the concatenated hidden states
    (robust to the massive activations of real models, where an element-wise bound is meaningless)."""
    if got is None or got.shape != ref.shape:
        raise CheckFailed(f"{what}: shape {None if got is None else got.shape} differs from the reference's {ref.shape}")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    rel = np.linalg.norm(g - r, axis=-1) / np.maximum(np.linalg.norm(r, axis=-1), 1e-12)
    row = int(np.argmax(rel))
    diff = np.abs(g - r)
    fields = dict(max_abs=float(diff.max()), max_rel=float(rel[row]), tolerance=ctx.tol.hidden_rtol,
                  worst_position=[row], shapes=str(tuple(got.shape)))
    if not rel[row] <= ctx.tol.hidden_rtol:
        raise CheckFailed(
            f"{what}: relative L2 error {rel[row]:.3g} > tolerance {ctx.tol.hidden_rtol:.3g} at position {row} "
            f"(max abs error there {diff[row].max():.3g}), shape {got.shape}",
            **fields,
        )
    return fields


class RecordingDrafter(Drafter):
    def __init__(self, inner: Drafter):
        self.inner, self.name, self.proposals = inner, inner.name, []

    def start(self, prompt, capacity):
        self.inner.start(prompt, capacity)

    def propose(self, tokens, k, sampler):
        d = self.inner.propose(tokens, k, sampler)
        self.proposals.append((len(tokens), list(d.tokens)))
        return d

    def accepted(self, tokens, n, hidden_states=None):
        self.inner.accepted(tokens, n, hidden_states)


def c06_drafter(ctx: Context) -> dict:
    """The model-backed drafter on this backend proposes what it proposes on the reference (with the
    reference as target, so both see the same accepted sequence)."""
    ref_target = ctx.target(reference=True)
    draft_dir = ctx.model_dir
    runs = []
    for reference in (False, True):
        drafter = RecordingDrafter(ModelDrafter(ctx.target(reference=reference, model_dir=draft_dir, role="draft"), ctx.vocab))
        out, _ = decode(ref_target, drafter, ctx.text_prompt, 24, k=3)
        runs.append((out, drafter.proposals))
    (out_b, props_b), (out_r, props_r) = runs
    if out_b != out_r:
        raise CheckFailed("the reference target's greedy output changed with the drafter's backend (the drafter broke losslessness)")
    # where proposals differ, the drafter (the same model) must sit at a near-tie on the reference
    ref_draft = ctx.target(reference=True, model_dir=draft_dir, role="draft")
    ties = []
    for (pos_b, pb), (pos_r, pr) in zip(props_b, props_r, strict=False):
        if pos_b != pos_r:  # after a tie-broken proposal the steps fall out of step: stop comparing
            break
        if pb == pr:
            continue
        i = next(j for j in range(min(len(pb), len(pr))) if pb[j] != pr[j])
        seq = out_r[: pos_r - len(ctx.text_prompt)]
        ctx_tokens = list(ctx.text_prompt) + seq + pr[:i]
        logits = _fresh(ref_draft, ctx_tokens)[-1]
        margin = top2_margin(logits)
        if margin >= ctx.tol.near_tie:
            raise CheckFailed(
                f"draft proposal differs from the reference at sequence position {pos_r + i}: got token {pb[i]}, "
                f"reference {pr[i]}, reference top-2 margin {margin:.3g} >= near-tie tolerance {ctx.tol.near_tie:.3g}",
                worst_position=[pos_r + i], tolerance=ctx.tol.near_tie,
            )
        ties.append({"position": pos_r + i, "margin": margin})
    return {"details": {"proposals": len(props_r), "near_ties": ties}}


class PerturbedOracle(Drafter):
    """Proposes the true continuation with every third token wrong: exercises partial acceptance."""

    name = "perturbed-oracle"

    def __init__(self, truth: list[int], prompt_len: int, vocab: int):
        self.truth, self.p, self.vocab = truth, prompt_len, vocab

    def propose(self, tokens, k, sampler):
        pos = len(tokens) - self.p
        prop = list(self.truth[pos : pos + k])
        for i in range(len(prop)):
            if (pos + i) % 3 == 2:
                prop[i] = (prop[i] + 1) % self.vocab
        return Draft(prop)


def c07_greedy_lossless(ctx: Context) -> dict:
    t = ctx.target()
    n = 32
    plain, plain_logits = greedy_trace(t, ctx.text_prompt, n)
    ties = []
    draft_target = ctx.target(model_dir=ctx.draft_model_dir(), role="draft")
    drafters = {
        "ngram": NgramDrafter(),
        "model": ModelDrafter(draft_target, ctx.vocab),
        "perturbed-oracle": PerturbedOracle(plain, len(ctx.text_prompt), ctx.vocab),
    }
    stats = {}
    for name, k in (("ngram", 4), ("model", 3), ("perturbed-oracle", 1), ("perturbed-oracle", 4)):
        out, st = decode(t, drafters[name], ctx.text_prompt, n, k=k)
        if out != plain:
            i = next((j for j in range(min(len(out), len(plain))) if out[j] != plain[j]), min(len(out), len(plain)))
            # a block and single steps may round differently (bf16, int8): a divergence is tolerated
            # only where plain decoding itself sat at a near-tie, within twice the block-vs-steps bound
            if i < len(plain) and i < len(out):
                margin = top2_margin(plain_logits[i])
                if margin < 2 * ctx.tol.self_atol and plain_logits[i][out[i]] >= plain_logits[i].max() - 2 * ctx.tol.self_atol:
                    ties.append({"drafter": name, "k": k, "position": i, "margin": margin})
                    stats[f"{name}-k{k}"] = {"near_tie_divergence_at": i}
                    continue
            raise CheckFailed(
                f"speculative output with the {name} drafter (k={k}) differs from plain greedy at new token {i}: "
                f"{out[i:i + 3]} vs {plain[i:i + 3]}",
                worst_position=[i],
            )
        stats[f"{name}-k{k}"] = {"acceptance_length": st.acceptance_length, "accepted": st.accepted, "drafted": st.drafted}
    po = stats["perturbed-oracle-k4"]
    if "accepted" in po and (po["accepted"] == 0 or po["accepted"] == po["drafted"]):
        raise CheckFailed("the perturbed oracle should be partly accepted; acceptance bookkeeping is wrong")
    return {"details": {**stats, "divergences": ties}}


def c08_cross_greedy(ctx: Context) -> dict:
    n = 32
    got, _ = greedy_trace(ctx.target(), ctx.text_prompt, n)
    ref, ref_logits = greedy_trace(ctx.target(reference=True), ctx.text_prompt, n)
    if got == ref:
        return {"details": {"identical_tokens": n, "divergences": []}}
    i = next(j for j in range(n) if got[j] != ref[j])
    margin = top2_margin(ref_logits[i])
    gap = float(ref_logits[i].max() - ref_logits[i][got[i]])  # how far below the reference's best the chosen token is
    div = {"position": i, "got": got[i], "reference": ref[i], "reference_margin": margin, "reference_gap": gap}
    if gap < ctx.tol.near_tie:
        return {"details": {"identical_tokens": i, "divergences": [div]}, "worst_position": [i], "tolerance": ctx.tol.near_tie}
    raise CheckFailed(
        f"greedy output diverges from the reference at new token {i} (got {got[i]}, reference {ref[i]}): the reference "
        f"scores the chosen token {gap:.3g} below its best, not a near-tie (tolerance {ctx.tol.near_tie:.3g})",
        worst_position=[i], tolerance=ctx.tol.near_tie, details={"divergences": [div]},
    )


class _SkewedSampler:
    """Draws with the request's generator from q = (p + reversed p) / 2 on p's support: a draft
    distribution that differs from the target's and is accepted part of the time."""

    def __init__(self, inner: Sampler):
        self.inner = inner

    def probs(self, logits):
        p = self.inner.probs(logits)
        inv = np.where(p > 0, 1.0 / np.where(p > 0, p, 1.0), 0.0)
        return 0.5 * p + 0.5 * inv / inv.sum()

    def sample(self, probs):
        return self.inner.sample(probs)


class SkewedModelDrafter(ModelDrafter):
    """The target's own model, with its preferences partly reversed when sampling."""

    def propose(self, tokens, k, sampler):
        return super().propose(tokens, k, _SkewedSampler(sampler) if sampler else None)


def c09_sampling(ctx: Context) -> dict:
    """Chi-square test of the joint distribution of 3 sampled tokens against the exact target
    distribution computed from this backend's own logits (top-k 3 keeps the support small)."""
    from scipy import stats as sps

    t = ctx.target()
    params = SamplingParams(temperature=1.0, top_k=3)
    proc = Sampler(params)
    prompt = ctx.prompt[:8]
    n_new, n_runs = 3, 1000

    def dist(prefix):
        # the distribution plain decoding samples from: the prompt's prefill, then one step per
        # token (a runtime may compute a prefill's rows otherwise than steps; C02 bounds that)
        t.reset(len(prompt) + 8)
        logits = t.forward(list(prompt), all_logits=False).logits[-1]
        for tok in prefix:
            logits = t.forward([int(tok)]).logits[0]
        return proc.probs(logits)

    expected: dict[tuple, float] = {}
    p1 = dist(())
    for a in np.flatnonzero(p1):
        p2 = dist((a,))
        for b in np.flatnonzero(p2):
            p3 = dist((a, b))
            for c in np.flatnonzero(p3):
                expected[(int(a), int(b), int(c))] = p1[a] * p2[b] * p3[c]
    drafter = SkewedModelDrafter(ctx.target(role="draft"), ctx.vocab)
    counts: dict[tuple, int] = {}
    accepted = drafted = 0
    for seed in range(n_runs):
        out, st = decode(t, drafter, prompt, n_new, k=2, sampling=SamplingParams(1.0, 3, 1.0, seed))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        accepted, drafted = accepted + st.accepted, drafted + st.drafted
    impossible = [s for s in counts if s not in expected]
    if impossible:
        raise CheckFailed(f"sampled sequences outside the target's top-k support: {impossible[:3]}")
    seqs = sorted(expected)
    obs = np.array([counts.get(s, 0) for s in seqs], float)
    exp = np.array([expected[s] for s in seqs]) * n_runs
    rare = exp < 5
    if rare.any():
        obs, exp = np.append(obs[~rare], obs[rare].sum()), np.append(exp[~rare], exp[rare].sum())
    pvalue = float(sps.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)
    details = {"p_value": pvalue, "alpha": SAMPLING_ALPHA, "runs": n_runs, "cells": len(obs), "acceptance_rate": accepted / max(drafted, 1)}
    if pvalue < SAMPLING_ALPHA:
        raise CheckFailed(
            f"speculative sampling does not reproduce the target distribution: chi-square p = {pvalue:.2e} < alpha "
            f"{SAMPLING_ALPHA} over {n_runs} seeded runs ({len(obs)} cells)",
            details=details,
        )
    return {"details": details}


def c10_errors(ctx: Context) -> dict:
    be = ctx.run.backend
    checked = []
    # an absent device
    absent = [d for d in be.known_devices() if d not in be.devices()][:1]
    for dev in [*absent, "no-such-device-xyz"]:
        try:
            be.load_target(str(ctx.model_dir), device=dev, precision=ctx.run.precision)
        except SpecrunError as exc:
            checked.append(f"device {dev}: {exc}")
        except Exception as exc:
            raise CheckFailed(f"asking for device '{dev}' raised {type(exc).__name__} instead of a SpecrunError: {exc}") from None
        else:
            raise CheckFailed(f"asking for absent device '{dev}' did not fail")
    # an unsupported precision
    try:
        be.load_target(str(ctx.model_dir), device=ctx.run.device, precision="int3")
    except SpecrunError as exc:
        checked.append(f"precision int3: {exc}")
    except Exception as exc:
        raise CheckFailed(f"asking for precision 'int3' raised {type(exc).__name__} instead of a SpecrunError: {exc}") from None
    else:
        raise CheckFailed("asking for precision 'int3' did not fail")
    # unreadable (truncated) weights
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / "broken"
        shutil.copytree(ctx.model_dir, broken)
        for w in broken.glob("*.safetensors"):
            w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        try:
            be.load_target(str(broken), device=ctx.run.device, precision=ctx.run.precision)
        except SpecrunError as exc:
            checked.append(f"truncated weights: {exc}")
        except Exception as exc:
            raise CheckFailed(f"truncated weights raised {type(exc).__name__} instead of a SpecrunError: {exc}") from None
        else:
            raise CheckFailed("a model folder with truncated weights loaded without error")
    # an over-long prompt
    t = ctx.target()
    limit = t.info.context_length
    try:
        list(SpeculativeDecoder(t, NoDrafter(), 2).generate([3] * limit, 8))
    except SpecrunError as exc:
        checked.append(f"over-long prompt: {exc}")
    else:
        raise CheckFailed(f"a prompt of {limit} tokens + 8 new tokens with a {limit}-token context did not fail")
    t.reset(8)
    try:
        t.forward([3] * (limit + 1))
    except SpecrunError as exc:
        checked.append(f"over-long forward: {exc}")
    except Exception as exc:
        raise CheckFailed(f"a forward past the context limit raised {type(exc).__name__} instead of a SpecrunError") from None
    else:
        raise CheckFailed(f"a forward of {limit + 1} tokens past the context limit did not fail")
    # mismatched vocabularies
    other = tiny_model("llama-v1000")
    try:
        ModelDrafter(ctx.target(model_dir=other), ctx.vocab)
    except SpecrunError as exc:
        checked.append(f"vocabulary: {exc}")
    else:
        raise CheckFailed("a draft model with another vocabulary was accepted")
    return {"details": {"errors": checked}}


def c11_determinism(ctx: Context) -> dict:
    t = ctx.target()
    a, _ = decode(t, NgramDrafter(), ctx.text_prompt, 16)
    b, _ = decode(t, NgramDrafter(), ctx.text_prompt, 16)
    if a != b:
        raise CheckFailed("two greedy runs gave different outputs")
    drafter = ModelDrafter(ctx.target(model_dir=ctx.draft_model_dir(), role="draft"), ctx.vocab)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    s1, _ = decode(t, drafter, ctx.text_prompt, 16, sampling=params)
    s2, _ = decode(t, drafter, ctx.text_prompt, 16, sampling=params)
    if s1 != s2:
        raise CheckFailed(f"two sampled runs with seed 42 differ: {s1[:6]} vs {s2[:6]}")
    return {"details": {"greedy": a[:8], "sampled": s1[:8]}}


def _head_calls(head, rng_seed: int, width: int) -> list:
    """prefix block from target hidden states, 3 draft steps on the head's own outputs, rollback,
    one more real block."""
    rng = np.random.default_rng(rng_seed)
    vocab = head.config.vocab_size
    toks = [int(t) for t in rng.integers(3, min(vocab, 30000), 12)]
    hid = rng.normal(size=(12, width)).astype(np.float32)
    head.reset(32)
    outs = [head.forward(toks[:6], hid[:6])]
    prev = outs[-1].hidden[-1:]
    for t in toks[6:9]:
        outs.append(head.forward([t], prev, from_target=False))
        prev = outs[-1].hidden
    head.rollback(6)
    outs.append(head.forward(toks[9:12], hid[9:12]))
    return outs


class SteeredHead:
    """Wraps a backend's head (its forward, cache and rollback all run) and raises the logit of the
    target's true next token, except at every 5th entry: drafts are then partly accepted, so
    losslessness is tested under partial acceptance, not only under rejection."""

    def __init__(self, real, truth: dict[tuple, int]):
        self.real, self.truth, self.seq = real, truth, []
        self.config, self.d2t = real.config, real.d2t
        self.backend, self.device, self.precision = real.backend, real.device, real.precision
        self.ids = np.arange(len(real.d2t)) + np.asarray(real.d2t)

    @classmethod
    def toward(cls, real, prompt, continuation) -> SteeredHead:
        """Steer toward ``continuation`` after ``prompt``.  The head's entry t holds token t+1,
        so the head prefix ending with token j+1 is followed by token j+2."""
        full = [int(t) for t in prompt] + [int(t) for t in continuation]
        return cls(real, {tuple(full[1 : j + 2]): full[j + 2] for j in range(len(full) - 2)})

    @property
    def length(self) -> int:
        return self.real.length

    def reset(self, capacity: int) -> None:
        self.real.reset(capacity)
        self.seq = []

    def rollback(self, length: int) -> None:
        self.real.rollback(length)
        del self.seq[length:]

    def forward(self, tokens, hidden, *, from_target=True, positions=None, mask=None):
        out = self.real.forward(tokens, hidden, from_target=from_target, positions=positions, mask=mask)
        base = len(self.seq)
        self.seq.extend(tokens)
        logits = out.logits.copy()
        for i in range(len(tokens)):
            nxt = self.truth.get(tuple(self.seq[: base + i + 1]))
            j = np.searchsorted(self.ids, nxt) if nxt is not None else -1
            if nxt is not None and (base + i + 1) % 5 and j < len(self.ids) and self.ids[j] == nxt:
                logits[i, j] = logits[i].max() + 10.0
        return type(out)(logits, out.hidden)


def c12_eagle3(ctx: Context) -> dict:
    """An EAGLE-3 head in the SpecForge format (random weights, exact tensor names) runs on the
    backend like on the reference, and chain (and tree) drafting with it are lossless."""
    from specrun.decode import TreeSpeculativeDecoder
    from specrun.drafters import Eagle3Drafter

    from .models import eagle3_head

    aux = ctx.aux_layers()
    head_dir = eagle3_head(ctx.model, ctx.model_dir, aux)
    be = ctx.run.backend
    head = be.load_eagle3_head(str(head_dir), str(ctx.model_dir), device=ctx.run.device,
                               precision="f32" if ctx.run.precision == "f32" else None, **ctx.run.load_options())
    ref = ctx.run.reference_backend.load_eagle3_head(str(head_dir), str(ctx.model_dir), device="cpu", precision="f32")
    tol = load_tolerances(ctx.run.backend_name, head.precision, own=ctx.run.own_file) if head.precision != ctx.run.precision else ctx.tol
    width = head.config.num_aux * head.config.target_hidden_size
    got, want = _head_calls(head, 5, width), _head_calls(ref, 5, width)
    fields: dict = {}
    for i, (g, r) in enumerate(zip(got, want, strict=True)):
        f = compare(g.logits, r.logits, tol.logits_atol, f"head call {i} ({head.precision}) draft logits vs the torch head", ctx)
        if not fields or f["max_abs"] > fields["max_abs"]:
            fields = f
        _rows_close(g.hidden, r.hidden, ctx, f"head call {i} output state vs the torch head")
    target = ctx.target(aux=True)
    plain, plain_logits = greedy_trace(target, ctx.text_prompt, 16)

    def same(out: list[int]) -> bool:
        """Equal to plain greedy, or first diverging at a near-tie of plain decoding (as in C07)."""
        i = next((j for j, (a, b) in enumerate(zip(out, plain, strict=False)) if a != b), None)
        if i is None:
            return len(out) == len(plain)
        lg, bound = plain_logits[i], 2 * ctx.tol.self_atol
        return top2_margin(lg) < bound and lg[out[i]] >= lg.max() - bound

    steered = SteeredHead.toward(head, ctx.text_prompt, plain)
    for k in (1, 3):
        out, st = decode(target, Eagle3Drafter(steered, num_target_layers=ctx.config.num_layers), ctx.text_prompt, 16, k=k)
        if not same(out):
            raise CheckFailed(f"eagle3 chain drafting (k={k}) changed the greedy output: {out[:8]} vs {plain[:8]}", **fields)
        if k == 3 and not 0 < st.accepted < st.drafted:
            raise CheckFailed(f"the steered head's drafts were accepted {st.accepted} of {st.drafted} times: the check "
                              "needs partial acceptance (head cache or hidden-state rows out of step?)", **fields)
    if "tree_attention" in be.capabilities():
        dec = TreeSpeculativeDecoder(target, Eagle3Drafter(steered, num_target_layers=ctx.config.num_layers, tree_topk=2), 3, 6)
        out = [t for chunk in dec.generate(ctx.text_prompt, 16) for t in chunk]
        if not same(out):
            raise CheckFailed(f"eagle3 tree drafting changed the greedy output: {out[:8]} vs {plain[:8]}", **fields)
    head.close()
    ref.close()
    return fields


CHECKS: tuple[Check, ...] = (
    Check("C01", "prefill-parity", "prefill logits match the reference", c01_prefill),
    Check("C02", "incremental-parity", "one-token-at-a-time logits match the reference", c02_incremental),
    Check("C03", "block-equals-steps", "a block of k tokens equals k single steps", c03_block),
    Check("C04", "rollback", "rollback then continue equals a fresh run on the accepted prefix", c04_rollback),
    Check("C05", "hidden-states-parity", "hidden states of chosen layers (EAGLE-3 inputs) match", c05_hidden, frozenset({"hidden_states"})),
    Check("C06", "drafter-parity", "the model-backed drafter proposes what it proposes on the reference", c06_drafter),
    Check("C07", "greedy-lossless", "speculative greedy output equals plain greedy output", c07_greedy_lossless),
    Check("C08", "cross-backend-greedy", "greedy output agrees with the reference but at near-ties", c08_cross_greedy),
    Check("C09", "sampling-lossless", "speculative sampling reproduces the target's distribution", c09_sampling, models="first"),
    Check("C10", "documented-errors", "absent device, over-long prompt, mismatched vocabularies fail clearly", c10_errors, models="first"),
    Check("C11", "seeded-determinism", "the same seed gives the same output", c11_determinism, models="first"),
    Check("C12", "eagle3-head", "a SpecForge-format EAGLE-3 head matches the torch head; chain/tree drafting stay lossless",
          c12_eagle3, frozenset({"eagle3", "hidden_states"}), models="first"),
)


# ----------------------------------------------------------------------------- running

#: the stable check ids; a run that plans fewer of them than this is refused (a guard against a
#: check disappearing silently from the tuple above)
STABLE_IDS = tuple(f"C{i:02d}" for i in range(1, 13))

#: the capabilities the suite knows (docs/writing-a-backend.md, section 4), besides the
#: informational ``weights:<format>``; a name outside them is a typo (``hidden_state``), never n/a
KNOWN_CAPABILITIES = frozenset({"hidden_states", "tree_attention", "eagle3"})


def unknown_capabilities(names) -> list[str]:
    return sorted(str(c) for c in names if c not in KNOWN_CAPABILITIES
                  and not (isinstance(c, str) and c.startswith("weights:") and len(c) > len("weights:")))


def _known_capabilities_text() -> str:
    return ", ".join(sorted(KNOWN_CAPABILITIES)) + ", weights:<format>"


def check_selection(only: Sequence[str] | None) -> list[str] | None:
    """The ``--check`` ids/names, each one the suite has, else one line listing the known ones (a
    typo must never select nothing and pass)."""
    if not only:
        return None
    known = {c.id for c in CHECKS} | {c.name for c in CHECKS}
    for name in only:
        if name not in known:
            listing = ", ".join(f"{c.id} {c.name}" for c in CHECKS)
            raise SpecrunError(f"unknown conformance check '{name}'; give ids or names of: {listing}")
    return list(only)


def model_dirs(names: Sequence[str], target: str | None = None) -> dict[str, Path]:
    """Resolve model labels: tiny-<arch>, default, or a path given with --target."""
    from specrun.models import resolve_model

    out: dict[str, Path] = {}
    for name in names:
        if name.startswith("tiny-"):
            arch = name[5:]
            if arch not in ARCHS:
                raise SpecrunError(f"unknown tiny model '{name}'; known: {', '.join('tiny-' + a for a in ARCHS)}")
            out[name] = tiny_model(arch)
        elif name == "default":
            out[name] = resolve_model(target)
        else:
            raise SpecrunError(f"unknown conformance model '{name}'; use tiny-<arch> or default")
    return out


DEFAULT_MODELS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "default")


@attrs.define
class Run:
    backend_name: str
    device: str
    precision: str
    backend: Backend
    reference_backend: Backend
    tolerance: Tolerance
    package: str = ""
    package_version: str = ""
    results: list[CheckResult] = attrs.field(factory=list)
    expected_count: int = 0
    problems: list[str] = attrs.field(factory=list)  # run-level failures (count guard, unused xfails)
    seconds: float = 0.0
    options: dict | None = None  # load options of the backend under test (threads)
    own_file: Path | None = None  # the backend's own conformance file (tolerance overrides, expected failures)

    def load_options(self, reference: bool = False) -> dict:
        """Keyword arguments for loads of the backend under test (none when no option was given)."""
        return {"options": dict(self.options)} if self.options and not reference else {}

    @property
    def ok(self) -> bool:
        """No run problem, no failure, and at least one check that ran (all n/a is not a pass)."""
        return (not self.problems and any(r.status != "not_applicable" for r in self.results)
                and all(r.status in ("passed", "xfail", "not_applicable") for r in self.results))

    def summary(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in STATUSES}

    def as_dict(self) -> dict:
        import platform

        import specrun

        return {
            "backend": self.backend_name,
            "package": self.package,
            "package_version": self.package_version,
            "specrun_version": specrun.__version__,
            "device": self.device,
            "precision": self.precision,
            "reference": "/".join(REFERENCE),
            "runtime_versions": {**_safe_versions(self.backend), "python": platform.python_version()},
            "capabilities": sorted(self.backend.capabilities()),
            "tolerance": attrs.asdict(self.tolerance),
            "expected_checks": self.expected_count,
            "collected_checks": len(self.results),
            "ok": self.ok,
            "problems": self.problems,
            "summary": self.summary(),
            "seconds": self.seconds,
            "results": [attrs.asdict(r) for r in self.results],
        }


def _safe_versions(backend: Backend) -> dict[str, str]:
    try:
        return dict(backend.versions())
    except Exception as exc:  # reporting must not fail on a plugin bug
        return {"error": str(exc)}


def plan(models: Sequence[str]) -> list[tuple[Check, str]]:
    items = []
    for check in CHECKS:
        for i, model in enumerate(models):
            if check.models == "first" and i > 0:
                continue
            items.append((check, model))
    return items


def run_suite(
    backend_name: str,
    *,
    device: str = "cpu",
    precision: str | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
    target: str | None = None,
    registry: Registry | None = None,
    expected_failures: Path | None = None,
    tolerances: Path | None = None,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    options: dict | None = None,
) -> Run:
    """Run every check for one backend/device/precision and return the results.  ``options``: the
    load options of the backend under test (``{"threads": N}``)."""
    only = check_selection(only)
    for c in CHECKS:
        if unknown_capabilities(c.needs):
            raise SpecrunError(f"check {c.id} {c.name} needs unknown capability "
                               f"'{unknown_capabilities(c.needs)[0]}'; known: {_known_capabilities_text()}")
    registry = registry or load_registry()
    backend = registry.get(backend_name)
    reference = registry.get(REFERENCE[0])
    device = backend.check_device(device)
    precision = backend.check_precision(device, precision)
    entry = registry.entries[backend_name]
    own = backend_requirements(backend)
    run = Run(backend_name, device, precision, backend, reference, load_tolerances(backend_name, precision, tolerances, own),
              package=entry.package, package_version=entry.version, options=options, own_file=own)
    xfails = [x for x in load_expected_failures(expected_failures, own) if fnmatch.fnmatch(backend_name, x.backend)]
    used: set[int] = set()
    dirs = model_dirs(models, target)
    items = [(c, m) for c, m in plan(models) if not only or c.id in only or c.name in only]
    run.expected_count = len(items)
    caps = set(backend.capabilities())
    for name in unknown_capabilities(caps):
        import difflib

        close = difflib.get_close_matches(name, sorted(KNOWN_CAPABILITIES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        run.problems.append(f"the backend declares capability '{name}', which specrun does not know{hint}; "
                            f"known: {_known_capabilities_text()}: refusing to report success")
    t_run = time.perf_counter()
    for model, group in itertools.groupby(sorted(items, key=lambda cm: list(models).index(cm[1])), key=lambda cm: cm[1]):
        ctx = Context(run, model, dirs[model])
        try:
            for check, _ in group:
                if progress:
                    progress(f"{check.id} {check.name} on {model}")
                res = _run_one(check, ctx, caps)
                for i, x in enumerate(xfails):
                    if x.matches(backend_name, device, precision, check, model):
                        used.add(i)
                        if res.status in ("failed", "error"):
                            res.status, res.message = "xfail", f"expected failure ({x.reason}): {res.message}"
                        elif res.status == "passed":
                            res.status = "xpass"
                            res.message = f"listed as expected to fail ({x.reason}) but passed: remove the entry"
                run.results.append(res)
        finally:
            ctx.close()
    run.seconds = time.perf_counter() - t_run
    known_models = [*DEFAULT_MODELS, *models]
    full_run = not only and set(models) >= set(DEFAULT_MODELS)
    for i, x in enumerate(xfails):
        if i in used:
            continue
        names = {c.id for c in CHECKS} | {c.name for c in CHECKS} | {"*"}
        garbage = x.check not in names or not any(fnmatch.fnmatch(m, x.model) for m in known_models)
        this_run = fnmatch.fnmatch(device, x.device) and fnmatch.fnmatch(precision, x.precision)
        if garbage or (full_run and this_run):
            run.problems.append(f"expected-failure entry matches no check that ran: {attrs.asdict(x)}")
    missing = [c for c in STABLE_IDS if c not in {ch.id for ch in CHECKS}]
    if missing and not only:
        run.problems.append(f"the suite lacks checks {', '.join(missing)}: refusing to report success")
    if len(run.results) < run.expected_count:
        run.problems.append(f"collected {len(run.results)} checks, expected {run.expected_count}: refusing to report success")
    if not any(r.status != "not_applicable" for r in run.results):
        what = "no check was planned" if not run.results else "every check was not applicable"
        run.problems.append(f"no check ran ({what}; models: {', '.join(models) or 'none'}): refusing to report success")
    return run


def _run_one(check: Check, ctx: Context, caps: set[str]) -> CheckResult:
    res = CheckResult(check.id, check.name, ctx.model, "passed")
    missing = check.needs - caps
    if missing:
        res.status = "not_applicable"
        res.message = f"not applicable: needs {', '.join(sorted(missing))}"
        return res
    t0 = time.perf_counter()
    try:
        fields = check.fn(ctx) or {}
        for k, v in fields.items():
            setattr(res, k, v)
    except CheckFailed as exc:
        res.status = "failed"
        res.message = f"{check.id} {check.name} {ctx.label()}: {exc}"
        for k, v in exc.fields.items():
            setattr(res, k, v)
    except NotApplicable as exc:
        res.status, res.message = "not_applicable", f"not applicable: {exc}"
    except Exception as exc:  # a crash is a failure of its own kind, with the whole story
        res.status = "error"
        res.message = f"{check.id} {check.name} {ctx.label()}: raised {type(exc).__name__}: {exc}"
    res.seconds = time.perf_counter() - t0
    return res
