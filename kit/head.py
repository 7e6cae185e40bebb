"""EAGLE-3 draft heads on ONNX runtimes: an export of the head (cached like the target's) and a
``DraftHead`` that keeps the head's KV cache in numpy buffers.  The openvino plugin runs the same
export through its own runtime (``KVBufferHead._execute`` is the only runtime-specific part).

The graph (opset 17, float32) runs T >= 1 draft steps on top of a read-only cache of P >= 1 rows:

inputs
    ``embeds``     float32 [T, H]      the target's embedding rows of the step tokens (gathered by
                                       the caller from the target's memory-mapped embedding, so
                                       the head file holds no copy of the target's vocabulary)
    ``aux``        float32 [T, n*Ht]   the target's hidden states (rows where ``gate`` is 1)
    ``prev``       float32 [T, H]      the head's own earlier outputs (rows where ``gate`` is 0)
    ``gate``       float32 [T, 1]      1: the row starts from ``fc(aux)``, 0: from ``prev``
                                       (exactly one or the other: x*1 and x*0 are exact)
    ``positions``  int64 [T]           RoPE positions
    ``mask``       bool [T, P+T]       which cached rows / block rows each step sees
    ``past_k``, ``past_v``  float32 [P, kv_heads, D]  cached keys (RoPE applied) / values; pass
                                       one masked-out row when the cache is empty
outputs
    ``logits``     float32 [T, draft_vocab]
    ``out``        float32 [T, H]      the head's output state (fed back as ``prev``)
    ``new_k``, ``new_v``  float32 [T, kv_heads, D]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np

from specrun import store
from specrun.eagle3 import Eagle3Checkpoint
from specrun.errors import SpecrunError
from specrun.interfaces import DraftHead, HeadOutput
from specrun.store import cache_dir, content_digest

from . import export as ex

HEAD_EXPORT_VERSION = "1"
HEAD_FILE = "head.onnx"
HEAD_DATA = "head.onnx.data"
HEAD_META = "head.json"
HEAD_PRECISIONS = ("f32", "int8")
INPUTS = ("embeds", "aux", "prev", "gate", "positions", "mask", "past_k", "past_v")
OUTPUTS = ("logits", "out", "new_k", "new_v")


@attrs.frozen
class HeadMeta:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    draft_vocab_size: int
    aux_width: int
    max_positions: int
    export_version: str = HEAD_EXPORT_VERSION


def _checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    files = [checkpoint_dir / "config.json", *sorted(checkpoint_dir.glob("*.safetensors"))]
    missing = [f.name for f in files if not f.is_file()]
    if missing or len(files) < 2:
        raise SpecrunError(f"{checkpoint_dir} is not an EAGLE-3 head folder (needs config.json and model.safetensors)")
    return files


def head_export_dir(checkpoint_dir: str | Path, precision: str = "f32") -> Path:
    """The cache folder of this head's export, keyed by its files (names and content digests)."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    h = hashlib.sha256(json.dumps({"v": HEAD_EXPORT_VERSION, "opset": ex.OPSET}).encode())
    for f in _checkpoint_files(checkpoint_dir):
        h.update(f"{f.name}:{content_digest(f)}".encode())
    return cache_dir() / "onnx-heads" / f"{checkpoint_dir.name}-{precision}-{h.hexdigest()[:20]}"


def export_head(ck: Eagle3Checkpoint, checkpoint_dir: str | Path, precision: str = "f32", *, force: bool = False,
                progress: bool = False) -> Path:
    """The cached ONNX graph of the head in ``checkpoint_dir`` (loaded as ``ck``), exported if needed.
    ``int8``: every weight MatMul as 8-bit block-wise ``MatMulNBits`` (built from the f32 export):
    a draft step reads ~4x fewer bytes (the draft-vocabulary projection dominates)."""
    if precision not in HEAD_PRECISIONS:
        raise SpecrunError(f"EAGLE-3 heads export as {' or '.join(HEAD_PRECISIONS)}, not '{precision}'")
    folder = head_export_dir(checkpoint_dir, precision)
    if not force and ex.is_complete(folder, HEAD_FILE):
        return folder / HEAD_FILE
    source = export_head(ck, checkpoint_dir, "f32", progress=progress) if precision == "int8" else None

    def build(tmp: Path) -> None:
        if source is None:
            _export(ck, tmp, progress)
        else:
            _quantize(source, tmp)

    return store.build_once(folder, HEAD_FILE, build, version=ex.EXPORT_VERSION, force=force,
                            info={"head": Path(checkpoint_dir).name, "precision": precision})


