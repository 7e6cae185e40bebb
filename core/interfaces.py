"""The three interfaces the speculative loop talks to (target, drafter, verifier) and the backend
that builds targets.  Everything crossing a backend boundary is a plain numpy array or a list of
token ids, so a draft can run on one backend and the target on another."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import numpy as np

from .errors import SpecrunError

if TYPE_CHECKING:
    from .eagle3 import Eagle3Config
    from .sampling import Sampler


@attrs.frozen
class StepOutput:
    """What a target returns for a block of T new tokens."""

    logits: np.ndarray  # [T, vocab] float32
    hidden_states: np.ndarray | None = None  # [T, n_aux_layers * hidden] float32 (EAGLE-3 inputs) or None


@attrs.frozen
class Draft:
    """Proposed continuation.  ``probs[i]`` is the drafter's distribution the i-th token was drawn
    from (already temperature/top-k/top-p processed); ``None`` means a deterministic proposal."""

    tokens: list[int]
    probs: np.ndarray | None = None  # [k, vocab] float32

    def __len__(self) -> int:
        return len(self.tokens)


@attrs.frozen
class ModelInfo:
    vocab_size: int
    context_length: int
    hidden_size: int
    num_layers: int


class Target(abc.ABC):
    """A causal LM with a KV cache.  ``length`` tokens are in the cache; ``forward`` appends a block
    of T >= 1 tokens and returns logits for every one of them; ``rollback`` cuts the cache back."""

    info: ModelInfo
    backend: str
    device: str
    precision: str
    #: whether a block's logits equal those of the same tokens run one at a time.  True: bit for bit
    #: (greedy speculative output then equals plain output; the conformance kit holds the target to
    #: it).  False: the runtime rounds a row by its block beyond float rounding, so outputs can
    #: differ at near-ties (the pipeline warns).  None: not promised; float accumulation order may
    #: differ (~1e-5 in fp32), checked against the precision's tolerance.
    exact_blocks: bool | None = None
    #: the most tokens this target verifies in one call at its best (None: no limit); the loop then
    #: drafts at most block_rows - 1 tokens (e.g. a runtime whose exact kernels stop at 4 rows)
    block_rows: int | None = None

    @abc.abstractmethod
    def reset(self, capacity: int) -> None:
        """Empty the cache and make room for ``capacity`` tokens."""

    @abc.abstractmethod
    def forward(self, tokens: Sequence[int], *, all_logits: bool = True) -> StepOutput:
        """Run ``tokens`` (positions ``length .. length+T-1``) on top of the cache, causally,
        and append them to the cache.  With ``all_logits=False`` only the last position's logits
        are returned (prefill of long prompts); hidden states are always returned for every position."""

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Number of tokens in the cache."""

    @abc.abstractmethod
    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens.  Must not cost time proportional to the context."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    def prepare(self, max_rows: int) -> None:  # noqa: B027 - optional hook
        """The loop is about to run calls of at most ``max_rows`` tokens after the prefill (1: plain
        decoding): build what they need now (e.g. graphs compiled per block size), before anything
        is timed.  Optional; must not change any result."""

    # optional: token-tree verification (backends with the ``tree_attention`` capability)
    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> StepOutput:
        """Run a token tree on top of the cache in ONE call.  ``parents[0] == -1`` (node 0 follows
        the cache), ``parents[i] < i`` otherwise; node i sits at position ``length + depth(i)`` and
        attends to the cache, its ancestors and itself.  Returns logits (and hidden states) for every
        node; the nodes are appended to the cache until ``keep``."""
        raise SpecrunError(f"backend '{self.backend}' cannot verify token trees (no tree_attention capability)")

    def keep(self, indices: Sequence[int]) -> None:
        """After ``forward_tree``: keep the cache entries of the nodes ``indices`` (a root-to-node
        path: 0 first, increasing) right after the earlier cache, and drop the other nodes."""
        raise SpecrunError(f"backend '{self.backend}' cannot verify token trees (no tree_attention capability)")


@attrs.frozen
class DraftTree:
    """A token tree proposed after the pending token (the root, node 0, not listed): node i+1 has
    token ``tokens[i]`` and parent ``parents[i]`` (0 = the root; parents come before children)."""

    tokens: list[int]
    parents: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        d = [0]
        for p in self.parents:
            d.append(d[p] + 1)
        return d[1:]


