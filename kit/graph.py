"""An export-friendly forward over specrun_torch_cuda's ``LlamaModel``: the same weights and the
same norms/RoPE math, arranged for ONNX.  A block of T tokens attends to a *read-only* past KV
cache plus itself, and the graph returns the block's new keys/values instead of an updated copy
of the cache.  ``export.py`` documents the graph's inputs and outputs.

Why this shape: the runtime keeps the cache in its own preallocated buffers, one
``[capacity, head_dim]`` array per (layer, key/value, kv-head), so the first ``P`` cached
positions of each are one contiguous block.  Each call binds exactly those ``P`` rows as the
``past_*`` inputs (a pointer and a shape: no copy) and writes the small ``new_kv`` output into
rows ``P .. P+T-1`` afterwards.  Nothing proportional to the context is copied, rollback is
setting an integer, and the graph has no growing concatenation of the cache.  Attention to the
past is one ``MatMul`` per kv-head against those rows (ONNX Runtime folds the key transpose into
the GEMM), so the cost of a step grows with the context actually used, not with the capacity.

Export-time rewrites (numerically the same model): q/k/v and gate/up projections are fused into
one MatMul each, the attention scale is folded into the query weights (or applied after the
Qwen3 q-norm), the rotate-half of RoPE is a constant ±1 permutation MatMul (few nodes, exact),
and tied embeddings are stored once as the ``[hidden, vocab]`` head matrix that the embedding
gathers columns from.  Every projection is a plain MatMul so dynamic int8 quantization applies.
"""

from __future__ import annotations

import torch
from torch import nn

from specrun_kit.llama import LlamaModel, rope_tables


