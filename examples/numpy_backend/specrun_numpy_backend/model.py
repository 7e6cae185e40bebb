"""The Llama family (Llama, Mistral, Qwen2, Qwen3) forward pass in float32 NumPy, reading a
transformers folder (config.json + *.safetensors, tensor names as transformers writes them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from specrun.errors import SpecrunError
from specrun.models import ModelConfig

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
LAYER_TENSORS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
OPTIONAL_TENSORS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                    "self_attn.o_proj.bias", "self_attn.q_norm.weight", "self_attn.k_norm.weight")


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    context_length: int
    sliding_window: int | None  # Mistral (and Qwen with use_sliding_window): keys older than this are masked
    tie_word_embeddings: bool
    inv_freq: np.ndarray  # [head_dim / 2] rope frequencies

    @classmethod
    def load(cls, model_dir: str | Path) -> Config:
        raw = ModelConfig.load(model_dir).raw
        arch = raw.get("model_type", "llama")
        if arch not in ARCHS:
            raise SpecrunError(f"model type '{arch}' is not supported by numpy_ref; supported: {', '.join(ARCHS)}")
        window = raw.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
            window = None
        try:
            heads = raw["num_attention_heads"]
            head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
            return cls(raw["vocab_size"], raw["hidden_size"], raw["num_hidden_layers"], heads,
                       raw.get("num_key_value_heads") or heads, head_dim, float(raw.get("rms_norm_eps", 1e-6)),
                       raw.get("max_position_embeddings", 2048), window, bool(raw.get("tie_word_embeddings", False)),
                       rope_inv_freq(raw, head_dim))
        except KeyError as exc:
            raise SpecrunError(f"{model_dir}/config.json lacks {exc}") from None


def rope_inv_freq(raw: dict, head_dim: int) -> np.ndarray:
    """Rope frequencies from rope_theta, with Llama 3's frequency-dependent scaling if configured."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        inv = np.where((wavelen <= old / low) & (wavelen >= old / high), mid, scaled)
    elif kind != "default":
        raise SpecrunError(f"rope type '{kind}' is not supported by numpy_ref (default and llama3 are)")
    return inv.astype(np.float32)


def load_weights(model_dir: str | Path) -> dict[str, np.ndarray]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise SpecrunError(f"{model_dir} has no *.safetensors weights")
    weights: dict[str, np.ndarray] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as exc:  # corrupt or partial file, or a dtype NumPy lacks (bf16)
            reason = (str(exc) or type(exc).__name__).splitlines()[0]
            raise SpecrunError(f"cannot read weights {f}: {reason} (numpy_ref reads f32/f16 safetensors)") from None
    return {name: w.astype(np.float32, copy=False) for name, w in weights.items()}


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def linear(x: np.ndarray, layer: dict[str, np.ndarray], name: str) -> np.ndarray:
    y = x @ layer[name + ".weight"].T
    bias = layer.get(name + ".bias")  # Qwen2's q/k/v biases (or attention_bias=True)
    return y if bias is None else y + bias


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


class LlamaNumpy:
    """The model: weights plus ``forward`` over an external KV cache [layers, kv_heads, capacity, head_dim]."""

    def __init__(self, model_dir: str | Path):
        self.cfg = c = Config.load(model_dir)
        w = load_weights(model_dir)

        def need(name: str) -> np.ndarray:
            if name not in w:
                raise SpecrunError(f"weights in {model_dir} lack tensor '{name}'; they do not match config.json")
            return w[name]

        self.embed = need("model.embed_tokens.weight")
        self.lm_head = self.embed if c.tie_word_embeddings or "lm_head.weight" not in w else w["lm_head.weight"]
        self.norm = need("model.norm.weight")
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            layer = {t + ".weight": need(p + t + ".weight") for t in LAYER_TENSORS}
            layer.update({t: w[p + t] for t in OPTIONAL_TENSORS if p + t in w})
            self.layers.append(layer)

    def forward(self, ids: Sequence[int], start: int, k_cache: np.ndarray, v_cache: np.ndarray,
                aux_layers: Sequence[int] = (), last_only: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Run ``ids`` at positions start.. on top of the cache (writing their keys/values into it).
        Returns logits [T or 1, vocab] and the inputs of ``aux_layers`` concatenated [T, n * hidden]."""
        c, T = self.cfg, len(ids)
        pos = np.arange(start, start + T)
        angles = pos[:, None].astype(np.float32) * c.inv_freq[None, :]
        angles = np.concatenate([angles, angles], -1)
        cos, sin = np.cos(angles), np.sin(angles)
        keys = np.arange(start + T)
        visible = keys[None, :] <= pos[:, None]  # causal: query i sees keys up to its own position
        if c.sliding_window is not None:
            visible &= keys[None, :] > pos[:, None] - c.sliding_window
        mask = np.where(visible, 0.0, -np.inf).astype(np.float32)
        x = self.embed[np.asarray(ids)]
        aux = []
        for i, layer in enumerate(self.layers):
            if i in aux_layers:
                aux.append(x)
            h = rms_norm(x, layer["input_layernorm.weight"], c.eps)
            x = x + self.attention(layer, h, cos, sin, k_cache[i], v_cache[i], start, mask)
            h = rms_norm(x, layer["post_attention_layernorm.weight"], c.eps)
            gate = linear(h, layer, "mlp.gate_proj")
            silu = gate * 0.5 * (1.0 + np.tanh(0.5 * gate))  # x * sigmoid(x), without overflow warnings
            x = x + linear(silu * linear(h, layer, "mlp.up_proj"), layer, "mlp.down_proj")
        if last_only:
            x = x[-1:]
        logits = rms_norm(x, self.norm, c.eps) @ self.lm_head.T
        return logits, (np.concatenate(aux, -1) if aux else None)

    def attention(self, layer: dict, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_cache: np.ndarray,
                  v_cache: np.ndarray, start: int, mask: np.ndarray) -> np.ndarray:
        c, T = self.cfg, x.shape[0]
        q = linear(x, layer, "self_attn.q_proj").reshape(T, c.num_heads, c.head_dim).transpose(1, 0, 2)
        k = linear(x, layer, "self_attn.k_proj").reshape(T, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
        v = linear(x, layer, "self_attn.v_proj").reshape(T, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
        if "self_attn.q_norm.weight" in layer:  # Qwen3: RMSNorm of each head before rope
            q = rms_norm(q, layer["self_attn.q_norm.weight"], c.eps)
            k = rms_norm(k, layer["self_attn.k_norm.weight"], c.eps)
        k_cache[:, start : start + T] = rope(k, cos, sin)
        v_cache[:, start : start + T] = v
        keys, values = k_cache[:, None, : start + T], v_cache[:, None, : start + T]  # [kv, 1, S, D]
        group = c.num_heads // c.num_kv_heads  # GQA: query head h reads kv head h // group
        q = rope(q, cos, sin).reshape(c.num_kv_heads, group, T, c.head_dim)
        scores = q @ keys.transpose(0, 1, 3, 2) / np.float32(math.sqrt(c.head_dim)) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = (probs @ values).reshape(c.num_heads, T, c.head_dim).transpose(1, 0, 2).reshape(T, -1)
        return linear(out, layer, "self_attn.o_proj")