def _quantize(source: Path, out: Path) -> None:
    import onnx

    model = onnx.load(str(source))
    ex.quantize_weights_int8(model)
    onnx.save_model(model, str(out / HEAD_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=HEAD_DATA, size_threshold=1024)
    shutil.copy(source.parent / HEAD_META, out / HEAD_META)


def _export(ck: Eagle3Checkpoint, out: Path, progress: bool) -> None:
    if not progress:
        print(f"specrun: exporting the EAGLE-3 head to ONNX (once; cached under {out.parent}) ...", file=sys.stderr, flush=True)
    try:
        import onnx
        import torch

        from specrun_kit.torch_eagle3 import TorchDraftHead
    except ImportError as exc:
        raise SpecrunError(f"exporting a head to ONNX needs torch and onnx ({exc}); pip install 'specrun[onnx]'") from None
    from .graph import as_weight, rms_norm

    cfg = ck.config
    module = TorchDraftHead(ck, "cpu", torch.float32, "f32").module

    class HeadGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            m = module.midlayer
            att = m.self_attn
            scale = cfg.head_dim**-0.5
            self.w_fc = as_weight(module.fc.weight)
            self.w_qkv = as_weight(torch.cat([att.q_proj.weight * scale, att.k_proj.weight, att.v_proj.weight]))
            self.w_o = as_weight(att.o_proj.weight)
            self.w_gu = as_weight(torch.cat([m.mlp.gate_proj.weight, m.mlp.up_proj.weight]))
            self.w_down = as_weight(m.mlp.down_proj.weight)
            self.w_head = as_weight(module.lm_head.weight)
            self.ln_in, self.ln_hid = m.input_layernorm.weight.detach(), m.hidden_norm.weight.detach()
            self.ln_post, self.ln_out = m.post_attention_layernorm.weight.detach(), module.norm.weight.detach()
            self.register_buffer("inv_freq", module.inv_freq.detach().float().clone(), persistent=False)
            D, half = cfg.head_dim, cfg.head_dim // 2
            rot = torch.zeros(D, D)
            rot[torch.arange(half) + half, torch.arange(half)] = -1.0
            rot[torch.arange(half), torch.arange(half) + half] = 1.0
            self.register_buffer("rot", rot, persistent=False)

        def forward(self, embeds, aux, prev, gate, positions, mask, past_k, past_v):
            from specrun_kit.llama import rope_tables

            nh, nkv, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
            g = nh // nkv
            h = gate * torch.matmul(aux, self.w_fc) + (1.0 - gate) * prev
            x = torch.cat([rms_norm(embeds, self.ln_in, eps), rms_norm(h, self.ln_hid, eps)], dim=-1)
            q, k, v = torch.split(torch.matmul(x, self.w_qkv).reshape(-1, nh + 2 * nkv, D), [nh, nkv, nkv], dim=1)
            cos, sin = rope_tables(self.inv_freq, positions, x.dtype)  # [T, D]
            qk = torch.cat([q, k], dim=1).transpose(0, 1)  # [nh+nkv, T, D]
            qk = qk * cos + torch.matmul(qk, self.rot) * sin
            q, k = torch.split(qk, [nh, nkv], dim=0)
            new_k, new_v = k.transpose(0, 1), v  # [T, nkv, D]
            keys = torch.cat([past_k, new_k], dim=0).transpose(0, 1)  # [nkv, P+T, D]
            values = torch.cat([past_v, new_v], dim=0).transpose(0, 1)
            qg = q.reshape(nkv, -1, D)  # [nkv, g*T, D]: rows (group member, step)
            bias = torch.where(mask, torch.zeros(()), torch.full((), float("-inf"))).repeat(g, 1)
            p = torch.softmax(torch.matmul(qg, keys.transpose(1, 2)) + bias, dim=-1)
            o = torch.matmul(p, values).reshape(nh, -1, D).transpose(0, 1).reshape(-1, nh * D)
            r = h + torch.matmul(o, self.w_o)
            gate_, up = torch.split(torch.matmul(rms_norm(r, self.ln_post, eps), self.w_gu), [cfg.intermediate_size] * 2, dim=1)
            out = r + torch.matmul(torch.nn.functional.silu(gate_) * up, self.w_down)
            return torch.matmul(rms_norm(out, self.ln_out, eps), self.w_head), out, new_k, new_v

    graph = HeadGraph().eval()
    meta = HeadMeta(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.draft_vocab_size,
                    cfg.num_aux * cfg.target_hidden_size, cfg.max_position_embeddings)
    T, P = 3, 5
    args = (
        torch.randn(T, meta.hidden_size), torch.randn(T, meta.aux_width), torch.randn(T, meta.hidden_size),
        torch.tensor([[1.0], [0.0], [1.0]]), torch.arange(P, P + T),
        torch.ones(T, P + T, dtype=torch.bool).tril(P), torch.randn(P, meta.num_kv_heads, meta.head_dim),
        torch.randn(P, meta.num_kv_heads, meta.head_dim),
    )
    dynamic = {n: {0: "T"} for n in ("embeds", "aux", "prev", "gate", "positions", *OUTPUTS)}
    dynamic.update(mask={0: "T", 1: "PT"}, past_k={0: "P"}, past_v={0: "P"})
    raw = out / "raw.onnx"
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(raw), dynamo=False, opset_version=ex.OPSET, input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=dynamic, do_constant_folding=True)
        expected = [t.numpy() for t in graph(*args)]
    proto = onnx.load(str(raw))
    raw.unlink()
    proto.doc_string = f"specrun EAGLE-3 head (head export version {HEAD_EXPORT_VERSION}); see specrun_onnx_cpu.head"
    onnx.save_model(proto, str(out / HEAD_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=HEAD_DATA, size_threshold=1024)
    (out / HEAD_META).write_text(json.dumps(attrs.asdict(meta), indent=1))
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out / HEAD_FILE), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(INPUTS, (a.numpy() for a in args), strict=True)))
    for name, e, g in zip(OUTPUTS, expected, got, strict=True):
        err = float(abs(e - g).max() / max(1.0, abs(e).max()))
        if not err < 1e-3:
            raise SpecrunError(f"the ONNX export of the EAGLE-3 head disagrees with PyTorch on '{name}' (relative error {err:.2g})")


