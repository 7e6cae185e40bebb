"""Text in, text out: model resolution, tokenizer and chat template, backend and drafter selection,
stop strings.  The CLI and the benchmarks use this; library users can too."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from .decode import SpeculativeDecoder, Stats, check_num_draft_tokens, check_prompt_text
from .drafters import LookupFirstDrafter, ModelDrafter, NgramDrafter, NoDrafter
from .errors import SpecrunError
from .interfaces import Drafter, Target
from .models import ModelConfig, resolve_model
from .plugins import AUTO as AUTO_BACKEND
from .plugins import Registry, choose_backend, load_registry
from .sampling import SamplingParams, check_stop_strings
from .tokenizer import (  # load_tokenizer: re-exported (bench, conformance)
    check_text,
    load_tokenizer,
    render_chat,
    vocabulary_difference,
)

DRAFTERS = ("none", "ngram", "model", "eagle3", "eagle3+ngram")
AUTO = "auto"  # eagle3+ngram with the head shipped for the target if there is one, else ngram


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_same_tokenizer(model_dir, draft_dir):
    """The target's tokenizer, after checking that the draft model's is the same (the same token
    texts at the same ids): a draft with another tokenizer of the same size would propose ids that
    mean other text, and be accepted silently at a lower rate.  Returns the target's tokenizer."""
    if not any((Path(draft_dir) / f).exists() for f in _TOKENIZER_FILES):
        raise SpecrunError(f"the draft model {draft_dir} has no tokenizer to compare with the target's; if it "
                           f"shares the target's tokenizer, copy the target's tokenizer files into it")
    tok = load_tokenizer(model_dir)
    differs = vocabulary_difference(tok, load_tokenizer(draft_dir))
    if differs:
        raise SpecrunError(f"the draft model {draft_dir} has another tokenizer than the target {model_dir} "
                           f"({differs}); use a draft model that shares the target's tokenizer")
    return tok