def as_weight(w: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(w.detach().t().contiguous(), requires_grad=False)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as specrun_torch_cuda.model.RMSNorm computes it (fp32)."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class _Layer(nn.Module):
    def __init__(self, layer, s, scale: float):
        super().__init__()
        att, mlp = layer.self_attn, layer.mlp
        q_w, q_b = att.q_proj.weight, att.q_proj.bias
        if not s.qk_norm:  # fold the softmax scale into the query projection
            q_w = q_w * scale
            q_b = None if q_b is None else q_b * scale
        self.w_qkv = as_weight(torch.cat([q_w, att.k_proj.weight, att.v_proj.weight]))
        self.b_qkv = None
        if att.q_proj.bias is not None:
            self.b_qkv = nn.Parameter(torch.cat([q_b, att.k_proj.bias, att.v_proj.bias]).detach(), requires_grad=False)
        self.w_o = as_weight(att.o_proj.weight)
        self.b_o = None if att.o_proj.bias is None else nn.Parameter(att.o_proj.bias.detach(), requires_grad=False)
        self.w_gu = as_weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.w_down = as_weight(mlp.down_proj.weight)
        self.ln1 = nn.Parameter(layer.input_layernorm.weight.detach(), requires_grad=False)
        self.ln2 = nn.Parameter(layer.post_attention_layernorm.weight.detach(), requires_grad=False)
        if s.qk_norm:
            self.q_norm = nn.Parameter(att.q_norm.weight.detach(), requires_grad=False)
            self.k_norm = nn.Parameter(att.k_norm.weight.detach(), requires_grad=False)


class StepGraph(nn.Module):
    """forward(input_ids [T], positions [T], block_mask [T, T], output_index [N], *past) ->
    (logits [N, V], new_kv [L, 2, kv_heads, T, D], [hidden_states [T, len(aux)*H]]).

    ``past`` holds ``2 * L * kv_heads`` tensors ``[P, D]``, ordered layer-major, then key/value,
    then kv-head (``export.past_names``); with ``kv_layout="layer"``, ``2 * L`` tensors
    ``[kv_heads, P, D]`` (layer-major, then key/value): the runtime's whole cache buffer, whose
    rows at and after the block's start (``positions.min()``) are stale.  The block's keys and
    values are written into a copy of it at rows ``start .. start+T-1`` and every query attends to
    that one sequence with one MatMul for the scores and one for the values.  The second suits
    runtimes that pay per graph node and per input (OpenVINO: ~3,600 -> ~2,900 nodes and 180 -> 60
    inputs for SmolLM2, a one-token step 30 -> 20 ms), and is batch-invariant on OpenVINO: a
    token's reductions see the same keys in the same columns whether it runs alone or in a chain
    block, so its logits are the same bits (splitting attention into past and block parts rounded
    the two partial sums differently: up to 0.55 apart at bf16).  Tree nodes whose ancestors sit
    in other rows than in a chain (a sibling took the row) are only equal to rounding.  The first
    layout lets ONNX Runtime bind the used rows of a ``[capacity, D]`` buffer by pointer."""

    def __init__(self, model: LlamaModel, aux_layers: tuple[int, ...] = (), kv_layout: str = "head"):
        super().__init__()
        if kv_layout not in ("head", "layer"):
            raise ValueError(f"kv_layout must be 'head' or 'layer', got {kv_layout!r}")
        self.kv_layout = kv_layout
        self.spec = s = model.spec
        self.aux_layers = tuple(aux_layers)
        for a in self.aux_layers:
            if not 0 <= a < s.num_layers:
                raise ValueError(f"aux layer {a} out of range 0..{s.num_layers - 1}")
        self.scale = s.head_dim**-0.5
        self.layers = nn.ModuleList(_Layer(layer, s, self.scale) for layer in model.model.layers)
        self.norm = nn.Parameter(model.model.norm.weight.detach(), requires_grad=False)
        # tied embeddings are stored once ([H, V], gathered by column) for ONNX Runtime; the layer
        # layout (OpenVINO) keeps a [V, H] embedding: nncf-compressed weights gathered by column
        # give wrong rows on OpenVINO 2026.4
        self.tied = (s.tie_word_embeddings or model.lm_head.weight is model.model.embed_tokens.weight) and kv_layout == "head"
        self.head_t = as_weight(model.lm_head.weight)  # [H, V]
        if not self.tied:
            self.embed = nn.Parameter(model.model.embed_tokens.weight.detach(), requires_grad=False)
        self.register_buffer("inv_freq", model.inv_freq.detach().float().clone(), persistent=False)
        D, half = s.head_dim, s.head_dim // 2
        rot = torch.zeros(D, D)  # x @ rot == cat([-x[half:], x[:half]])
        rot[torch.arange(half) + half, torch.arange(half)] = -1.0
        rot[torch.arange(half), torch.arange(half) + half] = 1.0
        self.register_buffer("rot", rot, persistent=False)
        if self.aux_layers and kv_layout == "layer":
            # hidden states leave through x @ I: OpenVINO's CPU plugin computes the "tail" between
            # an output and the last MatMul before it in f32 even under a bf16 hint, and without
            # this barrier the whole residual stream would be that tail: a graph with hidden-state
            # outputs (EAGLE-3) would compute other logits than the plain graph
            self.register_buffer("aux_identity", torch.eye(s.hidden_size), persistent=False)

    def forward(self, input_ids, positions, block_mask, output_index, *past):
        s = self.spec
        nh, nkv, D, eps = s.num_heads, s.num_kv_heads, s.head_dim, s.rms_norm_eps
        g = nh // nkv
        if self.tied:
            x = torch.index_select(self.head_t, 1, input_ids).t()  # [T, H]
        else:
            x = torch.index_select(self.embed, 0, input_ids)
        cos, sin = rope_tables(self.inv_freq, positions, x.dtype)  # [T, D]

        # Visibility.  Past row j is visible from query i iff j < min(positions) (rows at or
        # after the block's start are padding) and, with a sliding window, j > pos_i - window.
        # Block key j is visible from query i iff block_mask[i, j] (causal for a chain, the
        # ancestors for a token tree) and within the window.
        n_past = past[0].shape[1 if self.kv_layout == "layer" else 0]
        n_new = input_ids.shape[0]
        rows = torch.arange(n_past, dtype=positions.dtype)
        past_ok = rows[None, :] < positions.min()
        new_ok = block_mask
        if s.sliding_window is not None:
            past_ok = past_ok & (rows[None, :] > positions[:, None] - s.sliding_window)
            new_ok = new_ok & (positions[None, :] > positions[:, None] - s.sliding_window)
        else:
            past_ok = past_ok.expand(n_new, n_past)
        if self.kv_layout == "layer":
            # the block's keys take their cache rows (start..start+T-1) in a copy of the buffer, so
            # every query attends to one [rows] sequence in cache order, whatever block it is in
            start = positions.min()
            slots = start + torch.arange(n_new, dtype=positions.dtype)
            rel = rows - start  # [P]
            in_block = (rel >= 0) & (rel < n_new)
            blk = torch.gather(new_ok, 1, rel.clamp(0, n_new - 1)[None, :].expand(n_new, n_past)) & in_block[None, :]
            visible = past_ok | blk  # [T, P]
        else:
            visible = torch.cat([past_ok, new_ok], dim=1)  # [T, P+T]
        bias = torch.where(visible, torch.zeros((), dtype=x.dtype), torch.full((), float("-inf"), dtype=x.dtype))
        bias = bias.repeat(g, 1)  # [g*T, P(+T)], rows ordered (group member, token)

        news: list[torch.Tensor] = []
        aux: list[torch.Tensor] = []
        for i, ly in enumerate(self.layers):
            if i in self.aux_layers:
                aux.append(x)
            h = rms_norm(x, ly.ln1, eps)
            qkv = torch.matmul(h, ly.w_qkv)
            if ly.b_qkv is not None:
                qkv = qkv + ly.b_qkv
            q, k, v = torch.split(qkv.reshape(-1, nh + 2 * nkv, D), [nh, nkv, nkv], dim=1)
            if s.qk_norm:
                q = rms_norm(q, ly.q_norm, eps) * self.scale
                k = rms_norm(k, ly.k_norm, eps)
            qk = torch.cat([q, k], dim=1).transpose(0, 1)  # [nh+nkv, T, D]
            qk = qk * cos + torch.matmul(qk, self.rot) * sin
            q, k = torch.split(qk, [nh, nkv], dim=0)
            v = v.transpose(0, 1)  # [nkv, T, D]
            news.append(torch.stack([k, v]))  # [2, nkv, T, D]
            qg = q.reshape(nkv, -1, D)  # [nkv, g*T, D]: query head kvh*g + j uses kv head kvh
            if self.kv_layout == "layer":
                k_all = past[2 * i].index_copy(1, slots, k)  # [nkv, P, D]
                v_all = past[2 * i + 1].index_copy(1, slots, v)
                p = torch.softmax(torch.matmul(qg, k_all.transpose(1, 2)) + bias, dim=-1)
                o = torch.matmul(p, v_all)
            else:
                s_new = torch.matmul(qg, k.transpose(1, 2))  # [nkv, g*T, T]
                base = 2 * i * nkv
                past_k, past_v = past[base : base + nkv], past[base + nkv : base + 2 * nkv]  # nkv x [P, D]
                qs = torch.split(qg, 1, dim=0)
                s_past = torch.cat([torch.matmul(qs[j], past_k[j].t()) for j in range(nkv)], dim=0)  # [nkv, g*T, P]
                p = torch.softmax(torch.cat([s_past, s_new], dim=2) + bias, dim=-1)
                p_past, p_new = p[:, :, :n_past], p[:, :, n_past:]
                ps = torch.split(p_past, 1, dim=0)
                o = torch.cat([torch.matmul(ps[j], past_v[j]) for j in range(nkv)], dim=0) + torch.matmul(p_new, v)
            o = o.reshape(nh, -1, D).transpose(0, 1).reshape(-1, nh * D)
            o = torch.matmul(o, ly.w_o)
            if ly.b_o is not None:
                o = o + ly.b_o
            x = x + o
            gate, up = torch.split(torch.matmul(rms_norm(x, ly.ln2, eps), ly.w_gu), [s.intermediate_size] * 2, dim=1)
            x = x + torch.matmul(torch.nn.functional.silu(gate) * up, ly.w_down)

        x = torch.index_select(x, 0, output_index)
        logits = torch.matmul(rms_norm(x, self.norm, eps), self.head_t)
        outs = [logits, torch.stack(news)]  # new_kv: [L, 2, nkv, T, D]
        if aux:
            if self.kv_layout == "layer":
                aux = [torch.matmul(a, self.aux_identity) for a in aux]
            outs.append(torch.cat(aux, dim=1))  # every row: drafters need all new positions
        return tuple(outs)