class KVBufferHead(DraftHead):
    """The DraftHead contract over the graph above, for any runtime: the cache is two numpy
    buffers ``[capacity, kv_heads, D]``; a call passes rows ``0..length-1`` (a contiguous view)
    and writes the new rows after them; rollback moves ``length``."""

    def __init__(self, ck: Eagle3Checkpoint, meta: HeadMeta, backend: str, device: str, precision: str, path: Path):
        if ck.embed is None:
            raise SpecrunError("the head has no embedding: load it with the target folder")
        self.config, self.meta, self.path = ck.config, meta, path
        self.d2t = np.asarray(ck.tensors["d2t"], dtype=np.int64)
        self.embed = ck.embed  # [V, H]: a read-only memory map of the target's weights when possible
        self.backend, self.device, self.precision = backend, device, precision
        self._k = self._v = None
        self._len = 0
        self._pad = np.zeros((1, meta.num_kv_heads, meta.head_dim), np.float32)
        self._zeros_aux = np.zeros((0, meta.aux_width), np.float32)
        self._zeros_h = np.zeros((0, meta.hidden_size), np.float32)

    @property
    def length(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[0]

    def _allocate(self, capacity: int) -> None:
        m, n = self.meta, self._len
        k = np.zeros((capacity, m.num_kv_heads, m.head_dim), np.float32)
        v = np.zeros_like(k)
        if self._k is not None and n:
            k[:n], v[:n] = self._k[:n], self._v[:n]
        self._k, self._v = k, v

    def reset(self, capacity: int) -> None:
        self._len = 0
        if self.capacity < capacity:
            self._k = self._v = None
            self._allocate(max(1, int(capacity)))

    def _zeros(self, cache: str, rows: int, width: int) -> np.ndarray:
        z = getattr(self, cache)
        if z.shape[0] < rows:
            z = np.zeros((max(rows, 2 * z.shape[0], 8), width), np.float32)
            setattr(self, cache, z)
        return z[:rows]

    def forward(self, tokens: Sequence[int], hidden: np.ndarray, *, from_target: bool = True,
                positions: Sequence[int] | None = None, mask: np.ndarray | None = None) -> HeadOutput:
        T = len(tokens)
        if T == 0:
            raise ValueError("forward needs at least one token")
        m = self.meta
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        width = m.aux_width if from_target else m.hidden_size
        if hidden.shape != (T, width):
            raise ValueError(f"hidden must be [{T}, {width}], got {list(hidden.shape)}")
        start, end = self._len, self._len + T
        if end > self.capacity:
            self._allocate(max(end, 2 * self.capacity, 256))
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.embed.shape[0]:
            raise ValueError(f"token ids must lie in 0..{self.embed.shape[0] - 1}")
        pos = np.arange(start, end, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
        if pos.shape != (T,):
            raise ValueError(f"positions must be [{T}], got {list(pos.shape)}")
        if int(pos.max()) >= m.max_positions:
            raise SpecrunError(f"draft position {int(pos.max())} exceeds the head's limit of {m.max_positions}")
        if mask is None:
            vis = np.ones((T, end), dtype=bool)
            vis[:, start:] = np.tri(T, dtype=bool)
        else:
            vis = np.asarray(mask, dtype=np.bool_)
            if vis.shape != (T, end):
                raise ValueError(f"mask must be [{T}, {end}], got {list(vis.shape)}")
        if start:
            past_k, past_v = self._k[:start], self._v[:start]
        else:  # one padding row, masked out
            past_k = past_v = self._pad
            vis = np.concatenate([np.zeros((T, 1), dtype=bool), vis], axis=1)
        gate = np.full((T, 1), 1.0 if from_target else 0.0, np.float32)
        feed = {
            "embeds": np.ascontiguousarray(self.embed[ids], dtype=np.float32),
            "aux": hidden if from_target else self._zeros("_zeros_aux", T, m.aux_width),
            "prev": self._zeros("_zeros_h", T, m.hidden_size) if from_target else hidden,
            "gate": gate, "positions": pos, "mask": np.ascontiguousarray(vis), "past_k": past_k, "past_v": past_v,
        }
        logits, out, new_k, new_v = self._execute(feed)
        self._k[start:end], self._v[start:end] = new_k, new_v
        self._len = end
        return HeadOutput(logits, out)

    def _execute(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Run the graph; return (logits, out, new_k, new_v) as float32 arrays."""
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot roll back to {length}: cache holds {self._len} entries")
        self._len = length

    def close(self) -> None:
        self._k = self._v = None


class OnnxDraftHead(KVBufferHead):
    def __init__(self, session, ck: Eagle3Checkpoint, meta: HeadMeta, path: Path, precision: str = "f32"):
        super().__init__(ck, meta, "onnx_cpu", "cpu", precision, path)
        self.session = session

    def _execute(self, feed):
        logits, out, new_k, new_v = self.session.run(list(OUTPUTS), feed)
        return logits, out, new_k, new_v

    def close(self) -> None:
        super().close()
        self.session = None


def load_head_checkpoint(checkpoint_dir: str, target_dir: str) -> Eagle3Checkpoint:
    """The checkpoint (validated against the target) with the target's embedding memory-mapped."""
    return Eagle3Checkpoint.load(checkpoint_dir, target_dir, mmap_embed=True)


def head_meta(path: Path) -> HeadMeta:
    return HeadMeta(**json.loads((path.parent / HEAD_META).read_text()))
