"""ONNX Runtime backend (CPU).  Runs the graph ``export.py`` writes, with the KV cache in
preallocated numpy buffers bound zero-copy through IO binding.

Nothing here imports torch or onnxruntime at module import: onnxruntime is imported when the
backend is checked or used, torch only when a model has to be exported (once per model)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specrun.errors import SpecrunError
from specrun.interfaces import Availability, Backend, ModelInfo, StepOutput, Target
from specrun.models import ModelConfig

from . import export as ex

INSTALL_HINT = "pip install 'specrun[onnx]'"


def _import_ort():
    """onnxruntime, or a SpecrunError saying why it cannot be used."""
    try:
        import onnxruntime
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        raise SpecrunError(f"onnxruntime cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return onnxruntime


def _fast_binder(io):
    """``bind(name, shape, address)`` for float32 CPU inputs.  A step binds 2 * layers * kv_heads
    past inputs (180 for SmolLM2); the C-level binding skips the Python wrapper's per-call device
    lookup (about 0.5 -> 0.2 ms per step).  Falls back to the public API if that ever changes."""
    import onnxruntime as ort

    def public(name, shape, addr):
        io.bind_input(name, "cpu", 0, np.float32, shape, addr)

    try:
        raw = io._iobinding
        device = ort.OrtDevice.make("cpu", 0)._get_c_device()

        def fast(name, shape, addr):
            raw.bind_input(name, device, np.float32, shape, addr)

        return fast
    except Exception:  # noqa: BLE001 - any change in the private API: use the public one
        return public


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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

    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> StepOutput:
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
        out = self._run(tokens, start + depth, anc, np.arange(T, dtype=np.int64))
        self._tree = (start, T)
        return out

    def keep(self, indices: Sequence[int]) -> None:
        start, idx = self.kept_path(self._tree, indices)
        src = np.asarray(idx) + start
        self._kv[:, :, :, start : start + len(idx)] = self._kv[:, :, :, src]  # a few rows
        self._len = start + len(idx)
        self._tree = None

    def _run(self, tokens: Sequence[int], positions: np.ndarray, block_mask: np.ndarray, out_index: np.ndarray) -> StepOutput:
        T = len(tokens)
        start, end = self._len, self._len + T
        if int(positions.max()) + 1 > self.info.context_length or end > self.info.context_length:
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


class OnnxTarget(KVBufferTarget):
    """ONNX Runtime: the past rows are bound by pointer through IO binding."""

    def __init__(self, session, meta: ex.GraphMeta, precision: str, path: Path):
        self._addrs: list[int] = []
        super().__init__(meta, "onnx_cpu", "cpu", precision, path)
        self.session = session
        self._io = session.io_binding()
        self._bind = _fast_binder(self._io)
        self.bind_capacity = False  # benchmarks only: bind the whole buffer instead of the used rows

    def _allocate(self, capacity: int) -> None:
        super()._allocate(capacity)
        stride = capacity * self.meta.head_dim * 4
        base = self._kv.ctypes.data
        self._addrs = [base + i * stride for i in range(len(self._names))]

    def _execute(self, ids, positions, block_mask, out_index, start: int):
        m, io, T = self.meta, self._io, len(ids)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("positions", positions)
        io.bind_cpu_input("block_mask", block_mask)
        io.bind_cpu_input("output_index", out_index)
        f32, bind = np.float32, self._bind
        if start or self.bind_capacity:  # rows 0..start-1 of each (layer, k/v, head) slice, in place
            shape = [self.capacity if self.bind_capacity else start, m.head_dim]
            for name, addr in zip(self._names, self._addrs, strict=True):
                bind(name, shape, addr)
        else:  # empty cache: one padding row, masked out by the graph
            pad = self._pad.ctypes.data
            for name in self._names:
                bind(name, [1, m.head_dim], pad)
        new_kv = np.empty((m.num_layers, 2, m.num_kv_heads, T, m.head_dim), f32)
        logits = np.empty((len(out_index), m.vocab_size), f32)
        io.bind_output("new_kv", "cpu", 0, f32, list(new_kv.shape), new_kv.ctypes.data)
        io.bind_output("logits", "cpu", 0, f32, list(logits.shape), logits.ctypes.data)
        hidden = None
        if self.aux_layers:
            hidden = np.empty((T, len(self.aux_layers) * m.hidden_size), f32)
            io.bind_output("hidden_states", "cpu", 0, f32, list(hidden.shape), hidden.ctypes.data)
        self.session.run_with_iobinding(io)
        return logits, new_kv, hidden

    def close(self) -> None:
        super().close()
        self._addrs = []
        self._io = None
        self.session = None


class OnnxBackend(Backend):
    name = "onnx_cpu"
    description = "ONNX Runtime on CPU, running an ONNX export of the PyTorch model definition (cached)"

    def availability(self) -> Availability:
        try:
            _import_ort()
        except SpecrunError as exc:
            return Availability(False, str(exc), INSTALL_HINT)
        return Availability(True)

    def devices(self) -> list[str]:
        return ["cpu"]

    def precisions(self, device: str) -> list[str]:
        return list(ex.PRECISIONS)

    def capabilities(self) -> set[str]:
        return {"hidden_states", "tree_attention", "eagle3", "weights:f32", "weights:int8"}

    def export(
        self, model_dir: str, *, precision: str | None = None, aux_hidden_layers: Sequence[int] = (),
        force: bool = False, progress: bool = True,
    ) -> Path:
        """Export (or find) the cached ONNX graph ahead of time; returns its path."""
        precision = self.check_precision("cpu", precision)
        aux = check_aux_layers(model_dir, aux_hidden_layers)
        return ex.export_model(model_dir, aux, precision, force=force, progress=progress)

    def load_target(self, model_dir, *, device, precision=None, aux_hidden_layers=(), options=None) -> Target:
        device = self.check_device(device)
        precision = self.check_precision(device, precision)
        aux = check_aux_layers(model_dir, aux_hidden_layers)
        session, path = _open(lambda force: ex.export_model(model_dir, aux, precision, force=force), options)
        return OnnxTarget(session, ex.GraphMeta.load(path.parent), precision, path)

    def load_eagle3_head(self, checkpoint_dir, target_dir, *, device, precision=None, options=None):
        """The head exported to ONNX (once, cached) and run by onnxruntime.  Default ``int8``
        (block-wise 8-bit weights): a draft step of a head for the default model costs ~0.45 ms
        instead of ~1.5-1.9 ms in f32 (measured here), and a head's precision changes only how often drafts are accepted,
        never the output (verification is exact)."""
        from . import head as hd

        device = self.check_device(device)
        precision = precision or "int8"
        if precision not in hd.HEAD_PRECISIONS:
            raise SpecrunError(f"backend 'onnx_cpu' runs EAGLE-3 heads in {' or '.join(hd.HEAD_PRECISIONS)}; got precision '{precision}'")
        ck = hd.load_head_checkpoint(checkpoint_dir, target_dir)
        # one thread, no spinning workers: the head runs between target calls, while the target's
        # session's workers still spin; a 2-thread spinning head on 2 cores made each target call
        # of a decode ~2x slower (72.6 vs 37.8 ms measured here); one thread: 0.43 ms a step (two: 0.44)
        head_options = dict(options or {}) | {"threads": int((options or {}).get("head_threads") or 1), "spin": False}
        session, path = _open(lambda force: hd.export_head(ck, checkpoint_dir, precision, force=force), head_options)
        return hd.OnnxDraftHead(session, ck, hd.head_meta(path), path, precision)


def check_aux_layers(model_dir, aux_hidden_layers: Sequence[int]) -> tuple[int, ...]:
    """Validated aux hidden layers (distinct, ascending, in range) of the model in ``model_dir``."""
    aux = tuple(int(a) for a in aux_hidden_layers)
    n = ModelConfig.load(model_dir).num_layers
    bad = [a for a in aux if not 0 <= a < n]
    if bad:
        raise SpecrunError(f"aux hidden layer {bad[0]} out of range: the model has {n} layers (0..{n - 1})")
    if len(set(aux)) != len(aux) or list(aux) != sorted(aux):
        raise SpecrunError(f"aux hidden layers must be distinct and ascending, got {list(aux)}")
    return aux


def _open(build, options: dict | None):
    """(session, path) for the cached graph ``build(force)`` returns; a graph that onnxruntime
    cannot load despite its completeness marker is rebuilt once (``build(True)``)."""
    ort = _import_ort()
    options = dict(options or {})
    threads = int(options.get("threads") or default_threads())
    if threads < 1:
        raise SpecrunError(f"threads must be >= 1, got {threads}")
    path = build(False)
    try:
        return _session(ort, path, threads, options), path
    except Exception:  # corrupt or unreadable despite the marker: rebuild once
        ex.invalidate(path.parent)
        path = build(True)
        try:
            return _session(ort, path, threads, options), path
        except Exception as exc:
            raise SpecrunError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


def _session(ort, path: Path, threads: int, options: dict):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    if not options.get("spin", True):  # spinning workers: lower latency, but burn CPU between calls
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
