"""The KV-buffer target of exported graphs (ONNX Runtime, OpenVINO): the cache lives in
preallocated numpy buffers the backend binds to its runtime; a subclass provides ``_execute``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specrun.errors import SpecrunError
from specrun.interfaces import ModelInfo, StepOutput, Target

from . import export as ex


def kept_path(tree: tuple[int, int] | None, indices: Sequence[int]) -> tuple[int, list[int]]:
    """For implementations of ``Target.keep``: ``tree`` = (cache length before the tree, nodes) as
    recorded by ``forward_tree``; returns (that length, the validated node indices)."""
    if tree is None:
        raise ValueError("keep() follows forward_tree()")
    start, T = tree
    idx = list(indices)
    if not idx or idx[0] != 0 or any(b <= a for a, b in zip(idx, idx[1:], strict=False)) or idx[-1] >= T:
        raise ValueError(f"keep needs increasing node indices starting at the root (0), got {idx}")
    return start, idx

class KVBufferTarget(Target):
    """The Target contract over a graph with the ``export.py`` interface, for any runtime.

    Cache: ``self._kv`` is ``[L, 2, kv_heads, capacity, D]`` float32.  A forward passes rows
    ``0..length-1`` of every (layer, k/v, head) slice as the graph's ``past_*`` inputs (views into
    the buffer: no copy), runs the block, and writes the block's ``new_kv`` into rows
    ``length..length+T-1``.  ``rollback`` only moves ``length``.  A runtime implements ``_execute``."""

    kv_dtype: type = np.float32  # the cache buffer's numpy type (a runtime may store bf16 bits as uint16)

    def __init__(self, meta: ex.GraphMeta, backend: str, device: str, precision: str, path: Path):
        self.meta, self.path = meta, path
        self.backend, self.device, self.precision = backend, device, precision
        self.info = ModelInfo(meta.vocab_size, meta.context_length, meta.hidden_size, meta.num_layers)
        self.aux_layers = tuple(meta.aux_layers)
        self._names = meta.past_names
        self._kv: np.ndarray | None = None
        self._len = 0
        self._pad = np.zeros((1, meta.head_dim), np.float32)  # the one row passed while the cache is empty
        self._tree: tuple[int, int] | None = None  # (start, nodes) after forward_tree, until keep

    @property
    def length(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        return 0 if self._kv is None else self._kv.shape[3]

    def _allocate(self, capacity: int) -> None:
        m = self.meta
        old, n = self._kv, self._len
        self._kv = np.zeros((m.num_layers, 2, m.num_kv_heads, capacity, m.head_dim), self.kv_dtype)
        if old is not None and n:
            self._kv[:, :, :, :n] = old[:, :, :, :n]

    def reset(self, capacity: int) -> None:
        capacity = max(1, min(int(capacity), self.info.context_length))
        self._len = 0
        self._tree = None
        if self.capacity < capacity:
            self._kv = None
            self._allocate(capacity)

    def forward(self, tokens: Sequence[int], *, all_logits: bool = True) -> StepOutput:
        T = len(tokens)
        if T == 0:
            raise ValueError("forward needs at least one token")
        start = self._len
        positions = np.arange(start, start + T, dtype=np.int64)
        out_index = np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], dtype=np.int64)
        out = self._run(tokens, positions, np.tri(T, dtype=bool), out_index)
        self._tree = None
        return out

    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int], *, real: int | None = None) -> StepOutput:
        """``real``: only the first ``real`` nodes are the caller's (a runtime's padding follows them;
        it may reach past the model's context limit, into the buffer's spare rows)."""
        T = len(tokens)
        if T == 0 or len(parents) != T:
            raise ValueError("forward_tree needs as many parents as tokens (>= 1)")
        anc = np.zeros((T, T), dtype=bool)
        depth = np.zeros(T, dtype=np.int64)
        for i, p in enumerate(parents):
            if not (p == -1 if i == 0 else 0 <= p < i):
                raise ValueError(f"bad tree: node {i} has parent {p} (the first node's must be -1, others' earlier nodes)")
            if p >= 0:
                anc[i] = anc[p]
                depth[i] = depth[p] + 1
            anc[i, i] = True
        start = self._len
        out = self._run(tokens, start + depth, anc, np.arange(T, dtype=np.int64), real=real)
        self._tree = (start, T)
        return out

    def keep(self, indices: Sequence[int]) -> None:
        start, idx = kept_path(self._tree, indices)
        src = np.asarray(idx) + start
        self._kv[:, :, :, start : start + len(idx)] = self._kv[:, :, :, src]  # a few rows
        self._len = start + len(idx)
        self._tree = None

    def _run(self, tokens: Sequence[int], positions: np.ndarray, block_mask: np.ndarray, out_index: np.ndarray,
             real: int | None = None) -> StepOutput:
        """``real``: the first ``real`` tokens are the caller's, the rest a runtime's padding, which
        may reach past the context limit (into spare rows of the buffer: see ``_grown``)."""
        T = len(tokens)
        start, end = self._len, self._len + T
        n = T if real is None else real
        if int(positions[:n].max()) + 1 > self.info.context_length or start + n > self.info.context_length:
            raise SpecrunError(f"sequence of {end} tokens exceeds the model's context limit of {self.info.context_length}")
        if end > self.capacity:  # grow (rare: the loop reserves enough up front)
            self._allocate(self._grown(end))
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.min() < 0 or ids.max() >= self.info.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.info.vocab_size - 1}")
        logits, new_kv, hidden = self._execute(ids, positions, block_mask, out_index, start)
        self._kv[:, :, :, start:end] = new_kv
        self._len = end
        return StepOutput(logits, hidden)

    def _grown(self, end: int) -> int:
        """The capacity to grow to when a block ending at ``end`` does not fit."""
        return min(max(end, 2 * self.capacity, 256), self.info.context_length)

    def _execute(self, ids, positions, block_mask, out_index, start: int):
        """Run the graph on the block with rows ``0..start-1`` of the cache as past; return
        (logits [N, V], new_kv [L, 2, kv_heads, T, D], hidden states [T, n*H] or None)."""
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot roll back to {length}: cache holds {self._len} tokens")
        self._len = length  # rows past length are stale; the next forward overwrites them
        self._tree = None

    def close(self) -> None:
        self._kv = None
