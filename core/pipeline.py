"""Text in, text out: model resolution, tokenizer and chat template, backend and drafter selection,
stop strings.  The CLI and the benchmarks use this; library users can too."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs

from .decode import SpeculativeDecoder, Stats, check_num_draft_tokens, check_prompt_text
from .drafters import LookupFirstDrafter, NgramDrafter, NoDrafter, PayingDrafter, bundled_head
from .drafters.eagle3 import head_aux_layers, head_folder, is_head, load_eagle3_drafter
from .drafters.model import load_model_drafter
from .errors import SpecrunError
from .interfaces import Drafter, Target
from .models import ModelConfig, resolve_model
from .plugins import AUTO as AUTO_BACKEND
from .plugins import Registry, choose_backend, load_registry
from .sampling import SamplingParams, check_stop_strings
from .tokenizer import check_text, load_tokenizer, render_chat  # load_tokenizer: re-exported

DRAFTERS = ("none", "ngram", "model", "eagle3", "eagle3+ngram")
AUTO = "auto"  # --draft's head (eagle3+ngram) or model; else, off CPUs, eagle3+ngram with the shipped head if any; else ngram


def on_cpu(device: str) -> bool:
    """Whether a device name is a CPU (``cpu``, ``cpu.0``)."""
    return device.lower().partition(".")[0] == "cpu"


def choose_drafter(draft: str | None, target: str | None, tree: tuple[int, int, int] | None, device: str) -> str:
    """What ``--drafter auto`` drafts with: ``--draft``'s head (eagle3+ngram: prompt lookup first,
    which beat the head alone on MT-bench; with ``--tree`` the head's trees) or draft model; without
    ``--draft`` the head shipped for the target, except on a CPU without ``--tree``: there prompt
    lookup alone measured faster than eagle3+ngram (openvino int8, 80 MT-bench questions: 1.49x vs
    1.42x plain; 40 HumanEval prompts: 1.27x vs 1.20x; AMD EPYC, 2 cores, 2026-12-06), as a forward
    of the head costs ~10% of a step of the default 135M target there; else ngram."""
    if draft:
        return ("eagle3" if tree else "eagle3+ngram") if is_head(draft) else "model"
    if bundled_head(target) is not None and (tree is not None or not on_cpu(device)):
        return "eagle3" if tree else "eagle3+ngram"
    return "ngram"


@attrs.define
class Result:
    text: str
    token_ids: list[int]
    stats: Stats

    def as_dict(self) -> dict:
        stats = self.stats.as_dict()
        return {"text": self.text, "token_ids": self.token_ids, "stats": {k: stats[k] for k in JSON_STATS}}


#: the statistics ``--json`` and ``Result.as_dict`` report (``Stats.as_dict`` has them all)
JSON_STATS = ("target_calls", "drafted", "accepted", "acceptance_length", "acceptance_rate_per_position",
              "tokens_per_second", "time_to_first_token", "prefill_seconds", "decode_seconds", "new_tokens",
              "prompt_tokens", "stop_reason", "drafter", "draft_runs_on", "num_draft_tokens", "backend", "device",
              "precision", "exact_blocks")


class Pipeline:
    def __init__(self, target: Target, tokenizer, drafter: Drafter, num_draft_tokens: int, config: ModelConfig):
        self.target, self.tokenizer, self.drafter = target, tokenizer, drafter
        self.config = config
        self.decoder = SpeculativeDecoder(target, drafter, num_draft_tokens)
        eos = set(config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = sorted(eos)
        self.last: Result | None = None
        self.auto_backend = False  # the backend was chosen by --backend auto

    @classmethod
    def load(
        cls,
        target: str | None = None,
        *,
        backend: str = "auto",
        device: str = "cpu",
        precision: str | None = None,
        drafter: str = AUTO,
        draft: str | None = None,
        draft_backend: str | None = None,
        draft_device: str | None = None,
        draft_precision: str | None = None,
        num_draft_tokens: int = 4,
        options: dict | None = None,
        registry: Registry | None = None,
        tree: tuple[int, int, int] | None = None,
        draft_min_prob: float | None = None,
        draft_gate: bool = True,
    ) -> Pipeline:
        """``tree=(depth, topk, max_nodes)`` turns on EAGLE-2/3 dynamic tree drafting (eagle3
        drafter, a target backend with ``tree_attention``), greedy or sampling.
        ``draft_min_prob``: a draft stops at the first position whose estimated acceptance is below
        it: an eagle3 chain's top draft probability (default ``drafters.DEFAULT_MIN_PROB``), prompt
        lookup's record of its own acceptance (default ``drafters.DEFAULT_LOOKUP_MIN_PROB``); 0
        drafts all ``num_draft_tokens``.  ``draft_gate``: a model-backed drafter (eagle3 chains, a
        draft model) drafts only while its drafts measure faster than plain steps on the request
        (``drafters.PayingDrafter``; greedy only)."""
        check_num_draft_tokens(num_draft_tokens)  # before anything loads
        if drafter not in (*DRAFTERS, AUTO):
            raise SpecrunError(f"unknown drafter '{drafter}'; choose one of: {', '.join(DRAFTERS)}")
        auto_drafter = drafter == AUTO
        given_draft = draft
        if auto_drafter:
            drafter = choose_drafter(draft, target, tree, device)
        lookup_first = drafter == "eagle3+ngram"
        if tree is not None:
            if lookup_first:
                raise SpecrunError("--tree drafts with the head alone: use --drafter eagle3")
            if drafter != "eagle3":
                raise SpecrunError("tree drafting needs --drafter eagle3")
            if min(tree) < 1:
                raise SpecrunError(f"tree depth, top-k and node count must be >= 1, got {', '.join(map(str, tree))}")
        if drafter in ("eagle3", "eagle3+ngram"):
            drafter, draft = "eagle3", head_folder(draft, target)
        registry = registry or load_registry()
        chosen = backend == AUTO_BACKEND
        if chosen:
            # what the drafter needs of the target: an EAGLE-3 head reads hidden states, a tree is
            # verified in one call (the auto drafter falls back to lookup on its own, below)
            asked_for_head = drafter == "eagle3" and (not auto_drafter or given_draft is not None)
            needs = {"tree_attention", "hidden_states"} if tree is not None else \
                {"hidden_states"} if asked_for_head else set()
            backend, auto_precision = choose_backend(registry, device, needs)
            precision = precision or auto_precision
        be = registry.get(backend)
        if auto_drafter and drafter == "eagle3" and tree is None:
            # the default drafter works on every backend: the head needs the target's hidden states;
            # without them prompt lookup alone, without head support of its own the head runs on a
            # backend that has it (the summary line names where the draft runs)
            caps = be.capabilities()
            if "hidden_states" not in caps:
                drafter, lookup_first, draft = "ngram", False, None
            elif "eagle3" not in caps and draft_backend is None:
                draft_backend = next((n for n in registry.names() if registry.entries[n].backend is not None
                                      and registry.entries[n].availability().available
                                      and "eagle3" in registry.entries[n].backend.capabilities()), None)
                if draft_backend is None:
                    drafter, lookup_first, draft = "ngram", False, None
        if tree is not None and "tree_attention" not in be.capabilities():
            raise SpecrunError(f"backend '{backend}' cannot verify token trees (no tree_attention capability)")
        model_dir = resolve_model(target)
        config = ModelConfig.load(model_dir)
        aux: tuple[int, ...] = ()
        if drafter == "eagle3":
            aux = head_aux_layers(draft, config)
            if "hidden_states" not in be.capabilities():
                raise SpecrunError(f"backend '{backend}' cannot return hidden states, which the eagle3 drafter needs")
        tgt = be.load_target(str(model_dir), device=device, precision=precision, aux_hidden_layers=aux, options=options)
        tokenizer = None
        dbe = registry.get(draft_backend or backend) if drafter in ("model", "eagle3") else be
        where = {"device": draft_device or device, "precision": draft_precision, "options": options}
        if drafter == "none":
            d: Drafter = NoDrafter()
        elif drafter == "ngram":
            d = NgramDrafter(min_prob=draft_min_prob, paying=draft_gate)
        elif drafter == "model":
            d, tokenizer = load_model_drafter(dbe, draft, model_dir, config, **where)
            if draft_gate:
                d = PayingDrafter(d)
        else:
            d = load_eagle3_drafter(dbe, draft, model_dir, config, **where, min_prob=draft_min_prob,
                                    tree_topk=tree[1] if tree else 4)
            if draft_gate and tree is None:
                d = PayingDrafter(d)
            if lookup_first:
                d = LookupFirstDrafter(d, min_prob=draft_min_prob)
        if not isinstance(d, NoDrafter) and getattr(tgt, "exact_blocks", None) is False:
            import sys

            print(f"specrun: warning: {tgt.backend} at {tgt.precision} computes a block of tokens with other rounding "
                  "than single steps, so speculative output may differ from plain output at near-ties; for identical "
                  "output use another precision or backend (`specrun backends`), or --drafter none", file=sys.stderr)
        pipe = cls(tgt, tokenizer or load_tokenizer(model_dir), d, num_draft_tokens, config)
        pipe.auto_backend = chosen
        if tree is not None:
            from .decode import TreeSpeculativeDecoder

            pipe.decoder = TreeSpeculativeDecoder(tgt, d, tree[0], tree[2])
        return pipe

    def encode(self, prompt: str, raw: bool = False) -> list[int]:
        check_text(check_prompt_text(prompt), "the prompt")
        tok = self.tokenizer
        if not raw and getattr(tok, "chat_template", None):
            text = render_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
            return tok.encode(text, add_special_tokens=False)
        return tok.encode(prompt)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        raw: bool = False,
    ) -> Iterator[str]:
        """Yield text as tokens are accepted; the full result is in ``self.last`` afterwards."""
        stop = check_stop_strings(stop)
        ids = self.encode(prompt, raw) if isinstance(prompt, str) else list(prompt)
        self.decoder.check_length(len(ids), max_new_tokens)
        out: list[int] = []
        emitted = 0
        hold = max((len(s) for s in stop), default=1) - 1  # text held back: a stop string may be starting
        text = ""
        gen = self.decoder.generate(ids, max_new_tokens, sampling, self.eos_token_ids)
        try:
            for chunk in gen:
                out.extend(chunk)
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    self.decoder.stats.stop_reason = "stop_string"
                    if len(text) > emitted:
                        yield text[emitted:]
                    emitted = len(text)
                    break
                safe = len(text) - hold
                if text.endswith("\ufffd"):  # an incomplete multi-byte character
                    safe = min(safe, len(text) - 1)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
        finally:
            gen.close()
        if cut_tail := text[emitted:]:
            yield cut_tail
        if self.decoder.stats.stop_reason == "stop_string":
            out = self._trim_to_text(out, text)
        self.last = Result(text, out, self.decoder.stats)

    def _trim_to_text(self, ids: list[int], text: str) -> list[int]:
        """The shortest token prefix whose decoded text covers ``text`` (the part before the stop string)."""
        for n in range(len(ids) + 1):
            if len(self.tokenizer.decode(ids[:n], skip_special_tokens=True)) >= len(text):
                return ids[:n]
        return ids

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Result:
        for _ in self.stream(prompt, **kwargs):
            pass
        assert self.last is not None
        return self.last