class Drafter(abc.ABC):
    """Proposes the next tokens of a sequence."""

    name: str = "drafter"
    #: target layers whose input hidden states this drafter reads (EAGLE-3); () = none
    aux_hidden_layers: tuple[int, ...] = ()

    @property
    def runs_on(self) -> str:
        """Where a model-backed drafter runs (``backend/device/precision``); "" for rule-based ones."""
        return ""

    def start(self, prompt: Sequence[int], capacity: int) -> None:  # noqa: B027 - optional hook
        """A new request begins with ``prompt``."""

    @abc.abstractmethod
    def propose(self, tokens: Sequence[int], k: int, sampler: Sampler | None) -> Draft:
        """Propose up to ``k`` tokens continuing ``tokens`` (the whole sequence so far).
        ``sampler`` is given when sampling; the drafter then draws with it and returns the
        distributions it drew from (``Draft.probs``)."""

    def propose_tree(self, tokens: Sequence[int], depth: int, max_nodes: int) -> DraftTree | None:
        """Optional (greedy tree decoding): a token tree of at most ``depth`` levels and ``max_nodes``
        nodes continuing ``tokens``; None = this drafter drafts chains only."""
        return None

    def accepted(  # noqa: B027 - optional hook
        self, tokens: Sequence[int], n_accepted: int, hidden_states: np.ndarray | None = None
    ) -> None:
        """The verifier accepted ``n_accepted`` of the last draft; ``tokens`` is the sequence now
        (accepted tokens and the bonus token included).  Also called after the prefill (n_accepted=0).
        ``hidden_states`` (when the drafter asked for ``aux_hidden_layers``) are the target's, for
        the positions that just became final: row i belongs to position ``len(tokens) - 1 - len(rows) + i``
        and is paired with the token after it."""


class Verifier(abc.ABC):
    @abc.abstractmethod
    def verify(self, logits: np.ndarray, draft: Draft) -> list[int]:
        """Return the accepted prefix of ``draft.tokens`` followed by one token drawn from the target."""


@attrs.frozen
class Availability:
    available: bool
    reason: str = ""
    install_hint: str = ""


class Backend(abc.ABC):
    """A plugin's execution backend.  Instances are made by the plugin's ``register_backends`` hook."""

    name: str
    description: str = ""

    @abc.abstractmethod
    def availability(self) -> Availability: ...

    @abc.abstractmethod
    def devices(self) -> list[str]:
        """Devices present on this machine (e.g. ``cpu``, ``cuda:0``)."""

    def known_devices(self) -> list[str]:
        """Every device name this backend understands, present or not."""
        return self.devices()

    @abc.abstractmethod
    def precisions(self, device: str) -> list[str]:
        """Precisions this backend can run on ``device``; the first is the default."""

    def versions(self) -> dict[str, str]:
        """Versions of the runtime libraries behind this backend (for reports)."""
        return {}

    def capabilities(self) -> set[str]:
        """Optional features: ``hidden_states``, ``tree_attention``, ``weights:int8`` ..."""
        return set()

    def conformance_requirements(self):
        """Optional: a TOML file shipped with the backend holding its conformance tolerance
        overrides (``[overrides.NAME.PRECISION]``, each with a ``reason``) and expected failures
        (``[[xfail]]``); the suite reads it beside its own (docs/writing-a-backend.md)."""
        return None

    def preference(self, device: str) -> tuple[int, str] | None:
        """For ``--backend auto`` (the default): how fast this backend decodes on ``device``
        relative to others, as measured with ``specrun bench`` (higher is faster), and the
        precision that figure is for — one at which speculative output equals plain output.
        None: never picked automatically on ``device`` (the default)."""
        return None

    def load_target(
        self,
        model_dir: str,
        *,
        device: str,
        precision: str | None = None,
        aux_hidden_layers: Sequence[int] = (),
        options: dict | None = None,
    ) -> Target:
        """Build a target for the transformers-format model folder ``model_dir``.  The checks every
        backend needs run here, once — the device is present, the precision supported (None: the
        backend's default), the aux hidden layers exist (distinct, ascending), ``options`` well
        formed — then ``build_target`` gets the checked values."""
        device = self.check_device(device)
        precision = self.check_precision(device, precision)
        aux = check_aux_layers(model_dir, aux_hidden_layers)
        return self.build_target(str(model_dir), device=device, precision=precision, aux_hidden_layers=aux,
                                 options=check_options(options))

    def build_target(self, model_dir: str, *, device: str, precision: str, aux_hidden_layers: tuple[int, ...],
                     options: dict) -> Target:
        """The backend's own loader, called by ``load_target`` with checked arguments: ``device``
        present, ``precision`` one of ``precisions(device)``, ``aux_hidden_layers`` valid layers of
        the model, ``options`` with ``threads`` (int >= 1) when given."""
        raise SpecrunError(f"backend '{self.name}' implements neither build_target nor load_target; it cannot load models")

    def export(self, model_dir: str, *, precision: str | None = None, aux_hidden_layers: Sequence[int] = (),
               force: bool = False, progress: bool = True):
        """Optional: build this backend's cached model format ahead of time (``specrun export``)
        and return its path; ``force`` rebuilds every artefact it uses."""
        raise SpecrunError(f"backend '{self.name}' has nothing to export ahead of time; it loads models directly")

    def load_eagle3_head(self, checkpoint_dir: str, target_dir: str, *, device: str, precision: str | None = None,
                         options: dict | None = None):
        """Build an EAGLE-3 draft head (``DraftHead`` below, numpy in / numpy out) from a
        SpecForge-format folder; ``target_dir`` supplies the embedding and the shape checks;
        ``options`` as for ``load_target`` (e.g. ``threads``).
        Optional: backends without it cannot run EAGLE-3 heads."""
        raise SpecrunError(f"backend '{self.name}' cannot run EAGLE-3 heads; use a --draft-backend that lists eagle3 among its capabilities (`specrun backends`)")

    def check_device(self, device: str) -> str:
        """Return the canonical device name or raise a one-line error naming the present ones."""
        present = self.devices()
        if device in present:
            return device
        known = self.known_devices()
        if device in known or device.split(":")[0] in {d.split(":")[0] for d in known}:
            raise SpecrunError(
                f"device '{device}' is not present for backend '{self.name}'; present: {', '.join(present) or 'none'}"
            )
        raise SpecrunError(
            f"unknown device '{device}' for backend '{self.name}'; known: {', '.join(known)} (present: {', '.join(present) or 'none'})"
        )

    def check_precision(self, device: str, precision: str | None) -> str:
        supported = self.precisions(device)
        if precision is None:
            return supported[0]
        if precision not in supported:
            raise SpecrunError(
                f"backend '{self.name}' cannot run precision '{precision}' on {device}; supported: {', '.join(supported)}"
            )
        return precision


