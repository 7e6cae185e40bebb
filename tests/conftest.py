"""Shared fixtures: tiny random-weight models of each architecture, built with transformers'
own config classes and saved as safetensors folders (with the default model's tokenizer, so the
CLI and the chat template work on them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from specrun_conformance.models import ARCHS, make_tiny_model  # noqa: F401 - shared with the conformance kit


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """The whole run uses a temporary specrun cache (subprocesses inherit it), so the exports of
    the tiny models made for each run do not pile up in the user's cache.  Only the converted
    default model is shared with the user cache (its ``models`` folder: content-keyed, the same
    conversion `specrun generate` makes), so it is not converted again on every run."""
    from specrun.store import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("specrun-cache")
    (root / "models").symlink_to(models, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECRUN_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="session")
def default_model_dir(private_cache) -> Path:
    from specrun.models import resolve_model

    return resolve_model(None)


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


def register_backend_for_tests(registry, backend, package: str = "test") -> None:
    """Add an in-process backend to a registry, as an installed plugin would be (name clashes included)."""
    from specrun.plugins import BackendEntry, _add

    _add(registry, BackendEntry(backend.name, package, "0", backend))
