"""The models the suite runs on: tiny random-weight models of each Llama-family architecture
(built once, deterministically, with transformers' own config classes) and the default model."""

from __future__ import annotations

import os
import shutil
import tempfile
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
    from specrun.models import cache_dir

    arch, _, vocab = name.partition("-v")
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    target = cache_dir() / "conformance" / f"tiny-{name}-{TINY_VERSION}"
    if (target / "complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make_tiny_model(tmp, arch, seed=ARCHS.index(arch), vocab_size=int(vocab) if vocab else 49152)
        (tmp / "complete").write_text("ok")
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