OPTION_KEYS = ("threads",)  # the options a backend may receive (docs/writing-a-backend.md)


def check_options(options: dict | None) -> dict:
    """``options`` for a backend: only known keys; ``threads`` an integer >= 1."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise SpecrunError(f"unknown backend option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
    threads = options.get("threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SpecrunError(f"threads must be an integer >= 1, got {threads!r}")
    else:
        options.pop("threads", None)
    return options


def check_aux_layers(model_dir, aux_hidden_layers: Sequence[int]) -> tuple[int, ...]:
    """Validated aux hidden layers (distinct, ascending, in range) of the model in ``model_dir``."""
    from .models import ModelConfig

    aux = tuple(int(a) for a in aux_hidden_layers)
    if not aux:
        return aux
    n = ModelConfig.load(model_dir).num_layers
    bad = [a for a in aux if not 0 <= a < n]
    if bad:
        raise SpecrunError(f"aux hidden layer {bad[0]} out of range: the model has {n} layers (0..{n - 1})")
    if len(set(aux)) != len(aux) or list(aux) != sorted(aux):
        raise SpecrunError(f"aux hidden layers must be distinct and ascending, got {list(aux)}")
    return aux


@attrs.frozen
class HeadOutput:
    logits: np.ndarray  # [T, draft_vocab] float32
    hidden: np.ndarray  # [T, H] float32: each step's ``out`` (fed back for the next draft step)


class DraftHead(abc.ABC):
    """An EAGLE-3 head run by a backend, with its own KV cache over positions (like a Target).
    Cache entry i is at rope position i unless explicit ``positions`` are given."""

    config: Eagle3Config
    d2t: np.ndarray  # [draft_vocab] int64: target id of draft entry i is i + d2t[i]
    backend: str
    device: str
    precision: str

    @abc.abstractmethod
    def reset(self, capacity: int) -> None:
        """Empty the cache and make room for ``capacity`` entries."""

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Entries in the cache."""

    @abc.abstractmethod
    def forward(
        self,
        tokens: Sequence[int],
        hidden: np.ndarray,
        *,
        from_target: bool = True,
        positions: Sequence[int] | None = None,
        mask: np.ndarray | None = None,
    ) -> HeadOutput:
        """Run T draft steps and append them to the cache.  ``tokens`` [T] are target ids;
        ``hidden`` is [T, n_aux*Ht] target hidden states (``from_target``) or [T, H] outputs of
        earlier steps.  ``positions`` (rope) default to ``length .. length+T-1``; ``mask`` bool
        [T, length+T] says which cache entries / new entries each step sees (default: causal)."""

    @abc.abstractmethod
    def rollback(self, length: int) -> None:
        """Keep the first ``length`` entries (cheap)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
