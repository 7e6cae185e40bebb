"""OpenVINO backend: CPU, Intel GPU and NPU.

Models come from the onnx_cpu plugin's ONNX export of the one PyTorch model definition (same
graph contract: a block of tokens on top of read-only KV inputs, ``new_kv`` out; with the
``layer`` KV layout — one ``[kv_heads, rows, D]`` input per layer and k/v — because OpenVINO pays
per graph node and per input on every call), are converted once to OpenVINO IR — with nncf weight
compression for ``int8`` / ``int4`` — and cached on disk, content-keyed and published atomically
like the ONNX export.

Precision is explicit: OpenVINO's CPU plugin computes in bf16 by default on CPUs with
avx512_bf16, which moves logits by more than 1 against fp32.  ``f32`` / ``bf16`` / ``f16`` set
``INFERENCE_PRECISION_HINT``; ``int8`` / ``int4`` are compressed weights computed at the device's
fastest precision (see ``_compute``).  Whatever ran is what ``Target.precision`` reports (and
``compute_precision`` the activation type).

Greedy speculative decoding is exact at every precision because the graph is batch-invariant:
a token's logits are bit-identical whether it runs alone or anywhere in a block (the block's
keys are written into their cache rows inside the graph, so every query attends to one sequence
in cache order), and every call after the prefill runs in one class of shapes: graphs compiled
for static row counts (1, 5 and 8 rows, blocks padded up to them), which also skip the
dynamic graph's per-call shape work, or the padding the load-time probe finds exact on this
machine (``LADDERS``).  ``tests/test_openvino.py`` checks it bit for bit."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specrun import store
from specrun.errors import SpecrunError
from specrun.interfaces import Availability, Backend, StepOutput, Target, check_aux_layers
from specrun.store import cache_dir
from specrun_kit.head import KVBufferHead
from specrun_kit.kvbuffer import KVBufferTarget
from specrun_kit.probe import blocks_match_steps, probe_path, remembered

INSTALL_HINT = "pip install 'specrun[openvino]'"
IR_VERSION = "4"  # 4: the hidden-state barrier stays float
ROWS = 64  # the cache buffer grows in steps of this many positions
COMPUTE = ("f32", "bf16", "f16")
WEIGHTS = ("int8", "int4")
INT4_GROUP = 64  # divides SmolLM2's 576-wide layers (nncf's default 128 does not)
_OV_NAMES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "auto": "AUTO"}
_HINT = {"f32": "f32", "bf16": "bf16", "f16": "f16"}


def _import_ov():
    try:
        import openvino
    except Exception as exc:
        raise SpecrunError(f"openvino cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return openvino


def _onnx_export():
    """The graph kit's ONNX exporter (it needs torch and onnx, not onnxruntime)."""
    try:
        from specrun_kit import export
    except Exception as exc:
        raise SpecrunError(f"the openvino backend builds on the graph kit's ONNX export (specrun_kit.export), which failed to import: {exc}") from None
    return export


