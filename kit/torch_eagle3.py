"""The EAGLE-3 head in PyTorch: inference with a KV cache (a specrun DraftHead) and the
training-time-test forward used by ``specrun train-draft``.  Parameter names match the
SpecForge / SGLang / vLLM checkpoint (``fc``, ``midlayer.*``, ``norm``, ``lm_head``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from specrun.eagle3 import Eagle3Checkpoint, Eagle3Config
from specrun.errors import SpecrunError
from specrun.interfaces import DraftHead, HeadOutput

from .llama import MLP, Attention, LlamaSpec, RMSNorm, apply_rope, attention_mask, rope_inv_freq, rope_tables


def head_spec(cfg: Eagle3Config) -> LlamaSpec:
    return LlamaSpec(
        model_type="llama", vocab_size=cfg.draft_vocab_size, hidden_size=cfg.hidden_size, num_layers=1,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling, context_length=cfg.max_position_embeddings, tie_word_embeddings=False,
        qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=None,
    )


class Eagle3Layer(nn.Module):
    def __init__(self, s: LlamaSpec):
        super().__init__()
        H = s.hidden_size
        self.hidden_norm = RMSNorm(H, s.rms_norm_eps)
        self.input_layernorm = RMSNorm(H, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, s.rms_norm_eps)
        self.self_attn = Attention(s)
        # q/k/v read concat(embedding, hidden): input width 2H
        self.self_attn.q_proj = nn.Linear(2 * H, s.num_heads * s.head_dim, bias=False)
        self.self_attn.k_proj = nn.Linear(2 * H, s.num_kv_heads * s.head_dim, bias=False)
        self.self_attn.v_proj = nn.Linear(2 * H, s.num_kv_heads * s.head_dim, bias=False)
        self.mlp = MLP(s)


class Eagle3Module(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        s = head_spec(cfg)
        self.cfg, self.spec = cfg, s
        H = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.embed_tokens.weight.requires_grad_(False)  # frozen, the target's
        self.fc = nn.Linear(cfg.num_aux * cfg.target_hidden_size, H, bias=False)
        self.midlayer = Eagle3Layer(s)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(s), persistent=False)

    def _pre(self, ids: torch.Tensor, hidden: torch.Tensor, from_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(hidden) if from_target else hidden
        m = self.midlayer
        x = torch.cat([m.input_layernorm(self.embed_tokens(ids)), m.hidden_norm(h)], dim=-1)
        return h, x

    def _post(self, h: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.midlayer
        r = h + attn
        out = r + m.mlp(m.post_attention_layernorm(r))
        return self.lm_head(self.norm(out)), out

    def forward(self, ids, hidden, from_target: bool = True, positions=None, k_cache=None, v_cache=None,
                start: int = 0, mask=None, *, valid=None, ttt_steps: int | None = None, select=None):
        """Inference, batch 1: ids [1, T], hidden [1, T, *]; cache [1, kv, capacity, hd].
        With ``ttt_steps``: the training-time test (``ttt``), e.g. through DistributedDataParallel."""
        if ttt_steps is not None:
            return self.ttt(ids, hidden, valid, ttt_steps, select)
        h, x = self._pre(ids, hidden, from_target)
        cos, sin = rope_tables(self.inv_freq, positions, x.dtype)
        attn = self.midlayer.self_attn(x, cos, sin, k_cache, v_cache, start, mask)
        return self._post(h, attn)

    # ---------------------------------------------------------------- training-time test
    def ttt(self, ids: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor, steps: int,
            select: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Unroll ``steps`` draft steps over whole sequences at once (EAGLE-3's training-time test).

        ``ids`` [B, S]: token t+1 at position t; ``hidden`` [B, S, n_aux*Ht]: target hidden states
        at t; ``valid`` [B, S] bool (right padding).  Step i at position t reads token t+1+i and the
        previous step's output at t, uses rope position t+i, and attends causally to step 0's
        keys (positions <= t) and to steps 1..i at the same position only.  Returns the logits
        [B, S, Vd] of each step (step i at t predicts token t+2+i); with ``select`` (a bool [B, S]
        mask per step) only the selected rows [N_i, Vd] — the draft vocabulary projection is most
        of the cost, and only labelled positions need it."""
        s = self.spec
        B, S = ids.shape
        nh, nkv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        att = self.midlayer.self_attn
        pos = torch.arange(S, device=ids.device)
        keys0 = values0 = None
        diag_k: list[torch.Tensor] = []
        diag_v: list[torch.Tensor] = []
        h: torch.Tensor = hidden
        outs = []
        scale = 1.0 / hd**0.5
        for i in range(steps):
            ids_i = torch.cat([ids[:, i:], ids[:, :0].new_zeros(B, min(i, S))], dim=1)[:, :S]
            h, x = self._pre(ids_i, h, from_target=i == 0)
            cos, sin = rope_tables(self.inv_freq, pos + i, x.dtype)
            q = apply_rope(att.q_proj(x).view(B, S, nh, hd).transpose(1, 2), cos, sin)
            k = apply_rope(att.k_proj(x).view(B, S, nkv, hd).transpose(1, 2), cos, sin)
            v = att.v_proj(x).view(B, S, nkv, hd).transpose(1, 2)
            if nkv != nh:
                k = k.repeat_interleave(nh // nkv, dim=1)
                v = v.repeat_interleave(nh // nkv, dim=1)
            if i == 0:
                keys0, values0 = k, v
            else:
                diag_k.append(k)
                diag_v.append(v)
            o = ttt_attention(q, keys0, values0, diag_k, diag_v, valid, scale)
            attn = att.o_proj(o.transpose(1, 2).reshape(B, S, nh * hd))
            m = self.midlayer
            r = h + attn
            h = r + m.mlp(m.post_attention_layernorm(r))
            rows = h if select is None else h[select[i]]
            outs.append(self.lm_head(self.norm(rows)))
        return outs

    def load_checkpoint(self, ck: Eagle3Checkpoint) -> None:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ck.tensors.items() if k not in ("d2t", "t2d")}
        if ck.embed is None:
            raise SpecrunError("the head has no embedding: load it with the target folder")
        embed = ck.embed if ck.embed.flags.writeable else np.array(ck.embed)  # a read-only memory map: copy
        state["embed_tokens.weight"] = torch.from_numpy(np.ascontiguousarray(embed))
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SpecrunError(f"head weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def export_tensors(self) -> dict[str, np.ndarray]:
        """Weights under the checkpoint's names (embedding excluded), float32 numpy."""
        return {k: v.detach().float().cpu().numpy().copy() for k, v in self.state_dict().items() if k != "embed_tokens.weight"}


def ttt_attention(q, keys0, values0, diag_k: list, diag_v: list, valid, scale: float) -> torch.Tensor:
    """One training-time-test step's attention: query t attends causally to step 0's keys
    (positions <= t) and to the earlier steps' keys at t only (``diag_k``/``diag_v``), one softmax
    over both.  On CPU the causal part runs in PyTorch's flash kernel and is merged with the
    diagonal terms through its log-sum-exp (no [S, S] matrix is kept: 2k-token sequences train in
    a fraction of the memory and time); elsewhere the scores are materialized
    (``ttt_attention_reference``).  Right padding needs no key mask: a valid query's causal keys
    are all valid, and padded rows carry no loss."""
    if q.device.type != "cpu" or not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return ttt_attention_reference(q, keys0, values0, diag_k, diag_v, valid, scale)
    # the flash kernel wants one dtype: under autocast the autocast dtype (what a matmul would run in)
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    q, keys0, values0 = q.to(dt), keys0.to(dt), values0.to(dt)
    diag_k, diag_v = [t.to(dt) for t in diag_k], [t.to(dt) for t in diag_v]
    main, lse = _CausalAttentionLSE.apply(q, keys0, values0, scale)
    if not diag_k:
        return main
    extra = [((q * dk).sum(-1).float() * scale) for dk in diag_k]  # [B, nh, S] each
    w = torch.softmax(torch.stack([lse, *extra], dim=-1), dim=-1).to(q.dtype)  # [B, nh, S, 1 + i]
    o = w[..., :1] * main
    for j, dv in enumerate(diag_v):
        o = o + w[..., j + 1 : j + 2] * dv
    return o


def ttt_attention_reference(q, keys0, values0, diag_k: list, diag_v: list, valid, scale: float) -> torch.Tensor:
    """``ttt_attention`` with the full score matrix (any device; the CPU path is tested against it)."""
    S = q.shape[-2]
    pos = torch.arange(S, device=q.device)
    causal = (pos[None, :] <= pos[:, None])[None, None] & valid[:, None, None, :]  # [B,1,S,S]
    scores = (q @ keys0.transpose(-1, -2)) * scale  # [B, nh, S, S]
    scores = scores.masked_fill(~causal, float("-inf"))
    extra = [(q * dk).sum(-1, keepdim=True) * scale for dk in diag_k]  # [B, nh, S, 1] each
    allsc = torch.cat([scores, *extra], dim=-1)
    w = torch.softmax(allsc.float(), dim=-1).to(q.dtype)
    o = w[..., :S] @ values0
    for j, dv in enumerate(diag_v):
        o = o + w[..., S + j : S + j + 1] * dv
    return o


class _CausalAttentionLSE(torch.autograd.Function):
    """Causal attention and its log-sum-exp (float32), both differentiable, with PyTorch's CPU
    flash kernels.  The kernel's backward has no log-sum-exp input; it is folded in through the
    row term D = rowsum(dO * out) that the backward subtracts: with one extra value column (0 in the
    forward) whose output is set to -dLSE and whose incoming gradient is 1, D becomes D - dLSE,
    which is exactly the log-sum-exp's contribution w * dLSE to the score gradient."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        hd = v.shape[-1]
        q, k, v = (torch.nn.functional.pad(t, (0, 1)) for t in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.hd = scale, hd
        return out[..., :hd], lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        hd = ctx.hd
        d_out = torch.zeros_like(out[..., :hd]) if d_out is None else d_out.to(out.dtype)
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        grad = torch.cat([d_out, torch.ones_like(out[..., :1])], dim=-1).contiguous()
        folded = torch.cat([out[..., :hd], -d_lse.to(out.dtype)[..., None]], dim=-1).contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, folded, lse, 0.0, True, scale=ctx.scale)
        return dq[..., :hd], dk[..., :hd], dv[..., :hd], None


class TorchDraftHead(DraftHead):
    def __init__(self, ck: Eagle3Checkpoint, device: str, dtype: torch.dtype, precision: str):
        self.config = ck.config
        self.d2t = np.asarray(ck.tensors["d2t"], dtype=np.int64)
        self.backend, self.device, self.precision = "torch_cuda", device, precision
        with torch.device("meta"):
            module = Eagle3Module(ck.config)
        module.to_empty(device="cpu")
        module.load_checkpoint(ck)
        module.inv_freq = rope_inv_freq(module.spec)
        self.module = module.to(device=device, dtype=dtype).eval()
        self.module.inv_freq = rope_inv_freq(module.spec).to(device)
        self._dtype = dtype
        self._k = self._v = None
        self._len = 0

    @property
    def length(self) -> int:
        return self._len

    def _new(self, capacity: int):
        s = self.module.spec
        shape = (1, s.num_kv_heads, capacity, s.head_dim)
        return torch.zeros(shape, device=self.device, dtype=self._dtype), torch.zeros(shape, device=self.device, dtype=self._dtype)

    def reset(self, capacity: int) -> None:
        if self._k is None or self._k.shape[2] < capacity:
            self._k, self._v = self._new(capacity)
        self._len = 0

    def _ensure(self, needed: int) -> None:
        if self._k is None:
            self.reset(max(needed, 256))
        elif self._k.shape[2] < needed:
            k, v = self._new(max(needed, 2 * self._k.shape[2]))
            k[:, :, : self._len] = self._k[:, :, : self._len]
            v[:, :, : self._len] = self._v[:, :, : self._len]
            self._k, self._v = k, v

    def forward(self, tokens: Sequence[int], hidden: np.ndarray, *, from_target: bool = True,
                positions: Sequence[int] | None = None, mask: np.ndarray | None = None) -> HeadOutput:
        T = len(tokens)
        if T == 0:
            raise ValueError("forward needs at least one token")
        hidden = np.asarray(hidden, dtype=np.float32)
        cfg = self.config
        width = cfg.num_aux * cfg.target_hidden_size if from_target else cfg.hidden_size
        if hidden.shape != (T, width):
            raise ValueError(f"hidden must be [{T}, {width}], got {list(hidden.shape)}")
        start = self._len
        self._ensure(start + T)
        dev = self.device
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=dev)
        hid = torch.from_numpy(hidden).to(device=dev, dtype=self._dtype)[None]
        if positions is None:
            pos = torch.arange(start, start + T, device=dev)
            m = attention_mask(pos, start + T, None) if T > 1 else None
        else:
            pos = torch.as_tensor(np.asarray(positions, dtype=np.int64), device=dev)
            m = None
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask, dtype=np.bool_), device=dev)
            if tuple(m.shape) != (T, start + T):
                raise ValueError(f"mask must be [{T}, {start + T}], got {list(m.shape)}")
        elif positions is not None:
            m = torch.ones(T, start + T, dtype=torch.bool, device=dev).tril(start)
        with torch.inference_mode():
            logits, out = self.module(ids, hid, from_target, pos, self._k, self._v, start, m)
        self._len = start + T
        return HeadOutput(logits[0].float().cpu().numpy(), out[0].float().cpu().numpy())

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot roll back to {length}: cache holds {self._len} entries")
        self._len = length


def load_torch_head(checkpoint_dir: str, target_dir: str, *, device: str, dtype: torch.dtype, precision: str) -> TorchDraftHead:
    ck = Eagle3Checkpoint.load(checkpoint_dir, target_dir)
    return TorchDraftHead(ck, device, dtype, precision)
