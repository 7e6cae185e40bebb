"""Export a Llama-family model (specrun_torch_cuda's ``LlamaModel``) to ONNX once, and cache it.

The graph (opset 17, float32; ``int8`` = the same graph with every constant-weight MatMul
replaced by onnxruntime's ``com.microsoft.MatMulNBits``, 8-bit block-wise weights, see
``quantize_weights_int8``) computes one block of T >= 1 tokens on top of a read-only KV cache of
P >= 1 rows:

inputs
    ``input_ids``     int64 [T]    the block's tokens
    ``positions``     int64 [T]    their absolute positions (RoPE, the sliding window)
    ``block_mask``    bool [T, T]  block key j is visible from block query i: lower-triangular for
                                   a chain of tokens, the ancestor relation for a token tree
    ``output_index``  int64 [N]    rows of the block to return logits for
                                   (``0..T-1`` for all, ``[T-1]`` for the last only)
    ``past_k_{l}_{h}``, ``past_v_{l}_{h}``  float32 [P, D]  for layer l, kv-head h: the cached keys
                                   (RoPE applied) / values of positions ``0..P-1``.  Past row j is
                                   visible iff ``j < min(positions)``; bind a single padding row
                                   when the cache is empty.  Ordered layer, then k/v, then head
                                   (``past_names``).
outputs
    ``logits``        float32 [N, V]
    ``new_kv``        float32 [L, 2, kv_heads, T, D]  the block's keys and values: the caller
                                   writes them at rows ``P .. P+T-1`` of its cache
    ``hidden_states`` float32 [T, len(aux_layers) * H]  only when exported with ``aux_layers``:
                                   the inputs of those decoder layers, concatenated (EAGLE-3),
                                   for every row of the block

Files in the cache folder (``export_model`` returns the first): ``model.onnx`` (the graph),
``model.onnx.data`` (its weights, ONNX external data), ``graph.json`` (``GraphMeta``: shapes and
names, so a runtime needs neither torch nor the config) and ``specrun-complete.json`` (written
last: sizes and digests, so a partial or damaged export is detected and rebuilt).  The folder is
keyed by the weights (names and SHA-256 of the safetensors files), the config, the aux layers,
the precision and ``EXPORT_VERSION``; it is built in a temporary folder and renamed into place,
under a file lock, so concurrent exports never leave a half-written cache.  Any ONNX consumer can
run it (OpenVINO: ``openvino.Core().read_model(path)``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import attrs

from specrun import store
from specrun.errors import SpecrunError
from specrun.models import ModelConfig
from specrun.store import cache_dir, content_digest

EXPORT_VERSION = "1"
MARKER_FILE = store.MARKER_FILE
OPSET = 17
PRECISIONS = ("f32", "int8")
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "graph.json"

# Counts real exports in this process (tests use it to prove a cached export is reused).
export_count = 0


@attrs.frozen
class GraphMeta:
    """What a runtime needs to drive the exported graph."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    aux_layers: tuple[int, ...] = attrs.field(converter=tuple)
    precision: str
    export_version: str = EXPORT_VERSION
    kv_layout: str = "head"  # "head": past_{k,v}_{layer}_{head} [P, D]; "layer": past_{k,v}_{layer} [kv_heads, P, D]

    @property
    def past_names(self) -> list[str]:
        if self.kv_layout == "layer":
            return [f"past_{kv}_{layer}" for layer in range(self.num_layers) for kv in "kv"]
        return past_names(self.num_layers, self.num_kv_heads)

    def past_shape(self, rows: int) -> tuple[int, ...]:
        """Shape of one past input holding ``rows`` cached positions."""
        return (self.num_kv_heads, rows, self.head_dim) if self.kv_layout == "layer" else (rows, self.head_dim)

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "positions", "block_mask", "output_index", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", "new_kv"] + (["hidden_states"] if self.aux_layers else [])

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), indent=1)

    @classmethod
    def load(cls, folder: Path) -> GraphMeta:
        return cls(**json.loads((folder / META_FILE).read_text()))