def ov_device(device: str) -> str:
    """specrun device name (cpu, gpu, gpu.1, npu, auto) -> OpenVINO's (CPU, GPU, GPU.1, NPU, AUTO)."""
    base, _, index = device.lower().partition(".")
    if base not in _OV_NAMES:
        raise SpecrunError(f"unknown OpenVINO device '{device}'; known: {', '.join(_OV_NAMES)}")
    return _OV_NAMES[base] + (f".{index}" if index else "")


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even as OpenVINO's CPU conversion does
    (a block's keys are rounded by OpenVINO inside the graph and by this for the cache: the same
    bits, or blocks would stop matching single steps)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class OpenVinoTarget(KVBufferTarget):
    """The onnx_cpu plugin's cache scheme (one buffer ``[L, 2, kv_heads, rows, D]``, rollback
    moves ``length``) over the ``layer`` KV layout: each (layer, k/v) input is the whole
    ``[kv_heads, rows, D]`` slice of the buffer — contiguous, shared with OpenVINO without a copy
    — and the graph masks rows at or after the block's first position.  The buffer holds the
    used positions rounded up to ``ROWS`` (it grows by copying, once per ``ROWS`` tokens), so the
    masked tail costs little attention and input shapes repeat between steps."""

    def __init__(self, compiled, meta, precision: str, compute: str, device: str, path: Path, bf16_cache: bool = False,
                 compile_static=None):
        super().__init__(meta, "openvino", device, precision, path)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.compute_precision = compute
        # bf16 compute: the cache holds bf16 bits (numpy uint16), what attention reads, so no call
        # converts the whole cache from f32 (0.9 ms of a 14 ms int8 step at 100 tokens); the graph's
        # new_kv output stays f32 and _execute rounds the block's rows
        self.kv_dtype = np.uint16 if bf16_cache else np.float32
        # graph (0: the dynamic one, else the static one's rows) -> the buffer whose slices are set as its cache inputs
        self._bound: dict[int, np.ndarray] = {}
        # rows -> the graph compiled with a static block of that many rows (built on first use)
        self._compile_static = compile_static
        self._static: dict[int, object] = {}
        # the calls after the prefill (see _make_batch_invariant): with a ladder, each runs as chunks of
        # at most ladder[-1] rows, each padded to the smallest row count of the ladder that holds it,
        # on the graph compiled for that row count (static) or on the dynamic one; the loop drafts at
        # most ladder[-1] - 1.  Empty: any row count, the dynamic graph.
        self.ladder: tuple[int, ...] = ()
        self.static = False

    @property
    def block_rows(self) -> int | None:
        return self.ladder[-1] if self.ladder else None

    def _rows(self, n: int) -> int:
        """The row count a call of ``n`` tokens runs as: the ladder's smallest that holds it; beyond the
        ladder (a token tree passed to ``forward_tree`` directly: the loop keeps trees within
        ``block_rows``) the next multiple of the top, on static graphs the probe did not check."""
        top = self.ladder[-1]
        return next(r for r in self.ladder if r >= n) if n <= top else -(-n // top) * top

    def forward(self, tokens, *, all_logits: bool = True):
        T = len(tokens)
        if not self.ladder or T == 0 or self._len == 0:  # a prefill: plain and speculative run the same one
            return super().forward(tokens, all_logits=all_logits)
        # one class of block shapes for every call after the prefill: runtimes pick their kernels by
        # the number of rows (and a graph compiled for a static row count skips the per-call shape
        # work of the dynamic one: ~25% of a step), so a token's logits must not depend on the block
        # it is verified in.  Blocks run as chunks of at most ladder[-1] rows, each padded to a row
        # count of the ladder (after its real rows: causal, the padding changes nothing and is
        # dropped), each chunk on the cache the previous one wrote
        R = self.ladder[-1]
        logits, hidden = [], []
        for c in range(0, T, R):
            chunk = list(tokens[c : c + R])
            n, start = len(chunk), self._len
            rows = self._rows(n)
            out = self._run(chunk + [chunk[-1]] * (rows - n), np.arange(start, start + rows, dtype=np.int64),
                            np.tri(rows, dtype=bool), np.arange(rows, dtype=np.int64), real=n)  # the lm_head on them too
            self._len = start + n
            logits.append(out.logits[:n])
            if out.hidden_states is not None:
                hidden.append(out.hidden_states[:n])
        self._tree = None
        all_rows = np.concatenate(logits)
        return StepOutput(all_rows if all_logits else all_rows[-1:], np.concatenate(hidden) if hidden else None)

    def forward_tree(self, tokens, parents):
        T = len(tokens)
        if not self.ladder or T == 0 or (T > self.ladder[-1] and not self.static) or len(parents) != T or self._rows(T) == T:
            return super().forward_tree(tokens, parents)
        R = self._rows(T)  # padded as forward is: a chain of copies of the last node, after the real nodes
        out = super().forward_tree(list(tokens) + [int(tokens[-1])] * (R - T), list(parents) + list(range(T - 1, R - 1)),
                                   real=T)
        self._len = self._tree[0] + T
        self._tree = (self._tree[0], T)
        hidden = None if out.hidden_states is None else out.hidden_states[:T]
        return type(out)(out.logits[:T], hidden)

    def reset(self, capacity: int) -> None:
        self._len = 0
        self._tree = None
        if self._kv is None or self.capacity > ROWS:  # start small again: rows are attended
            self._kv = None
            self._allocate(ROWS)

    def _grown(self, end: int) -> int:
        # padding rows after a block's real rows may reach past the context limit (spare rows)
        return min(-(-end // ROWS) * ROWS, self.info.context_length + (self.ladder[-1] if self.ladder else 0))

    def prepare(self, max_rows: int) -> None:
        """Compile the static graphs of the row counts that calls of up to ``max_rows`` tokens use
        (~1.2 s and ~400 MB each for the default model on 2 cores, once per process: before the loop
        times anything)."""
        if self.static and self.ladder:
            for rows in self.ladder:  # the loop drafts within block_rows (= the top of the ladder)
                self._static_request(rows)
                if rows >= max_rows:
                    break

    def _static_request(self, rows: int):
        req = self._static.get(rows)
        if req is None:
            req = self._static[rows] = self._compile_static(rows).create_infer_request()
            self._bound.pop(rows, None)  # a new request: nothing bound yet
        return req

    def _execute(self, ids, positions, block_mask, out_index, start: int):
        feed = {"input_ids": ids, "positions": positions, "block_mask": block_mask, "output_index": out_index}
        kv, req, graph = self._kv, self.request, 0
        T = len(ids)
        if self.static and start > 0 and len(out_index) == T and self._rows(T) == T:
            req, graph = self._static_request(T), T
        if self._bound.get(graph) is not kv:  # bind each (layer, k/v) slice of a new buffer once, by reference
            ov = _import_ov()
            kind = ov.Type.bf16 if self.kv_dtype == np.uint16 else ov.Type.f32
            names = iter(self._names)
            for layer in range(self.meta.num_layers):
                for k in range(2):
                    req.set_tensor(next(names), ov.Tensor(kv[layer, k], kv[layer, k].shape, kind))
            self._bound[graph] = kv
        req.infer(feed, share_inputs=True, share_outputs=True)
        out = req.get_tensor("new_kv").data
        new_kv = to_bf16_bits(out) if self.kv_dtype == np.uint16 else np.array(out)
        logits = np.array(req.get_tensor("logits").data, dtype=np.float32)
        hidden = np.array(req.get_tensor("hidden_states").data, dtype=np.float32) if self.aux_layers else None
        return logits, new_kv, hidden

    def close(self) -> None:
        super().close()
        self.request = None
        self.compiled = None
        self._static = {}
        self._bound = {}


class OpenVinoDraftHead(KVBufferHead):
    """An EAGLE-3 head compiled by OpenVINO (the cache scheme of the onnx_cpu plugin's head)."""

    def __init__(self, compiled, ck, meta, precision: str, device: str, path: Path):
        super().__init__(ck, meta, "openvino", device, precision, path)
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def _execute(self, feed):
        req = self.request
        req.infer(feed, share_inputs=True)
        return tuple(np.array(req.get_tensor(n).data, dtype=np.float32) for n in ("logits", "out", "new_k", "new_v"))

    def close(self) -> None:
        super().close()
        self.request = self.compiled = None


class OpenVinoBackend(Backend):
    name = "openvino"
    description = "OpenVINO on CPU, Intel GPU and NPU (IR converted once from the ONNX export)"

    def availability(self) -> Availability:
        try:
            _import_ov()
        except SpecrunError as exc:
            return Availability(False, str(exc), INSTALL_HINT)
        return Availability(True)

    def _core(self):
        if not hasattr(self, "_ov_core"):
            self._ov_core = _import_ov().Core()
        return self._ov_core

    def devices(self) -> list[str]:
        present = [d.lower() for d in self._core().available_devices]
        return [*present, "auto"]

    def known_devices(self) -> list[str]:
        return list(_OV_NAMES)

    def check_device(self, device: str) -> str:
        dev = device.lower()
        if dev.partition(".")[0] not in _OV_NAMES:
            raise SpecrunError(
                f"unknown device '{device}' for backend 'openvino'; known: {', '.join(_OV_NAMES)} (present: {', '.join(self.devices())})"
            )
        if dev not in self.devices() and not (dev.partition(".")[0] == "gpu" and "gpu" in [d.partition(".")[0] for d in self.devices()]):
            raise SpecrunError(f"device '{device}' is not present for backend 'openvino'; present: {', '.join(self.devices())}")
        return dev

    def _fastest_compute(self, device: str) -> str:
        if device == "auto" and [d for d in self.devices() if d != "auto"] == ["cpu"]:
            device = "cpu"  # AUTO can only pick the CPU here
        if device == "cpu":
            caps = self._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            return "bf16" if "BF16" in caps else "f32"
        return "f16"  # GPU / NPU / AUTO

    def precisions(self, device: str) -> list[str]:
        fastest = self._fastest_compute(device.lower().partition(".")[0])
        rest = [p for p in COMPUTE if p != fastest]
        if fastest != "f16" and device.lower().partition(".")[0] in ("cpu", "auto"):
            rest = [p for p in rest if p not in ("f16", "bf16")]  # bf16 only where the CPU computes it
        return [fastest, *rest, *WEIGHTS]

    def capabilities(self) -> set[str]:
        return {"hidden_states", "tree_attention", "eagle3", "weights:f32", "weights:int8", "weights:int4"}

    def conformance_requirements(self):
        """This backend's tolerance overrides and expected failures for the conformance suite."""
        return Path(__file__).with_name("conformance.toml")

    def preference(self, device: str):
        """On a CPU: int8 weights, the fastest exact configuration that passes the conformance kit
        (``specrun bench``, all 80 MT-bench questions, 256 tokens, 2026-12-07, Intel Xeon with
        AVX-512 VNNI, static graphs: plain 70.2 tokens/s, ngram 99.1, 80/80 identical; llama_cpp
        int4, preferred above this, 95.8 / 93.4).  int4 (nncf) is faster but its logits leave the
        f32 reference by up to 12 on the default model (conformance C01/C02/C05 fail at the kit's
        tolerances) and its answers loop (0.37 distinct 4-grams on 8 MT-bench questions against
        0.6-0.7), so it is never chosen for the user; elsewhere its default precision."""
        dev = device.lower().partition(".")[0]
        if dev == "cpu":
            return (50, "int8") if "int8" in self.precisions("cpu") else (40, self.precisions("cpu")[0])
        return (60, self.precisions(device)[0]) if dev in ("gpu", "npu") else None

    def versions(self) -> dict[str, str]:
        return {"openvino": _import_ov().__version__}

    def ir_path(self, model_dir: str, precision: str, aux: tuple[int, ...], progress: bool = False,
                force: bool = False) -> Path:
        """The cached IR for this model/weight format, converting (and compressing) it first if needed;
        ``force`` rebuilds the ONNX export and the IR."""
        ex = _onnx_export()
        ov = _import_ov()
        onnx_path = ex.export_model(model_dir, aux, "f32", progress=progress, kv_layout="layer", force=force)
        weights = precision if precision in WEIGHTS else "f32"
        folder = cache_dir() / "openvino" / f"{onnx_path.parent.name}-{weights}-ir{IR_VERSION}-ov{ov.__version__.split('-')[0]}"

        def build(tmp: Path) -> None:
            model = self._core().read_model(str(onnx_path))
            if weights != "f32":
                model = _compress(model, weights)
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            (tmp / "graph.json").write_text((onnx_path.parent / "graph.json").read_text())

        return _cached(folder, "model.xml", build, force=force)

    def export(self, model_dir: str, *, precision: str | None = None, aux_hidden_layers: Sequence[int] = (),
               force: bool = False, progress: bool = True) -> Path:
        precision = self.check_precision("cpu", precision)
        return self.ir_path(model_dir, precision, check_aux_layers(model_dir, aux_hidden_layers), progress=progress,
                            force=force)

    def build_target(self, model_dir, *, device, precision, aux_hidden_layers, options) -> Target:
        aux = aux_hidden_layers
        ex = _onnx_export()
        compute = self._compute(device, precision)
        xml = self.ir_path(model_dir, precision, aux)
        options = dict(options or {})
        config = {"INFERENCE_PRECISION_HINT": _HINT[compute], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if options.get("threads") and device.startswith("cpu"):
            config["INFERENCE_NUM_THREADS"] = int(options["threads"])
        core = self._core()
        bf16_cache = compute == "bf16" and device.startswith("cpu")  # other plugins may not take bf16 tensors

        def read_ir(xml: Path):
            meta = ex.GraphMeta(**json.loads((xml.parent / "graph.json").read_text()))
            if not bf16_cache:
                return core.read_model(str(xml)), meta
            ov = _import_ov()
            ppp = ov.preprocess.PrePostProcessor(core.read_model(str(xml)))
            for name in meta.past_names:  # the cache goes in as bf16, as attention reads it
                ppp.input(name).tensor().set_element_type(ov.Type.bf16)
            # new_kv stays f32: OpenVINO computes an output's "tail" (here RoPE, whose cos/sin the
            # queries share) in f32; typed bf16 it would round the angles pos x freq to bf16 (keys
            # 24% off at position 1,000).  _execute rounds the block's rows to bf16 itself.
            return ppp.build(), meta

        def compile_ir(xml: Path):
            model, meta = read_ir(xml)
            return core.compile_model(model, ov_device(device), config), meta

        try:
            compiled, meta = compile_ir(xml)
        except (RuntimeError, ValueError, OSError):  # a damaged IR despite its marker: rebuild once
            ex.invalidate(xml.parent)
            xml = self.ir_path(model_dir, precision, aux)
            try:
                compiled, meta = compile_ir(xml)
            except (RuntimeError, ValueError, OSError) as exc:
                raise SpecrunError(f"OpenVINO cannot compile {xml} for {device}: {str(exc).splitlines()[0]}") from None

        def compile_static(rows: int):
            """The graph with a block of exactly ``rows`` tokens (the cache's length stays dynamic)."""
            model, _ = read_ir(xml)
            shapes = {"input_ids": [rows], "positions": [rows], "block_mask": [rows, rows], "output_index": [rows]}
            shapes.update({name: [meta.num_kv_heads, -1, meta.head_dim] for name in meta.past_names})
            model.reshape(shapes)
            return core.compile_model(model, ov_device(device), config)

        target = OpenVinoTarget(compiled, meta, precision, compute, device, xml, bf16_cache=bf16_cache,
                                compile_static=compile_static)
        if precision in WEIGHTS:
            _check_small_blocks(target, device)
        _make_batch_invariant(target)
        return target

    def _compute(self, device: str, precision: str) -> str:
        """The compute precision of ``precision``: itself for f32/bf16/f16; for compressed weights
        the device's fastest (bf16 on CPUs with avx512_bf16: with OpenVINO's dynamic int8
        quantization of activations a step costs 13.7 ms vs 12.5 at f32, but 17.8 vs 23.0 at 1,500
        tokens of context, on the default model here)."""
        if precision in COMPUTE:
            return precision
        return self._fastest_compute(device.partition(".")[0])

    def load_eagle3_head(self, checkpoint_dir, target_dir, *, device, precision=None, options=None):
        """The onnx_cpu plugin's head export compiled by OpenVINO.  Default ``int8`` (nncf 8-bit
        weights, computed in f32 on CPU): the draft-vocabulary projection dominates a draft step
        and reads 4x fewer bytes; a head's precision changes only the acceptance, never the output.
        ``f32`` / ``bf16`` / ``f16`` run the float weights at that compute precision."""
        from specrun_kit import head as hd

        ex = _onnx_export()
        device = self.check_device(device)
        precision = "int8" if precision is None else self.check_precision(device, precision)
        precision = "int8" if precision == "int4" else precision  # 4-bit groups gain nothing on a 1-layer head
        # int8 heads compute in f32 on CPU (measured that way: ~1.1 ms a draft step of the default
        # model's head); the target's bf16 choice is about long contexts, which a head never has
        compute = "f32" if precision in WEIGHTS and device.startswith(("cpu", "auto")) else self._compute(device, precision)
        ck = hd.load_head_checkpoint(checkpoint_dir, target_dir)
        path = hd.export_head(ck, checkpoint_dir)
        config = {"INFERENCE_PRECISION_HINT": _HINT[compute], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        threads = dict(options or {}).get("threads")
        if threads and device.startswith("cpu"):
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = self._core()

        def compile_head(onnx_path: Path):
            if precision not in WEIGHTS:
                return core.compile_model(str(onnx_path), ov_device(device), config)
            ov = _import_ov()
            folder = cache_dir() / "openvino-heads" / f"{onnx_path.parent.name}-int8-ir{IR_VERSION}-ov{ov.__version__.split('-')[0]}"
            xml = _cached(folder, "head.xml", lambda tmp: ov.save_model(
                _compress(core.read_model(str(onnx_path)), "int8"), str(tmp / "head.xml"), compress_to_fp16=False))
            return core.compile_model(str(xml), ov_device(device), config)

        try:
            compiled = compile_head(path)
        except RuntimeError:  # damaged despite the marker: rebuild once
            ex.invalidate(path.parent)
            path = hd.export_head(ck, checkpoint_dir, force=True)
            try:
                compiled = compile_head(path)
            except RuntimeError as exc:
                raise SpecrunError(f"OpenVINO cannot compile {path} for {device}: {str(exc).splitlines()[0]}") from None
        return OpenVinoDraftHead(compiled, ck, hd.head_meta(path), precision, device, path)


def _cached(folder: Path, main_file: str, build, force: bool = False) -> Path:
    """``folder / main_file``, built by ``build(tmp_folder)`` once (``specrun.store.build_once``)."""
    return store.build_once(folder, main_file, build, version=IR_VERSION, force=force)


#: (static, ladder): the shapes of the calls after the prefill, tried in order until a token's
#: logits are the same bits alone and in blocks.  Static: a graph compiled per row count of the
#: ladder (OpenVINO's CPU plugin then skips the per-call shape inference and allocation of its
#: ~1,300 dynamic nodes: a 1-token int8 step of the default model at 300 tokens of context 18.8 ->
#: 13.9 ms, a 5-row block 22.0 -> 16.9, Intel Xeon, 2 threads, 2026-12-07), compiled when the
#: loop first needs it (``prepare``).  Each compiled graph holds its own copy of the repacked
#: weights (~400 MB resident for the default model at int8), so the ladder is short: blocks of
#: 2-5 rows all run as 5 (a 3-row block costs 1.14 steps there, a 5-row one 1.22).  Where kernels
#: change with the row count (seen on an Intel Xeon with AMX: compressed weights in calls of 1 row,
#: of 2-4 and of 5+ rows gave three classes of bits) a ladder within one class is exact.  The
#: dynamic graph is the fallback, unpadded first.
LADDERS = ((True, (1, 5, 8)), (True, (1, 5)), (True, (2, 4)), (True, (5,)), (True, (8,)),
           (False, ()), (False, (2, 3, 4)), (False, (5,)), (False, (8,)))


def _block_invariant(target: OpenVinoTarget) -> bool:
    """Whether a token's logits are the same bits as a single step and inside blocks of 2..9 tokens."""
    return blocks_match_steps(target)


def _probe_key(target: OpenVinoTarget) -> list:
    """What the probe's verdict depends on besides the CPU: this IR (its folder name is keyed by
    the model's content), precision, device and OpenVINO.  The probe runs ~40 forwards per ladder
    tried and compiles its static graphs, once per machine instead of on every load."""
    return ["ladders-1", target.path.parent.name, target.precision, target.compute_precision, target.device,
            _import_ov().__version__]


def _probe_file(target: OpenVinoTarget) -> Path:
    """Where the probe's verdict for this target on this CPU is remembered."""
    return probe_path("openvino", _probe_key(target))


def _make_batch_invariant(target: OpenVinoTarget) -> None:
    """Set ``target.static`` / ``target.ladder`` from the remembered probe verdict, probing once when there is none."""

    def probe() -> dict:
        exact = _probe_batch_invariance(target)
        return {"exact": exact, "static": target.static, "ladder": list(target.ladder)}

    def valid(v: dict) -> bool:
        return (v.get("static"), tuple(v.get("ladder") or ())) in LADDERS and isinstance(v.get("exact"), bool)

    verdict = remembered("openvino", _probe_key(target), probe, valid)
    target.static, target.ladder = verdict["static"], tuple(verdict["ladder"])
    for rows in target._static:  # the probe's graphs: the loop compiles the ones it needs (prepare), no more
        target._bound.pop(rows, None)
    target._static = {}
    target.exact_blocks = verdict["exact"]  # False: the loop warns where it speculates


def _probe_batch_invariance(target: OpenVinoTarget) -> bool:
    """Greedy speculative output must equal plain output at every precision, so a token's logits
    must not depend on the block it is verified in.  OpenVINO's CPU plugin picks kernels by the
    row count (and a static graph per row count may pick others again), so every call after the
    prefill runs in the first (static, ladder) of ``LADDERS`` the probe finds exact.  True when exact."""
    for static, ladder in LADDERS:
        target.static, target.ladder = static, ladder
        try:
            if _block_invariant(target):
                return True
        except RuntimeError:  # a device that cannot compile a static graph: the next scheme
            target.reset(32)
    target.static, target.ladder = False, ()
    return False


def _check_small_blocks(target: OpenVinoTarget, device: str) -> None:
    """Refuse compressed weights where the runtime computes 1-token blocks wrongly.

    Seen with OpenVINO 2026.4 on this project's CPU with the tied-embedding graph of IR version 2
    (nncf-compressed weights gathered by column): correct logits for long blocks, garbage for
    blocks of 1-2 tokens (argmax agreement ~0%), which would be silent wrong output.  The
    layer-layout graph avoids it; this check keeps any such runtime from returning wrong text.  A prompt is run as one block and as single steps; the
    two must agree."""
    ids = [(i * 7919) % max(3, target.info.vocab_size - 1) + 1 for i in range(8)]
    target.reset(16)
    block = target.forward(ids).logits
    target.reset(16)
    steps = np.stack([target.forward([t]).logits[0] for t in ids])
    target.reset(16)
    agree = float((block.argmax(-1) == steps.argmax(-1)).mean())
    if agree < 0.75:
        ov = _import_ov()
        raise SpecrunError(
            f"OpenVINO {ov.__version__} computes {target.precision} weights wrongly on {device} here (a prompt run as one "
            f"block and as single tokens agree on {agree:.0%} of the next tokens); use --precision f32 or bf16, "
            f"or --backend onnx_cpu --precision int8"
        )


def _compress(model, weights: str):
    try:
        import nncf
    except Exception as exc:
        raise SpecrunError(f"{weights} weights need nncf ({type(exc).__name__}); pip install nncf") from None
    import logging

    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    nncf.set_log_level(logging.ERROR)
    if weights == "int8":
        kw = dict(mode=nncf.CompressWeightsMode.INT8_SYM)
    else:  # layers narrower than the group (tiny test models) stay int8 instead of failing
        kw = dict(mode=nncf.CompressWeightsMode.INT4_SYM, group_size=INT4_GROUP, ratio=1.0,
                  advanced_parameters=AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.IGNORE))
    # the hidden-state barrier (x @ I, see specrun_onnx_cpu.graph) stays float: compressed, its input
    # would be quantized on the fly (int8 groups of 32 across SmolLM2's outlier channels)
    barrier = [op.get_friendly_name() for op in model.get_ops()
               if op.get_type_name() == "MatMul" and any(_is_identity(i.get_source_output().get_node()) for i in op.inputs())]
    if barrier:
        kw["ignored_scope"] = nncf.IgnoredScope(names=barrier)
    with contextlib.redirect_stdout(sys.stderr):  # nncf's progress bar must not mix with generated text / --json
        return nncf.compress_weights(model, **kw)


def _is_identity(node) -> bool:
    """A square identity-matrix Constant (the graph's hidden-state barrier)."""
    if node.get_type_name() != "Constant":
        return False
    shape = list(node.get_output_shape(0))
    if len(shape) != 2 or shape[0] != shape[1]:
        return False
    data = node.get_data()
    return bool(np.array_equal(data, np.eye(shape[0], dtype=data.dtype)))
