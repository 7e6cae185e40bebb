"""The Llama family (Llama, Mistral, Qwen2, Qwen3 as transformers defines them) in plain PyTorch,
with an explicit, preallocated KV cache.  Module names match transformers' so checkpoints load
as they are.  The ONNX and OpenVINO backends export this same definition."""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from specrun.errors import SpecrunError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@attrs.frozen
class LlamaSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    context_length: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None

    @classmethod
    def from_config(cls, raw: dict) -> LlamaSpec:
        mt = raw.get("model_type", "llama")
        if mt not in SUPPORTED_TYPES:
            raise SpecrunError(f"model type '{mt}' is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "llama3"):
            raise SpecrunError(f"rope type '{rtype}' is not supported (default and llama3 are)")
        heads = raw["num_attention_heads"]
        window = raw.get("sliding_window")
        if mt == "qwen2" and not raw.get("use_sliding_window", False):
            window = None
        if mt == "qwen3" and not raw.get("use_sliding_window", False):
            window = None
        bias = bool(raw.get("attention_bias", mt == "qwen2"))
        return cls(
            model_type=mt,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw["intermediate_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=dict(rope) if rtype == "llama3" else None,
            context_length=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bias or mt == "qwen2",
            o_bias=bias and mt in ("llama", "qwen3"),
            qk_norm=mt == "qwen3",
            sliding_window=window,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, s: LlamaSpec):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.o_bias)
        if s.qk_norm:
            self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps)
            self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, mask):
        s = self.s
        T = x.shape[1]
        q = self.q_proj(x).view(1, T, s.num_heads, s.head_dim)
        k = self.k_proj(x).view(1, T, s.num_kv_heads, s.head_dim)
        v = self.v_proj(x).view(1, T, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        k_cache[:, :, start : start + T] = k
        v_cache[:, :, start : start + T] = v.transpose(1, 2)
        keys, values = k_cache[:, :, : start + T], v_cache[:, :, : start + T]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=s.num_kv_heads != s.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(1, T, s.num_heads * s.head_dim))


class MLP(nn.Module):
    def __init__(self, s: LlamaSpec):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaSpec):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, start, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, s: LlamaSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


def rope_inv_freq(s: LlamaSpec) -> torch.Tensor:
    inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float64) / s.head_dim))
    if s.rope_scaling:  # llama3 frequency-dependent scaling
        r = s.rope_scaling
        factor, low, high = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
        old = r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old / low, old / high
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = torch.where(is_mid, mid, scaled)
    return inv.float()


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def tree_mask(
    positions: torch.Tensor, parents: list[int], start: int, window: int | None
) -> torch.Tensor:
    """bool [T, start+T] for a token tree placed after ``start`` cached tokens: node i sees the
    cache (slot j is at position j) and its ancestors (and itself); ``parents[i] < i`` or -1."""
    T = len(parents)
    anc = torch.zeros(T, T, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    anc = anc.to(positions.device)
    mask = torch.cat([torch.ones(T, start, dtype=torch.bool, device=positions.device), anc], dim=1)
    if window is not None:
        key_pos = torch.cat([torch.arange(start, device=positions.device), positions])
        mask &= key_pos[None, :] > positions[:, None] - window
    return mask


def attention_mask(positions: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """bool [T, n_keys]: key j is visible from query i if j <= pos_i (and within the window)."""
    keys = torch.arange(n_keys, device=positions.device)
    mask = keys[None, :] <= positions[:, None]
    if window is not None:
        mask &= keys[None, :] > positions[:, None] - window
    return mask


class LlamaModel(nn.Module):
    """Causal LM with an explicit KV cache passed in by the caller."""

    def __init__(self, s: LlamaSpec):
        super().__init__()
        self.spec = s
        self.model = Backbone(s)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(s), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [1, T]
        start: int,
        k_cache: torch.Tensor,  # [L, 1, kv_heads, capacity, head_dim]
        v_cache: torch.Tensor,
        aux_layers: tuple[int, ...] = (),
        last_only: bool = False,
        positions: torch.Tensor | None = None,  # [T] rope positions (token trees); default start..start+T-1
        mask: torch.Tensor | None = None,  # bool [T, start+T] (token trees); default causal
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.spec
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)
            need_mask = T > 1 or (s.sliding_window is not None and start + T > s.sliding_window)
            mask = attention_mask(positions, start + T, s.sliding_window) if need_mask else None
        cos, sin = rope_tables(self.inv_freq, positions, x.dtype)
        aux = []
        for i, layer in enumerate(self.model.layers):
            if i in aux_layers:
                aux.append(x)
            x = layer(x, cos, sin, k_cache[i], v_cache[i], start, mask)
        if last_only:  # logits of the last position only; hidden states stay complete
            x = x[:, -1:]
        logits = self.lm_head(self.model.norm(x))[0]
        hidden = torch.cat(aux, dim=-1)[0] if aux else None
        return logits, hidden

    def new_cache(self, capacity: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        shape = (s.num_layers, 1, s.num_kv_heads, capacity, s.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [Path(model_dir) / n for n in names]
    if not files:
        raise SpecrunError(f"{model_dir} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise SpecrunError(f"cannot read weights {f}: {exc}; the file is corrupt or partial") from None
    return state


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlamaModel:
    from specrun.models import ModelConfig

    cfg = ModelConfig.load(model_dir)
    spec = LlamaSpec.from_config(cfg.raw)
    with torch.device("meta"):
        model = LlamaModel(spec)
    state = load_state_dict(Path(model_dir))
    if spec.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise SpecrunError(f"weights in {model_dir} do not match its config: {str(exc).splitlines()[0]}") from None
    model.inv_freq = rope_inv_freq(spec)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = rope_inv_freq(spec).to(device)  # rope angles stay in fp32
    return model
