"""The PyTorch Target: the Llama-family model with a preallocated KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specrun.errors import SpecrunError
from specrun.interfaces import ModelInfo, StepOutput, Target
from specrun_kit import kvbuffer
from specrun_kit.llama import LlamaModel, tree_mask

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class TorchTarget(Target):
    def __init__(self, model: LlamaModel, device: str, precision: str, aux_layers: Sequence[int]):
        s = model.spec
        self.model = model
        self.backend, self.device, self.precision = "torch_cuda", device, precision
        self.info = ModelInfo(s.vocab_size, s.context_length, s.hidden_size, s.num_layers)
        self.aux_layers = tuple(aux_layers)
        self._dtype = DTYPES[precision]
        self._k = self._v = None
        self._len = 0
        self._tree: tuple[int, int] | None = None

    @property
    def length(self) -> int:
        return self._len

    def reset(self, capacity: int) -> None:
        if self._k is None or self._k.shape[3] < capacity:
            self._k, self._v = self.model.new_cache(capacity, self.device, self._dtype)
        self._len = 0

    def _ensure(self, needed: int) -> None:
        if self._k is None:
            self.reset(max(needed, 256))
        elif self._k.shape[3] < needed:  # grow (rare: the loop reserves enough up front)
            k, v = self.model.new_cache(max(needed, 2 * self._k.shape[3]), self.device, self._dtype)
            k[:, :, :, : self._len] = self._k[:, :, :, : self._len]
            v[:, :, :, : self._len] = self._v[:, :, :, : self._len]
            self._k, self._v = k, v

    def forward(self, tokens: Sequence[int], *, all_logits: bool = True) -> StepOutput:
        if len(tokens) == 0:
            raise ValueError("forward needs at least one token")
        end = self._len + len(tokens)
        if end > self.info.context_length:
            raise SpecrunError(f"sequence of {end} tokens exceeds the model's context limit of {self.info.context_length}")
        self._ensure(end)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits, hidden = self.model(ids, self._len, self._k, self._v, self.aux_layers, last_only=not all_logits)
        self._len = end
        return StepOutput(
            logits.float().cpu().numpy(),
            None if hidden is None else hidden.float().cpu().numpy(),
        )

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot roll back to {length}: cache holds {self._len} tokens")
        self._len = length  # stale entries beyond length are overwritten by the next forward
        self._tree = None

    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> StepOutput:
        T = len(tokens)
        if T == 0 or len(parents) != T:
            raise ValueError("forward_tree needs as many parents as tokens (>= 1)")
        depth: list[int] = []
        for i, p in enumerate(parents):
            if not (p == -1 if i == 0 else 0 <= p < i):
                raise ValueError(f"bad tree: node {i} has parent {p} (the first node's must be -1, others' earlier nodes)")
            depth.append(0 if p < 0 else depth[p] + 1)
        start = self._len
        end = start + T
        if end > self.info.context_length:
            raise SpecrunError(f"a token tree of {T} nodes after {start} tokens exceeds the context limit of {self.info.context_length}")
        self._ensure(end)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        pos = torch.tensor(depth, dtype=torch.long, device=self.device) + start
        mask = tree_mask(pos, list(parents), start, self.model.spec.sliding_window)
        with torch.inference_mode():
            logits, hidden = self.model(ids, start, self._k, self._v, self.aux_layers, positions=pos, mask=mask)
        self._len = end
        self._tree = (start, T)
        return StepOutput(logits.float().cpu().numpy(), None if hidden is None else hidden.float().cpu().numpy())

    def keep(self, indices: Sequence[int]) -> None:
        start, idx = kvbuffer.kept_path(self._tree, indices)
        src = torch.tensor(idx, dtype=torch.long, device=self.device) + start
        self._k[:, :, :, start : start + len(idx)] = self._k[:, :, :, src]
        self._v[:, :, :, start : start + len(idx)] = self._v[:, :, :, src]
        self._len = start + len(idx)
        self._tree = None
