"""EAGLE-3 draft heads: the checkpoint format SpecForge writes and SGLang / vLLM load (the
backend-facing head interface, ``DraftHead``, is in ``interfaces``; the drafter in ``drafters/eagle3``).

Everything here is numpy in / numpy out, so a head can run on one backend and the target on another.

Format (a folder):

* ``config.json``: ``architectures: ["LlamaForCausalLMEagle3"]``, ``model_type: "llama"``,
  ``num_hidden_layers: 1``, the target's hidden size / heads / KV heads / intermediate size / rope
  settings, ``vocab_size`` (the target's), ``draft_vocab_size``, optional ``target_hidden_size``,
  optional ``eagle_config.eagle_aux_hidden_state_layer_ids``.
* ``model.safetensors`` (H = hidden size, no biases): ``fc.weight`` [H, n_aux*Ht];
  ``midlayer.{hidden_norm,input_layernorm,post_attention_layernorm}.weight`` [H];
  ``midlayer.self_attn.{q,k,v}_proj.weight`` [*, 2H]; ``midlayer.self_attn.o_proj.weight``;
  ``midlayer.mlp.{gate,up,down}_proj.weight``; ``norm.weight`` [H]; ``lm_head.weight`` [Vd, H];
  ``d2t`` int64 [Vd] (target id = i + d2t[i]); ``t2d`` bool [V]; optionally ``embed_tokens.weight``
  [V, H] (otherwise the target's embedding is used).

One draft step at position t (paired with token t+1)::

    h   = fc(concat(target hidden states of the aux layers at t))   # or the previous step's ``out``
    x   = concat(input_layernorm(embed(token_{t+1})), hidden_norm(h))  # 2H
    r   = h + o_proj(attention(q(x), k(x), v(x)))     # causal over the head's own cache, rope at t
    out = r + mlp(post_attention_layernorm(r))
    logits = lm_head(norm(out))                        # over the draft vocabulary
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import attrs
import numpy as np

from .errors import SpecrunError

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS_FILE = "model.safetensors"




def aux_ids_from_config(raw: dict, where: str = "config.json") -> tuple[int, ...] | None:
    """The target layers whose *inputs* the head reads (specrun's numbering), from a head config.

    Two conventions are in use for the same tensors:

    * ``eagle_config.eagle_aux_hidden_state_layer_ids`` (SpecForge, SGLang): the decoder layers
      whose *outputs* are captured; SpecForge's default is ``[1, L//2 - 1, L - 4]`` (SGLang adds 1
      and captures those layers' inputs).  Output of layer j = input of layer j + 1.
    * top-level ``eagle_aux_hidden_state_layer_ids`` (vLLM, speculators): the layers whose
      *inputs* are captured (id j = output of layer j - 1, 0 = the embedding); vLLM's default is
      ``(2, L//2, L - 3)``, the same tensors as SpecForge's default.

    Given both, they must name the same tensors."""
    eagle = raw.get("eagle_config") or {}
    if not isinstance(eagle, dict):
        raise SpecrunError(f"{where}: eagle_config must be an object")
    spec = eagle.get("eagle_aux_hidden_state_layer_ids")
    top = raw.get("eagle_aux_hidden_state_layer_ids")

    def ints(v, name):
        if not isinstance(v, list) or not v or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise SpecrunError(f"{where}: {name} must be a list of layer numbers, got {v!r}")
        return tuple(v)

    inputs_spec = None if spec is None else tuple(i + 1 for i in ints(spec, "eagle_config.eagle_aux_hidden_state_layer_ids"))
    inputs_top = None if top is None else ints(top, "eagle_aux_hidden_state_layer_ids")
    if inputs_spec is not None and inputs_top is not None and inputs_spec != inputs_top:
        raise SpecrunError(f"{where}: eagle_config.eagle_aux_hidden_state_layer_ids {list(spec)} (outputs of those layers, "
                           f"SpecForge) and eagle_aux_hidden_state_layer_ids {list(top)} (inputs, vLLM) name other layers")
    return inputs_spec if inputs_spec is not None else inputs_top


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """SGLang / vLLM / EAGLE's default: the inputs of layers 2, L//2 and L-3."""
    return (min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0))


# --------------------------------------------------------------------------------------------
# safetensors, read with the safetensors library (no pickle); ml_dtypes teaches numpy bfloat16


def read_safetensors(path: str | Path, names: Iterable[str] | None = None, *, mmap: bool = False) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy arrays (floats as float32, bf16 included; integers as
    int64).  With ``mmap``, float32 tensors are read-only memory maps of the file instead of copies."""
    import ml_dtypes  # noqa: F401 - registers numpy's bfloat16, which safetensors' numpy reader needs
    from safetensors import SafetensorError, safe_open

    path, out, wanted = Path(path), {}, None if names is None else set(names)
    try:
        with safe_open(path, framework="numpy") as f:  # checks the header and that the file is whole
            header: dict = {}
            if mmap:  # where each float32 tensor lies in the file
                with open(path, "rb") as raw:
                    base = 8 + struct.unpack("<Q", raw.read(8))[0]
                    header = json.loads(raw.read(base - 8))
            for n in [n for n in f.keys() if wanted is None or n in wanted]:
                info = header.get(n)
                if info and info["dtype"] == "F32" and info["data_offsets"][1] > info["data_offsets"][0]:
                    out[n] = np.memmap(path, "<f4", "r", base + info["data_offsets"][0], tuple(info["shape"]))
                    continue
                arr = f.get_tensor(n)
                kind = arr.dtype.kind if arr.dtype.name != "bfloat16" else "f"
                out[n] = arr.astype(np.float32 if kind == "f" else np.int64, copy=False) if kind in "fiu" else arr
    except SafetensorError as exc:
        raise SpecrunError(f"cannot read weights {path}: not a safetensors file, or a truncated one ({exc})") from None
    except (OSError, TypeError, ValueError) as exc:
        raise SpecrunError(f"cannot read weights {path}: {exc}") from None
    return out


def read_target_embedding(target_dir: str | Path, *, mmap: bool = False) -> np.ndarray:
    """The target's token embedding [V, H] (float32), read from its safetensors files (``mmap``:
    see ``read_safetensors``)."""
    target_dir = Path(target_dir)
    index = target_dir / "model.safetensors.index.json"
    names = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight")
    if index.exists():
        wmap = json.loads(index.read_text())["weight_map"]
        files = [target_dir / wmap[n] for n in names if n in wmap]
    else:
        files = sorted(target_dir.glob("*.safetensors"))
    for f in files:
        got = read_safetensors(f, names, mmap=mmap)
        for n in names:
            if n in got:
                return got[n]
    raise SpecrunError(f"the target {target_dir} has no embed_tokens weight in its safetensors files")


# --------------------------------------------------------------------------------------------
# config


@attrs.frozen
class Eagle3Config:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    aux_layer_ids: tuple[int, ...] | None = None  # None: the default for the target's depth
    extra: dict = attrs.field(factory=dict, eq=False)  # other config.json keys, kept on save

    @property
    def num_aux(self) -> int:
        return 3 if self.aux_layer_ids is None else len(self.aux_layer_ids)

    def aux_layers_for(self, num_target_layers: int) -> tuple[int, ...]:
        return tuple(self.aux_layer_ids) if self.aux_layer_ids is not None else default_aux_layers(num_target_layers)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> Eagle3Config:
        arch = raw.get("architectures") or []
        if arch and not any("Eagle3" in a or "eagle3" in a.lower() for a in arch):
            raise SpecrunError(f"{where} is not an EAGLE-3 head (architectures: {', '.join(arch)}); expected {ARCHITECTURE}")
        if int(raw.get("num_hidden_layers", 1)) != 1:
            raise SpecrunError(f"{where}: EAGLE-3 heads have one layer, this one has {raw.get('num_hidden_layers')}")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            vocab = int(raw["vocab_size"])
            rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
            rtype = rope.get("rope_type", rope.get("type", "default"))
            if rtype not in ("default", "llama3"):
                raise SpecrunError(f"{where}: rope type '{rtype}' is not supported (default and llama3 are)")
            ids = aux_ids_from_config(raw, where)
            known = {
                "architectures", "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "draft_vocab_size",
                "target_hidden_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                "max_position_embeddings", "eagle_config", "tie_word_embeddings", "eagle_aux_hidden_state_layer_ids",
            }
            return cls(
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                intermediate_size=int(raw["intermediate_size"]),
                vocab_size=vocab,
                draft_vocab_size=int(raw.get("draft_vocab_size") or vocab),
                target_hidden_size=int(raw.get("target_hidden_size") or hidden),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
                rope_scaling=dict(rope) if rtype == "llama3" else None,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                aux_layer_ids=None if ids is None else tuple(int(i) for i in ids),
                extra={k: v for k, v in raw.items() if k not in known},
            )
        except KeyError as exc:
            raise SpecrunError(f"{where} lacks {exc}; is this an EAGLE-3 head folder?") from None
        except (TypeError, ValueError) as exc:
            raise SpecrunError(f"{where} has a malformed value: {exc}") from None

    @classmethod
    def load(cls, folder: str | Path) -> Eagle3Config:
        path = Path(folder) / "config.json"
        if not Path(folder).is_dir():
            raise SpecrunError(f"EAGLE-3 head folder {folder} does not exist; give the checkpoint folder with --draft")
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecrunError(f"{folder} has no config.json; give an EAGLE-3 (SpecForge format) checkpoint folder") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecrunError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(raw, str(path))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        H, I = self.hidden_size, self.intermediate_size  # noqa: E741
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "fc.weight": (H, self.num_aux * self.target_hidden_size),
            "midlayer.hidden_norm.weight": (H,),
            "midlayer.input_layernorm.weight": (H,),
            "midlayer.post_attention_layernorm.weight": (H,),
            "midlayer.self_attn.q_proj.weight": (q, 2 * H),
            "midlayer.self_attn.k_proj.weight": (kv, 2 * H),
            "midlayer.self_attn.v_proj.weight": (kv, 2 * H),
            "midlayer.self_attn.o_proj.weight": (H, q),
            "midlayer.mlp.gate_proj.weight": (I, H),
            "midlayer.mlp.up_proj.weight": (I, H),
            "midlayer.mlp.down_proj.weight": (H, I),
            "norm.weight": (H,),
            "lm_head.weight": (self.draft_vocab_size, H),
            "d2t": (self.draft_vocab_size,),
            "t2d": (self.vocab_size,),
        }


# --------------------------------------------------------------------------------------------
# checkpoint


@attrs.define
class Eagle3Checkpoint:
    """A head's config and weights (numpy).  ``embed`` is the token embedding [V, H]: the file's
    ``embed_tokens.weight`` if it has one, else the target's (``embed_from_target`` says which)."""

    config: Eagle3Config
    tensors: dict[str, np.ndarray]
    embed: np.ndarray | None = None
    embed_from_target: bool = True

    def validate(self, where: str = "checkpoint") -> None:
        cfg = self.config
        missing = [n for n in cfg.expected_shapes() if n not in self.tensors]
        if missing:
            raise SpecrunError(f"{where} is not an EAGLE-3 head: missing tensor(s) {', '.join(missing[:4])}")
        for name, shape in cfg.expected_shapes().items():
            got = tuple(self.tensors[name].shape)
            if got != shape:
                raise SpecrunError(f"{where}: tensor {name} has shape {list(got)}, the config implies {list(shape)}")
        emb = self.tensors.get("embed_tokens.weight")
        if emb is not None and tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise SpecrunError(f"{where}: embed_tokens.weight has shape {list(emb.shape)}, expected {[cfg.vocab_size, cfg.hidden_size]}")
        d2t, t2d = self.tensors["d2t"], self.tensors["t2d"]
        if d2t.dtype.kind not in "iu" or t2d.dtype != np.bool_:
            raise SpecrunError(f"{where}: d2t must be int64 and t2d bool (got {d2t.dtype}, {t2d.dtype})")
        ids = np.arange(len(d2t)) + d2t
        if len(ids) and (ids.min() < 0 or ids.max() >= cfg.vocab_size or np.any(np.diff(ids) <= 0)):
            raise SpecrunError(f"{where}: d2t does not map the draft vocabulary to increasing target ids below {cfg.vocab_size}")
        if int(t2d.sum()) != len(ids) or not t2d[ids].all():
            raise SpecrunError(f"{where}: t2d does not mark exactly the target ids that d2t maps to")

    @classmethod
    def load(cls, folder: str | Path, target_dir: str | Path | None = None, *, mmap_embed: bool = False) -> Eagle3Checkpoint:
        """Read and validate a head; with ``target_dir``, check it against the target and take
        the embedding from the target when the head has none (``mmap_embed``: as a read-only
        memory map of the target's file where it is stored as float32, so that only the rows
        used are read)."""
        folder = Path(folder)
        cfg = Eagle3Config.load(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SpecrunError(f"{folder} has no model.safetensors (pickled .bin/.pt weights are not loaded)")
        tensors: dict[str, np.ndarray] = {}
        for f in files:
            tensors.update(read_safetensors(f))
        tensors = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in tensors.items()}
        ck = cls(cfg, tensors)
        ck.validate(str(folder))
        if "embed_tokens.weight" in tensors:
            ck.embed, ck.embed_from_target = tensors["embed_tokens.weight"], False
        if target_dir is not None:
            from .models import ModelConfig

            tc = ModelConfig.load(target_dir)
            check_target_compat(cfg, tc.vocab_size, tc.hidden_size, tc.num_layers, str(folder))
            if ck.embed is None:
                ck.embed = read_target_embedding(target_dir, mmap=mmap_embed)
                if ck.embed.shape != (cfg.vocab_size, cfg.hidden_size):
                    raise SpecrunError(f"the target's embedding has shape {list(ck.embed.shape)}, the head needs {[cfg.vocab_size, cfg.hidden_size]}")
        return ck

def check_target_compat(cfg: Eagle3Config, vocab_size: int, hidden_size: int, num_layers: int, where: str = "checkpoint") -> None:
    if cfg.vocab_size != vocab_size:
        raise SpecrunError(
            f"{where}: the head's vocabulary ({cfg.vocab_size} tokens) differs from the target's ({vocab_size}); it was trained for another model"
        )
    if cfg.target_hidden_size != hidden_size:
        raise SpecrunError(f"{where}: the head reads target hidden states of width {cfg.target_hidden_size}, the target's are {hidden_size}")
    bad = [i for i in cfg.aux_layers_for(num_layers) if not 0 <= i < num_layers]
    if bad:
        raise SpecrunError(f"{where}: aux hidden-state layer(s) {bad} do not exist in a target of {num_layers} layers")


def parse_tree(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        depth, topk, nodes = (int(x) for x in value.split(","))
    except ValueError:
        raise SpecrunError(f"--tree takes DEPTH,TOPK,NODES (three integers, e.g. 5,4,16), got '{value}'") from None
    return depth, topk, nodes