def lookup_min_prob(draft_min_prob: float | None) -> float:
    from .drafters import DEFAULT_LOOKUP_MIN_PROB

    return DEFAULT_LOOKUP_MIN_PROB if draft_min_prob is None else draft_min_prob


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
    ) -> Pipeline:
        """``tree=(depth, topk, max_nodes)`` turns on EAGLE-2/3 dynamic tree drafting (eagle3
        drafter, a target backend with ``tree_attention``), greedy or sampling.
        ``draft_min_prob``: a draft stops at the first position whose estimated acceptance is below
        it: an eagle3 chain's top draft probability (default ``drafters.DEFAULT_MIN_PROB``), prompt
        lookup's record of its own acceptance (default ``drafters.DEFAULT_LOOKUP_MIN_PROB``); 0
        drafts all ``num_draft_tokens``."""
        check_num_draft_tokens(num_draft_tokens)  # before anything loads
        auto_drafter = drafter == AUTO
        if drafter in (AUTO, "eagle3", "eagle3+ngram") and not draft:
            from .drafters import bundled_head

            head = bundled_head(target)
            if drafter == AUTO:  # lookup beat the shipped head alone on MT-bench (README)
                drafter = "ngram" if head is None else ("eagle3" if tree else "eagle3+ngram")
        elif drafter == AUTO:
            drafter = "ngram"
        if drafter not in DRAFTERS:
            raise SpecrunError(f"unknown drafter '{drafter}'; choose one of: {', '.join(DRAFTERS)}")
        lookup_first = drafter == "eagle3+ngram"
        if lookup_first:
            if tree is not None:
                raise SpecrunError("--tree drafts with the head alone: use --drafter eagle3")
            drafter = "eagle3"
        if drafter == "eagle3" and not draft:
            if head is None:
                raise SpecrunError(f"no EAGLE-3 head ships for '{target or 'the default model'}'; pass --draft DIR "
                                   "(an EAGLE-3 head in the SpecForge format, e.g. from `specrun train-draft`)")
            draft = str(head)
        registry = registry or load_registry()
        chosen = backend == AUTO_BACKEND
        if chosen:
            backend, auto_precision = choose_backend(registry, device)
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
        model_dir = resolve_model(target)
        config = ModelConfig.load(model_dir)
        aux: tuple[int, ...] = ()
        tokenizer = None
        if drafter == "eagle3":
            from .eagle3 import Eagle3Config, check_target_compat

            hconf = Eagle3Config.load(draft)
            check_target_compat(hconf, config.vocab_size, config.hidden_size, config.num_layers, draft)
            if "hidden_states" not in be.capabilities():
                raise SpecrunError(f"backend '{backend}' cannot return hidden states, which the eagle3 drafter needs")
            aux = tuple(sorted(set(hconf.aux_layers_for(config.num_layers))))
        tgt = be.load_target(str(model_dir), device=device, precision=precision, aux_hidden_layers=aux, options=options)
        if drafter == "none":
            d: Drafter = NoDrafter()
        elif drafter == "ngram":
            d = NgramDrafter(min_prob=lookup_min_prob(draft_min_prob))
        elif drafter == "model":
            if not draft:
                raise SpecrunError("the 'model' drafter needs --draft PATH (a small model sharing the target's tokenizer)")
            draft_dir = resolve_model(draft)
            dbe = registry.get(draft_backend or backend)
            dconf = ModelConfig.load(draft_dir)
            if dconf.vocab_size != config.vocab_size:
                raise SpecrunError(
                    f"the draft model's vocabulary ({dconf.vocab_size} tokens) differs from the target's "
                    f"({config.vocab_size}); use a draft model that shares the target's tokenizer"
                )
            tokenizer = _check_same_tokenizer(model_dir, draft_dir)
            dt = dbe.load_target(str(draft_dir), device=draft_device or device, precision=draft_precision, options=options)
            d = ModelDrafter(dt, config.vocab_size)
        else:
            from .drafters import Eagle3Drafter

            hbe = registry.get(draft_backend or backend)
            head = hbe.load_eagle3_head(str(draft), str(model_dir), device=draft_device or device, precision=draft_precision,
                                        options=options)
            from .drafters import DEFAULT_MIN_PROB

            d = Eagle3Drafter(head, num_target_layers=config.num_layers, target_vocab_size=config.vocab_size,
                              min_prob=DEFAULT_MIN_PROB if draft_min_prob is None else draft_min_prob)
            if lookup_first:
                d = LookupFirstDrafter(d, min_prob=lookup_min_prob(draft_min_prob))
        if not isinstance(d, NoDrafter) and getattr(tgt, "exact_blocks", None) is False:
            import sys

            print(f"specrun: warning: {tgt.backend} at {tgt.precision} computes a block of tokens with other rounding "
                  "than single steps, so speculative output may differ from plain output at near-ties; for identical "
                  "output use another precision or backend (`specrun backends`), or --drafter none", file=sys.stderr)
        pipe = cls(tgt, tokenizer or load_tokenizer(model_dir), d, num_draft_tokens, config)
        pipe.auto_backend = chosen
        if tree is not None:
            from .decode import TreeSpeculativeDecoder
            from .drafters import Eagle3Drafter

            depth, topk, nodes = tree
            if not isinstance(d, Eagle3Drafter):
                raise SpecrunError("tree drafting needs --drafter eagle3")
            if "tree_attention" not in be.capabilities():
                raise SpecrunError(f"backend '{backend}' cannot verify token trees (no tree_attention capability)")
            if min(depth, topk, nodes) < 1:
                raise SpecrunError(f"tree depth, top-k and node count must be >= 1, got {depth}, {topk}, {nodes}")
            d.tree_topk = topk
            pipe.decoder = TreeSpeculativeDecoder(tgt, d, depth, nodes)
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
