"""transformers folder (safetensors) -> GGUF, the llama.cpp backend's model format.

Written with the ``gguf`` package (llama.cpp's own GGUF library): f32 tensors under llama.cpp's
names (``gguf.get_tensor_name_map``), the architecture's hyper-parameters and the tokenizer's
vocabulary (specrun tokenizes itself and feeds token ids, but llama.cpp loads a vocabulary with
every model).  Weight formats other than f32 are made from the f32 file by llama.cpp's own
quantizer (``llama_model_quantize``).  Only what llama.cpp computes the same way as the reference
model is converted: Llama, Qwen2 and Qwen3 layouts without sliding windows or rope scaling; any
other model is refused with one line saying why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from specrun.errors import SpecrunError
from specrun.models import ModelConfig

#: model_type -> llama.cpp architecture name
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def check_convertible(model_dir: str | Path) -> ModelConfig:
    """The model's config, or a SpecrunError naming what llama.cpp would compute differently."""
    cfg = ModelConfig.load(model_dir)
    raw = cfg.raw
    if cfg.model_type not in ARCHS:
        raise SpecrunError(
            f"the llama_cpp backend converts {', '.join(ARCHS)} models; {model_dir} is '{cfg.model_type}' "
            "(convert it with llama.cpp's convert_hf_to_gguf.py and use another backend, or pick --backend openvino)"
        )
    if raw.get("sliding_window") and raw.get("use_sliding_window", cfg.model_type == "mistral") \
            and int(raw["sliding_window"]) < cfg.context_length:
        raise SpecrunError(
            f"{model_dir} attends through a sliding window of {raw['sliding_window']} tokens, which llama.cpp's "
            f"'{ARCHS[cfg.model_type]}' architecture does not apply; use --backend openvino or onnx_cpu"
        )
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise SpecrunError(f"{model_dir} uses '{rope_type}' rope scaling, which this converter does not write; "
                           "use --backend openvino or onnx_cpu")
    return cfg


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half rope layout of q/k rows -> llama.cpp's 'llama' arch (pairs interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model_dir: Path):
    """(name, float32 array) for every tensor of the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SpecrunError(f"{model_dir} has no *.safetensors weights")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name).float().numpy()
        except (OSError, ValueError, RuntimeError, Exception) as exc:  # SafetensorError derives from Exception only
            if isinstance(exc, SpecrunError):
                raise
            raise SpecrunError(f"cannot read weights {f}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _vocab(model_dir: Path, n_vocab: int):
    """(tokens, token types, merges) from the folder's BPE tokenizer, padded to the model's vocabulary."""
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab, bytes_to_unicode

    tokens, types = [], []
    if (model_dir / "tokenizer.json").exists():
        try:
            vocab = BpeVocab(model_dir)
        except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise SpecrunError(f"the llama_cpp backend converts BPE tokenizers; {model_dir}/tokenizer.json is not one ({exc})") from None
        for text, _score, toktype in vocab.all_tokens():
            tokens.append(text)
            types.append(int(toktype))
    else:  # no tokenizer (specrun feeds token ids): the 256 byte tokens llama.cpp's loader needs, then placeholders
        if n_vocab < 256:
            raise SpecrunError(f"{model_dir} has no tokenizer.json and a vocabulary of {n_vocab} (< 256) tokens")
        tokens = [c.encode() for c in bytes_to_unicode().values()]
        types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    if len(tokens) > n_vocab:
        raise SpecrunError(f"{model_dir}: the tokenizer has {len(tokens)} tokens, the model's vocabulary {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        types.append(int(gguf.TokenType.UNUSED))
    special = SpecialVocab(model_dir, load_merges=(model_dir / "tokenizer.json").exists(), n_vocab=n_vocab)
    return tokens, types, special


def write_gguf(model_dir: str | Path, out: Path) -> None:
    """Write ``model_dir`` as an f32 GGUF file ``out``."""
    import gguf

    model_dir = Path(model_dir)
    cfg = check_convertible(model_dir)
    raw = cfg.raw
    print(f"specrun: converting {model_dir.name} to GGUF for llama.cpp (once) ...", file=sys.stderr, flush=True)
    arch_name = ARCHS[cfg.model_type]
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[arch_name]
    n_head = int(raw["num_attention_heads"])
    n_kv = int(raw.get("num_key_value_heads", n_head))
    head_dim = int(raw.get("head_dim") or cfg.hidden_size // n_head)
    names = gguf.get_tensor_name_map(arch, cfg.num_layers)

    w = gguf.GGUFWriter(str(out), arch_name)
    w.add_name(model_dir.name)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(int(raw["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(raw))
    w.add_layer_norm_rms_eps(float(raw.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types, special = _vocab(model_dir, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    if not special.merges:  # llama.cpp's BPE loader wants at least one merge; tokens stay byte-level
        w.add_token_merges(["\u0120 \u0120"])

    tied = bool(raw.get("tie_word_embeddings", False))
    for name, data in _tensors(model_dir):
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SpecrunError(f"{model_dir}: tensor '{name}' has no llama.cpp counterpart in the '{arch_name}' architecture")
        if arch_name == "llama" and (".attn_q." in new or ".attn_k." in new):
            data = _permute(data, n_head if ".attn_q." in new else n_kv)
        w.add_tensor(new, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(llama_cpp, source: Path, out: Path, ftype: int, threads: int) -> None:
    """llama.cpp's quantizer: ``source`` (f32 GGUF) -> ``out`` in file type ``ftype``."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if rc != 0:
        raise SpecrunError(f"llama.cpp could not quantize {source} (error {rc})")
    print(f"specrun: llama.cpp quantized {source.name} -> {out.name}", file=sys.stderr, flush=True)
