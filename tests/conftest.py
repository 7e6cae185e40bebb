"""Shared fixtures: tiny random-weight models of each architecture, built with transformers'
own config classes and saved as safetensors folders (with the default model's tokenizer, so the
CLI and the chat template work on them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from specrun.models import resolve_model

    return resolve_model(None)


def make_tiny_model(
    folder: Path,
    arch: str = "llama",
    *,
    vocab_size: int = 49152,
    seed: int = 0,
    tokenizer_from: Path | None = None,
    **overrides,
) -> Path:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

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
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    if arch == "qwen3":
        common.setdefault("head_dim", 16)
    if arch == "mistral":
        common.setdefault("sliding_window", 64)
    config = cls(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so logits are not all near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).exists():
                shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    """One tiny random model per architecture, with the default model's tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_model(root / a, a, tokenizer_from=default_model_dir) for a in ARCHS}


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory, default_model_dir) -> Path:
    """A second, different tiny Llama sharing the vocabulary (a model-backed drafter)."""
    return make_tiny_model(
        tmp_path_factory.mktemp("draft") / "draft", "llama", seed=7, num_hidden_layers=1, tokenizer_from=default_model_dir
    )


@pytest.fixture(scope="session")
def torch_backend():
    from specrun.plugins import load_registry

    return load_registry(["torch_cuda"]).get("torch_cuda")
