"""Making EAGLE-3 heads (what the trainer and the conformance kit write; ``specrun.eagle3`` reads
them): a head config shaped like its target, the draft-vocabulary map, and the atomic
safetensors / config writer, in the format SpecForge writes and SGLang / vLLM load."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specrun.eagle3 import ARCHITECTURE, WEIGHTS_FILE, Eagle3Checkpoint, Eagle3Config, default_aux_layers
from specrun.errors import SpecrunError

DEFAULT_DRAFT_VOCAB = 32000


def head_config_for(target_raw: dict, *, draft_vocab_size: int | None = None,
                    aux_layer_ids: Sequence[int] | None = None) -> Eagle3Config:
    """A head shaped like the target (transformers config dict) — what SpecForge trains."""
    heads = int(target_raw["num_attention_heads"])
    hidden = int(target_raw["hidden_size"])
    vocab = int(target_raw["vocab_size"])
    rope = target_raw.get("rope_parameters") or target_raw.get("rope_scaling") or {}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    layers = int(target_raw["num_hidden_layers"])
    return Eagle3Config(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(target_raw.get("num_key_value_heads") or heads),
        head_dim=int(target_raw.get("head_dim") or hidden // heads),
        intermediate_size=int(target_raw["intermediate_size"]),
        vocab_size=vocab,
        draft_vocab_size=min(draft_vocab_size or DEFAULT_DRAFT_VOCAB, vocab),
        target_hidden_size=hidden,
        rms_norm_eps=float(target_raw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(target_raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=dict(rope) if rtype == "llama3" else None,
        max_position_embeddings=int(target_raw.get("max_position_embeddings", 2048)),
        aux_layer_ids=tuple(aux_layer_ids) if aux_layer_ids is not None else default_aux_layers(layers),
    )


def aux_ids_to_config(inputs: Sequence[int], eagle_config: dict) -> dict:
    """The config entries for aux layers ``inputs`` (specrun's numbering): SpecForge's
    ``eagle_config`` ids (outputs of the layer before) and vLLM's top-level ids (inputs).  A head
    reading the embedding (input of layer 0) has no SpecForge id: only vLLM's is written."""
    out: dict = {"eagle_aux_hidden_state_layer_ids": [int(i) for i in inputs]}
    if all(i >= 1 for i in inputs):
        out["eagle_config"] = {**eagle_config, "eagle_aux_hidden_state_layer_ids": [int(i) - 1 for i in inputs]}
    return out

def config_to_dict(cfg: Eagle3Config, torch_dtype: str = "float32") -> dict:
    """A head's ``config.json`` (SpecForge / SGLang / vLLM keys; the unknown keys it was read with kept).
    ``torch_dtype`` names the dtype its weights are saved in: servers that load with ``dtype=auto``
    (SGLang, vLLM) take it from there."""
    d = dict(cfg.extra)
    d.update(
        architectures=[ARCHITECTURE],
        model_type="llama",
        num_hidden_layers=1,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        hidden_act="silu",
        vocab_size=cfg.vocab_size,
        draft_vocab_size=cfg.draft_vocab_size,
        target_hidden_size=cfg.target_hidden_size,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        attention_bias=False,
        torch_dtype=torch_dtype,
    )
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.aux_layer_ids is not None:
        d.update(aux_ids_to_config(cfg.aux_layer_ids, d.get("eagle_config", {})))
    return d



def vocab_map(counts: np.ndarray, draft_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """d2t, t2d from token counts [V]: keep the most frequent ``draft_vocab_size`` ids (ties by
    lower id), sorted ascending; ``d2t[i] = used[i] - i``; ``t2d[j] = j in used``."""
    counts = np.asarray(counts)
    n = min(draft_vocab_size, len(counts))
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count desc, then id asc
    used = np.sort(order[:n]).astype(np.int64)
    d2t = used - np.arange(n, dtype=np.int64)
    t2d = np.zeros(len(counts), dtype=np.bool_)
    t2d[used] = True
    return d2t, t2d


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      *, bf16: bool = False) -> None:
    """Write atomically (temp file + rename).  ``bf16``: float tensors as bf16, rounded to nearest
    even (numpy has no bf16: torch's writer, torch imported only then)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    meta = {"format": "pt", **(metadata or {})}
    try:
        if bf16:
            import torch
            from safetensors.torch import save_file as save_torch

            as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
            save_torch({k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in as_torch.items()}, tmp, metadata=meta)
        else:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_head(ck: Eagle3Checkpoint, folder: str | Path, *, include_embed: bool = False, dtype: str = "f32") -> Path:
    """Write config.json + model.safetensors (float weights as ``dtype``: ``f32`` or ``bf16``,
    round to nearest even, as SpecForge ships heads; d2t int64, t2d bool), atomically per file."""
    if dtype not in ("f32", "bf16"):
        raise SpecrunError(f"heads are saved as f32 or bf16, not {dtype!r}")
    ck.validate("head to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in ck.tensors.items() if k != "embed_tokens.weight"}
    tensors = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in tensors.items()}
    tensors["d2t"] = ck.tensors["d2t"].astype(np.int64)
    tensors["t2d"] = ck.tensors["t2d"].astype(np.bool_)
    if include_embed:
        emb = ck.tensors.get("embed_tokens.weight", ck.embed)
        if emb is None:
            raise SpecrunError("cannot include the embedding: the head has none loaded")
        tensors["embed_tokens.weight"] = emb.astype(np.float32)
    write_safetensors(folder / WEIGHTS_FILE, tensors, bf16=dtype == "bf16")
    write_text_atomic(folder / "config.json", json.dumps(config_to_dict(ck.config, "bfloat16" if dtype == "bf16" else "float32"), indent=2) + "\n")
    return folder
