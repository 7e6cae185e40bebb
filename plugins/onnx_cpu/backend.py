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
from specrun.interfaces import Availability, Backend, Target, check_aux_layers
from specrun_kit import export as ex
from specrun_kit.kvbuffer import KVBufferTarget

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


class OnnxTarget(KVBufferTarget):
    """ONNX Runtime: the past rows are bound by pointer through IO binding."""

    def __init__(self, session, meta: ex.GraphMeta, precision: str, path: Path):
        self._addrs: list[int] = []
        super().__init__(meta, "onnx_cpu", "cpu", precision, path)
        # ONNX Runtime's int8 MatMulNBits kernels round a row by the block it is in (measured on the
        # default model: logits of a block of 2-8 rows differ from single steps by up to 0.67, also
        # when every call is padded to one row count; its f32/bf16/fp16-compute levels still differ
        # by 3e-5 and run ~20x slower), so int8 speculation cannot be exact on this runtime
        self.exact_blocks = False if precision == "int8" else None
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

    def preference(self, device: str):
        """f32 only: its int8 blocks are not batch-invariant (speculative output differs from plain at
        int8), so int8, though its fastest plain path, is never picked automatically."""
        return (30, "f32") if device == "cpu" else None

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

    def build_target(self, model_dir, *, device, precision, aux_hidden_layers, options) -> Target:
        aux = aux_hidden_layers
        session, path = _open(lambda force: ex.export_model(model_dir, aux, precision, force=force), options)
        return OnnxTarget(session, ex.GraphMeta.load(path.parent), precision, path)

    def load_eagle3_head(self, checkpoint_dir, target_dir, *, device, precision=None, options=None):
        """The head exported to ONNX (once, cached) and run by onnxruntime.  Default ``int8``
        (block-wise 8-bit weights): a draft step of a head for the default model costs ~0.45 ms
        instead of ~1.5-1.9 ms in f32 (measured here), and a head's precision changes only how often drafts are accepted,
        never the output (verification is exact)."""
        from specrun_kit import head as hd

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
