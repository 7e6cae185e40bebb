"""The backend (what specrun asks a plugin for) and the target (one loaded model with its KV cache)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from specrun.errors import SpecrunError
from specrun.interfaces import Availability, Backend, ModelInfo, StepOutput, Target

from .model import LlamaNumpy


class NumpyTarget(Target):
    def __init__(self, model: LlamaNumpy, aux_layers: Sequence[int]):
        c = model.cfg
        self.model, self.aux_layers = model, tuple(aux_layers)
        self.backend, self.device, self.precision = "numpy_ref", "cpu", "f32"
        self.info = ModelInfo(c.vocab_size, c.context_length, c.hidden_size, c.num_layers)
        self._k = self._v = self._new_cache(0)
        self._len = 0  # tokens in the cache; slots beyond it are stale and get overwritten

    def _new_cache(self, capacity: int) -> np.ndarray:
        c = self.model.cfg
        return np.zeros((c.num_layers, c.num_kv_heads, capacity, c.head_dim), np.float32)

    @property
    def length(self) -> int:
        return self._len

    def reset(self, capacity: int) -> None:
        if self._k.shape[2] < capacity:  # preallocate once; a smaller request reuses the buffers
            self._k, self._v = self._new_cache(capacity), self._new_cache(capacity)
        self._len = 0

    def forward(self, tokens: Sequence[int], *, all_logits: bool = True) -> StepOutput:
        if len(tokens) == 0:
            raise ValueError("forward needs at least one token")
        if min(tokens) < 0 or max(tokens) >= self.info.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.info.vocab_size})")
        end = self._len + len(tokens)
        if end > self.info.context_length:
            raise SpecrunError(f"sequence of {end} tokens exceeds the model's context limit of {self.info.context_length}")
        if end > self._k.shape[2]:  # grow (rare: the decoding loop reserves enough with reset)
            k, v = self._new_cache(max(end, 2 * self._k.shape[2])), self._new_cache(max(end, 2 * self._k.shape[2]))
            k[:, :, : self._len], v[:, :, : self._len] = self._k[:, :, : self._len], self._v[:, :, : self._len]
            self._k, self._v = k, v
        logits, hidden = self.model.forward(tokens, self._len, self._k, self._v, self.aux_layers, last_only=not all_logits)
        self._len = end
        return StepOutput(logits, hidden)

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self._len} tokens")
        self._len = length  # O(1): nothing is copied or cleared


class NumpyBackend(Backend):
    name = "numpy_ref"
    description = "Example out-of-tree backend: the Llama family in plain NumPy (CPU, float32)"

    def availability(self) -> Availability:
        return Availability(True)  # nothing optional to probe: numpy and safetensors are dependencies

    def devices(self) -> list[str]:
        return ["cpu"]

    def precisions(self, device: str) -> list[str]:
        return ["f32"]

    def versions(self) -> dict[str, str]:
        return {"numpy": np.__version__}

    def capabilities(self) -> set[str]:
        return {"hidden_states"}

    def build_target(self, model_dir, *, device, precision, aux_hidden_layers, options) -> Target:
        # Backend.load_target has already checked the device, the precision and the layers
        return NumpyTarget(LlamaNumpy(model_dir), aux_hidden_layers)