def past_names(num_layers: int, num_kv_heads: int) -> list[str]:
    return [f"past_{kv}_{layer}_{head}" for layer in range(num_layers) for kv in "kv" for head in range(num_kv_heads)]


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SpecrunError(f"{model_dir} has no *.safetensors weights")
    return files


def export_key(model_dir: str | Path, aux_layers: Sequence[int] = (), precision: str = "f32", kv_layout: str = "head") -> str:
    """Hash of what the export depends on: weights (name and SHA-256, so a
    reinstalled or re-converted model with the same weights reuses the export; the folder's name is
    part of the entry's name), config, options, code version."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.load(model_dir)
    h = hashlib.sha256()
    opts = {"v": EXPORT_VERSION, "opset": OPSET, "precision": precision, "aux": list(aux_layers)}
    if kv_layout != "head":
        # 2: untied embedding; 3: block keys scattered into the cache rows; 4: hidden states through x @ I
        opts["kv_layout"] = f"{kv_layout}-4"
    h.update(json.dumps(opts).encode())
    h.update(json.dumps(cfg.raw, sort_keys=True).encode())
    for f in _weight_files(model_dir):
        h.update(f"{f.name}:{content_digest(f)}".encode())
    return h.hexdigest()[:20]


def export_dir(model_dir: str | Path, aux_layers: Sequence[int] = (), precision: str = "f32", kv_layout: str = "head") -> Path:
    """The cache folder an export of this model with these options lives in (may not exist)."""
    model_dir = Path(model_dir)
    aux = "-aux" + "_".join(map(str, aux_layers)) if aux_layers else ""
    layout = "" if kv_layout == "head" else f"-{kv_layout}"
    key = export_key(model_dir, aux_layers, precision, kv_layout)
    return cache_dir() / "onnx" / f"{model_dir.name}-{precision}{aux}{layout}-{key}"


def is_complete(folder: Path, main_file: str = GRAPH_FILE) -> bool:
    """True iff the export in ``folder`` finished and every file still has its recorded SHA-256
    (``specrun.store.is_complete``)."""
    return store.is_complete(folder, main_file, EXPORT_VERSION)


def find_export(model_dir: str | Path, aux_layers: Sequence[int] = (), precision: str = "f32", kv_layout: str = "head") -> Path | None:
    """The cached graph file, if a complete export exists (no torch needed)."""
    folder = export_dir(model_dir, aux_layers, precision, kv_layout)
    return folder / GRAPH_FILE if is_complete(folder) else None


invalidate = store.invalidate


class _Stages:
    """A tqdm bar over named stages (or nothing, when progress is off)."""

    def __init__(self, names: list[str], desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(names), desc=desc, unit="stage", file=sys.stderr, dynamic_ncols=True)

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("done")
            self.bar.close()


def export_model(
    model_dir: str | Path,
    aux_layers: Sequence[int] = (),
    precision: str = "f32",
    *,
    force: bool = False,
    progress: bool = False,
    kv_layout: str = "head",
) -> Path:
    """Return the path of the cached ONNX graph for this model, exporting it first if needed.

    The graph's inputs are ``input_ids`` [T], ``positions`` [T], ``block_mask`` [T, T],
    ``output_index`` [N] and ``past_{k,v}_{layer}_{head}`` [P, D]; its outputs ``logits`` [N, V],
    ``new_kv`` [L, 2, kv_heads, T, D] and, with aux layers, ``hidden_states`` [T, n_aux * H] (the
    module docstring has the details; ``GraphMeta.load(path.parent)`` gives names and shapes).
    ``aux_layers``: decoder layers whose inputs the graph also returns (``hidden_states``).
    ``precision``: ``f32`` or ``int8`` (built from the f32 export).  ``force`` rebuilds.
    ``kv_layout``: ``head`` (the past inputs above) or ``layer`` (``past_{k,v}_{layer}``
    ``[kv_heads, P, D]``, see ``graph.StepGraph``).
    ``progress`` shows a tqdm bar of the stages on stderr.  Torch is imported only to export.
    """
    model_dir = Path(model_dir)
    aux = tuple(sorted({int(a) for a in aux_layers}))
    if precision not in PRECISIONS:
        raise SpecrunError(f"cannot export precision '{precision}' to ONNX; supported: {', '.join(PRECISIONS)}")
    if kv_layout not in ("head", "layer"):
        raise SpecrunError(f"unknown KV layout '{kv_layout}'; use head or layer")
    folder = export_dir(model_dir, aux, precision, kv_layout)
    if not force and is_complete(folder):
        return folder / GRAPH_FILE
    source = export_model(model_dir, aux, "f32", progress=progress, kv_layout=kv_layout) if precision == "int8" else None

    def build(tmp: Path) -> None:
        global export_count
        if source is None:
            _export_f32(model_dir, aux, tmp, progress, kv_layout)
        else:
            _quantize_int8(source.parent, tmp, model_dir.name, progress)
        export_count += 1

    return store.build_once(folder, GRAPH_FILE, build, version=EXPORT_VERSION, force=force,
                            info={"model": model_dir.name, "precision": precision, "aux_layers": list(aux)})


def _export_f32(model_dir: Path, aux: tuple[int, ...], out: Path, progress: bool, kv_layout: str = "head") -> None:
    stages = _Stages(
        ["read weights", "trace to ONNX", "write external data", "check with onnxruntime"],
        f"export {model_dir.name} f32", progress,
    )
    if not progress:
        print(f"specrun: exporting {model_dir.name} to ONNX (once; cached under {out.parent}) ...", file=sys.stderr, flush=True)
    try:
        import onnx
        import torch

        from specrun_kit.llama import load_model

        from .graph import StepGraph
    except ImportError as exc:
        raise SpecrunError(f"exporting to ONNX needs torch and onnx ({exc}); pip install 'specrun[onnx]'") from None

    stages.start("read weights")
    model = load_model(model_dir)
    s = model.spec
    if any(a >= s.num_layers for a in aux):
        raise SpecrunError(f"aux hidden layer {max(aux)} out of range: the model has {s.num_layers} layers (0..{s.num_layers - 1})")
    graph = StepGraph(model, aux, kv_layout).eval()
    del model
    meta = GraphMeta(
        model_type=s.model_type, vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers,
        num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
        context_length=s.context_length, aux_layers=aux, precision="f32", kv_layout=kv_layout,
    )
    stages.done()

    stages.start("trace to ONNX")
    T, P = 3, 5  # distinct sizes so that nothing is specialised to one of them
    start = P
    if kv_layout == "layer":  # the whole buffer is passed: the block's rows lie inside it
        start, P = 4, 9
    args = (
        torch.tensor([1, 2, 3][:T], dtype=torch.long),
        torch.arange(start, start + T),
        torch.tril(torch.ones(T, T, dtype=torch.bool)),
        torch.tensor([0, 2]),
        *(torch.randn(*meta.past_shape(P)) for _ in meta.past_names),
    )
    dynamic = {"input_ids": {0: "T"}, "positions": {0: "T"}, "output_index": {0: "N"}, "logits": {0: "N"}, "new_kv": {3: "T"}}
    dynamic.update({n: {1 if kv_layout == "layer" else 0: "P"} for n in meta.past_names})
    dynamic["block_mask"] = {0: "T", 1: "T"}
    if aux:
        dynamic["hidden_states"] = {0: "T"}
    raw = out / "raw.onnx"
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, args, str(raw), dynamo=False, opset_version=OPSET, input_names=meta.input_names,
            output_names=meta.output_names, dynamic_axes=dynamic, do_constant_folding=True,
        )
        expected = [t.numpy() for t in graph(*args)]
    del graph
    stages.done()

    stages.start("write external data")
    proto = onnx.load(str(raw))
    raw.unlink()
    proto.doc_string = f"specrun {model_dir.name} f32 (export version {EXPORT_VERSION}); inputs/outputs: see specrun_onnx_cpu.export"
    onnx.save_model(proto, str(out / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    del proto
    (out / META_FILE).write_text(meta.to_json())
    stages.done()

    stages.start("check with onnxruntime")
    got = _run_once(out / GRAPH_FILE, meta, [a.numpy() for a in args])
    for name, e, g in zip(meta.output_names, expected, got, strict=True):
        err = float(abs(e - g).max() / max(1.0, abs(e).max()))
        if not err < 1e-3:
            raise SpecrunError(f"the ONNX export of {model_dir.name} disagrees with PyTorch on '{name}' (relative error {err:.2g})")
    stages.done()
    stages.close()


def _run_once(path: Path, meta: GraphMeta, inputs: list) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(meta.output_names, dict(zip(meta.input_names, inputs, strict=True)))


def _quantize_int8(source: Path, out: Path, name: str, progress: bool) -> None:
    stages = _Stages(["quantize int8 weights", "check with onnxruntime"], f"export {name} int8", progress)
    if not progress:
        print("specrun: quantizing the ONNX export to int8 (once) ...", file=sys.stderr, flush=True)
    import numpy as np
    import onnx

    stages.start("quantize int8 weights")
    meta = attrs.evolve(GraphMeta.load(source), precision="int8")
    model = onnx.load(str(source / GRAPH_FILE))
    quantize_weights_int8(model)
    onnx.save_model(model, str(out / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    del model
    (out / META_FILE).write_text(meta.to_json())
    stages.done()

    stages.start("check with onnxruntime")
    T = 2
    inputs = [np.array([1, 2], np.int64), np.arange(T, dtype=np.int64), np.tril(np.ones((T, T), bool)),
              np.arange(T, dtype=np.int64)]
    inputs += [np.zeros(meta.past_shape(1), np.float32) for _ in meta.past_names]
    logits = _run_once(out / GRAPH_FILE, meta, inputs)[0]
    if not np.isfinite(logits).all():
        raise SpecrunError("the int8 ONNX export produced non-finite logits")
    stages.done()
    stages.close()


INT8_BLOCK = 32


def quantize_weights_int8(model, block_size: int = INT8_BLOCK) -> int:
    """Replace every MatMul by a constant 2-D weight with ONNX Runtime's ``MatMulNBits`` (8 bits,
    symmetric, one scale per ``block_size`` weights along K, ``accuracy_level=4``: int8 compute
    with block-wise quantized activations).  Returns the number of MatMuls replaced.

    Why not ``quantize_dynamic``: it quantizes each activation tensor with ONE uint8 scale, and the
    massive activations of models like SmolLM2 (|x| up to ~3e4) wreck that: top-1 agreement with
    f32 fell to ~50% over a prompt, against 100% here, at the same speed.  The weights are packed
    with the same kernel onnxruntime.quantization's MatMulNBitsQuantizer uses."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_8bits
    except ImportError:
        raise SpecrunError("int8 export needs an onnxruntime with MatMulNBits 8-bit support (>= 1.20); pip install -U onnxruntime") from None
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    nodes, replaced, dropped = [], 0, set()
    for node in graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if w_name not in inits or len(inits[w_name].dims) != 2:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        K, N = w.shape
        blocks = (K + block_size - 1) // block_size
        padded = np.pad(w, ((0, blocks * block_size - K), (0, 0))) if blocks * block_size != K else np.ascontiguousarray(w)
        packed = np.zeros((N, blocks, block_size), dtype=np.uint8)
        scales = np.zeros((N, blocks), dtype=np.float32)
        zero_points = np.zeros((N, blocks), dtype=np.uint8)
        quantize_matmul_8bits(packed, padded, scales, zero_points, block_size, N, K, True)
        q_name, s_name = f"{w_name}_Q8", f"{w_name}_scales"
        graph.initializer.extend([numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales.reshape(-1), s_name)])
        nodes.append(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], q_name, s_name], list(node.output), name=f"{node.name}_Q8",
            domain="com.microsoft", K=K, N=N, bits=8, block_size=block_size, accuracy_level=4,
        ))
        uses[w_name] -= 1
        if uses[w_name] == 0:
            dropped.add(w_name)
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return replaced
