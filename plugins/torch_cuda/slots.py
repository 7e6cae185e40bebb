"""Continuous batching for the Llama-family model: many sequences decode together, each in its own
slot of one preallocated KV cache, and a slot whose sequence ended takes the next one at once.

This is the engine of ``specrun train-draft --stage data`` (regenerating answers with the target).
A slot holds a whole conversation: the next human turn is prefilled on top of the slot's cache, so
multi-turn answers are regenerated in context without recomputing the earlier turns.

Decoding one token for every active slot is one batched pass through the weights (the matmuls see
B rows instead of 1, which is what makes it fast on a CPU); attention runs per slot on views of
the cache (no copy, no padding to the longest sequence).  At long contexts attention, not the weights,
dominates a step (reading every slot's keys and values): a bf16 cache halves that traffic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specrun_kit.llama import LlamaModel, apply_rope, rope_tables


class SlotEngine:
    def __init__(self, model: LlamaModel, slots: int, capacity: int, dtype: torch.dtype = torch.float32):
        s = model.spec
        self.model = model
        self.spec = s
        self.slots = slots
        self.capacity = capacity
        shape = (s.num_layers, slots, s.num_kv_heads, capacity, s.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.length = [0] * slots  # tokens in each slot's cache

    def reset(self, slot: int) -> None:
        self.length[slot] = 0

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> int:
        """Append ``ids`` to ``slot``'s sequence; returns the greedy next token."""
        start = self.length[slot]
        if start + len(ids) > self.capacity:
            raise ValueError(f"slot {slot}: {start + len(ids)} tokens exceed the capacity {self.capacity}")
        x = torch.tensor([ids], dtype=torch.long)
        end = start + len(ids)
        if self.k.dtype == self.model.lm_head.weight.dtype:
            logits, _ = self.model(x, start, self.k[:, slot : slot + 1], self.v[:, slot : slot + 1], last_only=True)
        else:  # the model computes in its own dtype: run on a copy of the slot's prefix, store the rows rounded
            wd = self.model.lm_head.weight.dtype
            k = self.k[:, slot : slot + 1, :, :end].to(wd)
            v = self.v[:, slot : slot + 1, :, :end].to(wd)
            logits, _ = self.model(x, start, k, v, last_only=True)
            self.k[:, slot : slot + 1, :, start:end] = k[:, :, :, start:end]
            self.v[:, slot : slot + 1, :, start:end] = v[:, :, :, start:end]
        self.length[slot] = start + len(ids)
        return int(logits[-1].argmax())

    def rollback(self, slot: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``slot``'s cache (after a block's rejected rows)."""
        self.length[slot] = min(self.length[slot], length)

    def step(self, slots: list[int], tokens: list[int]) -> list[int]:
        """One decode step: ``tokens[b]`` is appended to slot ``slots[b]``; returns each greedy next
        token."""
        return [rows[0] for rows in self.forward_blocks(slots, [[t] for t in tokens])]

    @torch.inference_mode()
    def forward_blocks(self, slots: list[int], blocks: list[list[int]]) -> list[list[int]]:
        """Append ``blocks[b]`` (one or more tokens) to slot ``slots[b]``, causally, all slots in one
        batched pass; returns the greedy next token after every row of every block.  A block of a
        pending token and draft tokens verifies the draft (prompt lookup in the data stage): one read
        of a slot's cache serves all its rows; ``rollback`` then drops the rejected rows."""
        s = self.spec
        sizes = [len(b) for b in blocks]
        base = [self.length[i] for i in slots]
        if any(p + n > self.capacity for p, n in zip(base, sizes, strict=True)):
            raise ValueError("a slot is full")
        row_slot = [sl for sl, n in zip(slots, sizes, strict=True) for _ in range(n)]
        row_pos = [p + j for p, n in zip(base, sizes, strict=True) for j in range(n)]
        R = len(row_pos)
        m = self.model
        x = m.model.embed_tokens(torch.tensor([t for b in blocks for t in b], dtype=torch.long))[:, None]  # [R, 1, H]
        pos_t = torch.tensor(row_pos, dtype=torch.long)
        slot_t = torch.tensor(row_slot, dtype=torch.long)
        cos, sin = rope_tables(m.inv_freq, pos_t, x.dtype)  # [R, D]
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        window = s.sliding_window
        gqa = s.num_kv_heads != s.num_heads
        kv_dtype = self.k.dtype
        masks = [None if n == 1 else self._block_mask(p, n) for p, n in zip(base, sizes, strict=True)]
        for li, layer in enumerate(m.model.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = att.q_proj(h).view(R, 1, s.num_heads, s.head_dim)
            k = att.k_proj(h).view(R, 1, s.num_kv_heads, s.head_dim)
            v = att.v_proj(h).view(R, 1, s.num_kv_heads, s.head_dim)
            if s.qk_norm:
                q, k = att.q_norm(q), att.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin)  # [R, heads, 1, D]
            k = apply_rope(k.transpose(1, 2), cos, sin)  # [R, kv, 1, D]
            kc, vc = self.k[li], self.v[li]
            kc[slot_t, :, pos_t] = k[:, :, 0].to(kc.dtype)
            vc[slot_t, :, pos_t] = v[:, 0].to(vc.dtype)
            qk = q.to(kv_dtype)
            out = torch.empty(R, s.num_heads, 1, s.head_dim, dtype=kv_dtype)
            r = 0
            for slot, p, n, mask in zip(slots, base, sizes, masks, strict=True):
                end = p + n
                lo = 0 if window is None else max(0, p + 1 - window)
                if n == 1:
                    out[r : r + 1] = F.scaled_dot_product_attention(
                        qk[r : r + 1], kc[slot : slot + 1, :, lo:end], vc[slot : slot + 1, :, lo:end], enable_gqa=gqa
                    )
                else:  # the block's rows as one query sequence [1, heads, n, D], causal within the block
                    qb = qk[r : r + n, :, 0].transpose(0, 1)[None]
                    o = F.scaled_dot_product_attention(qb, kc[slot : slot + 1, :, lo:end], vc[slot : slot + 1, :, lo:end],
                                                       attn_mask=mask[:, lo:], enable_gqa=gqa)
                    out[r : r + n] = o[0].transpose(0, 1)[:, :, None]
                r += n
            out = out.to(x.dtype)
            x = x + att.o_proj(out.transpose(1, 2).reshape(R, 1, s.num_heads * s.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        best = m.lm_head(m.model.norm(x[:, 0])).argmax(-1).tolist()
        out_rows, r = [], 0
        for slot, n in zip(slots, sizes, strict=True):
            self.length[slot] += n
            out_rows.append(best[r : r + n])
            r += n
        return out_rows

    def _block_mask(self, start: int, n: int) -> torch.Tensor:
        """bool [n, start+n]: row j (at position start+j) sees positions <= start+j (within the window)."""
        keys = torch.arange(start + n)[None, :]
        rows = torch.arange(start, start + n)[:, None]
        mask = keys <= rows
        if self.spec.sliding_window is not None:
            mask &= keys > rows - self.spec.sliding_window
        return mask
