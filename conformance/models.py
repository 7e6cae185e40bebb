"""The models the suite runs on: tiny random-weight models of each Llama-family architecture
(built once, deterministically, with transformers' own config classes) and the default model."""

from __future__ import annotations

import shutil
from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
TINY_VERSION = "2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_tiny_model(
    folder: Path,
    arch: str = "llama",
    *,
    vocab_size: int = 49152,
    seed: int = 0,
    tokenizer_from: Path | None = None,
    **overrides,
) -> Path:
    """Write a tiny random Llama-family model (safetensors) into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        common["head_dim"] = 16
    if arch == "mistral":
        common["sliding_window"] = 16  # shorter than the suite's sequences, so the window is exercised
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    config = cls(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default init is tiny; widen it so logits are not all near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).exists():
                shutil.copy(tokenizer_from / name, folder / name)
    return folder


def tiny_model(name: str) -> Path:
    """A cached tiny model (built on first use under specrun's cache folder): ``name`` is an
    architecture, optionally with another vocabulary size (``llama-v1000``)."""
    from specrun.store import cache_dir

    arch, _, vocab = name.partition("-v")
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    return _built_once(cache_dir() / "conformance" / f"tiny-{name}-{TINY_VERSION}",
                       lambda tmp: make_tiny_model(tmp, arch, seed=ARCHS.index(arch), vocab_size=int(vocab) if vocab else 49152))


def _built_once(target: Path, build) -> Path:
    """``target``, built by ``build(folder)`` once and verified whole before each use
    (``specrun.store.build_once``)."""
    from specrun.store import build_once

    build_once(target, "config.json", build)
    return target


HEAD_VERSION = "2"


def make_eagle3_head(folder: Path, model_dir: Path, aux_layer_ids, *, draft_vocab: int | None = None, seed: int = 0) -> Path:
    """A random-weight EAGLE-3 head for the model in ``model_dir``, written exactly as SpecForge
    writes one (config.json ``LlamaForCausalLMEagle3``; model.safetensors with ``fc``,
    ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``; no embedding).  The draft vocabulary
    defaults to all but 2,048 random tokens: ``d2t`` offsets are non-trivial and most of the
    target's tokens can be drafted."""
    import numpy as np

    from specrun.eagle3 import Eagle3Checkpoint
    from specrun.models import ModelConfig
    from specrun_kit.headfile import head_config_for, save_head, vocab_map

    raw = ModelConfig.load(model_dir).raw
    draft_vocab = draft_vocab or max(1, int(raw["vocab_size"]) - 2048)
    cfg = head_config_for(raw, draft_vocab_size=draft_vocab, aux_layer_ids=tuple(aux_layer_ids))
    rng = np.random.default_rng(seed)
    H, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def w(out: int, inp: int) -> np.ndarray:
        return (rng.normal(size=(out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.normal(size=H)).astype(np.float32)

    d2t, t2d = vocab_map(rng.integers(0, 1000, cfg.vocab_size), cfg.draft_vocab_size)  # offsets d2t != 0
    tensors = {
        "fc.weight": w(H, cfg.num_aux * cfg.target_hidden_size),
        "midlayer.hidden_norm.weight": norm(), "midlayer.input_layernorm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": w(cfg.num_heads * hd, 2 * H),
        "midlayer.self_attn.k_proj.weight": w(cfg.num_kv_heads * hd, 2 * H),
        "midlayer.self_attn.v_proj.weight": w(cfg.num_kv_heads * hd, 2 * H),
        "midlayer.self_attn.o_proj.weight": w(H, cfg.num_heads * hd),
        "midlayer.mlp.gate_proj.weight": w(inter, H), "midlayer.mlp.up_proj.weight": w(inter, H),
        "midlayer.mlp.down_proj.weight": w(H, inter),
        "norm.weight": norm(), "lm_head.weight": 4 * w(cfg.draft_vocab_size, H),  # x4: few near-ties
        "d2t": d2t, "t2d": t2d,
    }
    save_head(Eagle3Checkpoint(cfg, tensors, None), folder)
    return folder


def eagle3_head(model_label: str, model_dir: Path, aux_layer_ids) -> Path:
    """The cached random head of ``make_eagle3_head`` for one conformance model."""
    import hashlib
    import json

    from specrun.store import cache_dir

    key = hashlib.sha256(json.dumps([HEAD_VERSION, str(model_dir), list(aux_layer_ids)]).encode()).hexdigest()[:12]
    return _built_once(cache_dir() / "conformance" / f"head-{model_label}-{key}",
                       lambda tmp: make_eagle3_head(tmp, model_dir, aux_layer_ids))
