"""llama.cpp backend (CPU), through llama-cpp-python's C API.

The model runs as llama.cpp runs it for its own users: a GGUF file, llama.cpp's kernels and its
KV cache (keys in Q8_0, values in f16: see ``KEY_CACHE``).  specrun adds what llama.cpp's own loop does not do well on a CPU: verifying a
whole draft in one ``llama_decode`` call and rolling the cache back with ``llama_memory_seq_rm``.

Weight formats: ``int4`` is Q4_1, ``int8`` Q8_0, ``f32`` itself (see ``FORMATS``).  For a bundled
model converted from a GGUF file (the default model), ``int4`` runs that very file — the one
llama.cpp's users download; every other (model, format) is converted once from the safetensors
folder (``convert.py``) and quantized by llama.cpp's own quantizer, cached content-keyed like the
other backends' exports.

Greedy speculative decoding is exact only if a token's logits do not depend on the block it is
verified in.  llama.cpp's CPU kernels quantize activations per row and split work by rows, so a
block's rows are expected to get the same bits as single steps; ``_probe_blocks`` checks it once
per GGUF file, CPU and llama.cpp version (remembered in the cache) and ``exact_blocks`` reports it
(the conformance kit holds the backend to it).  No hidden states: EAGLE-3 heads need another
backend."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specrun import store
from specrun.errors import SpecrunError
from specrun.interfaces import Availability, Backend, ModelInfo, StepOutput, Target
from specrun.models import ModelConfig, bundled_gguf
from specrun.store import cache_dir
from specrun_kit.probe import blocks_match_steps, remembered

INSTALL_HINT = "CMAKE_ARGS='-DGGML_NATIVE=ON' pip install 'specrun[llama_cpp]' (builds llama.cpp: ~5-8 min on 2 cores)"
GGUF_VERSION = "2"  # 2: models without a tokenizer get byte tokens and a merge
#: specrun precision -> (llama.cpp file type name, LLAMA_FTYPE_* value).  Measured here: Q4_1 and
#: Q8_0 blocks are the bits of single steps (activations quantized per row, integer dot products);
#: F32 and F16 blocks are not (their matmuls change kernels with the row count), so f32 is for
#: parity checks (speculating on it warns) and f16, as inexact, is not offered.
FORMATS = {"int4": ("Q4_1", 3), "int8": ("Q8_0", 7), "f32": ("F32", 0)}
CTX_STEP = 1024  # the context is made for the request's capacity rounded up to this
#: llama.cpp's flash attention (LLAMA_FLASH_ATTN_TYPE_ENABLED), at every weight format: measured
#: here, a block's rows then get the same logits bits as single steps (without it they moved by up
#: to 0.87 on the default model, so speculation would not be lossless) and a step is faster (70 vs
#: 60 tokens/s).  Its CPU kernel rounds attention to f16, so even f32 weights leave the fp32
#: reference by ~0.01-0.1 of a logit on the tiny test models (3e-5 without it).
FLASH_ATTN = 1
#: the key cache's type at int4/int8: Q8_0 (GGML_TYPE_Q8_0).  With f16 keys (llama.cpp's default)
#: a single token's flash attention splits a cache of 512+ rows across threads and sums the parts
#: in another order than a block does: measured here, blocks then left single steps by up to 0.93
#: of a logit past ~256 tokens of context (4 of 80 MT-bench answers changed by speculation).  With
#: Q8_0 keys that path is not taken: blocks equal steps bit for bit at 20-1,000 tokens, and a step
#: is no slower (11.2 vs 11.8 ms at 300 tokens, 15.4 vs 18.4 at 800).  Models whose heads are
#: narrower than a Q8_0 block (32) keep f16 keys (the probe then tells whether blocks are exact).
KEY_CACHE = 8
#: context lengths the exactness probe runs at (short, and past the 512-row split above)
PROBE_CONTEXTS = (2, 600)


def _import_llama():
    try:
        import llama_cpp
    except Exception as exc:
        raise SpecrunError(
            f"llama_cpp cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return llama_cpp


class _Quiet:
    """Keep llama.cpp's log lines (model loading, context creation) off the terminal."""

    installed = False

    @classmethod
    def install(cls, llama_cpp) -> None:
        if cls.installed:
            return

        @llama_cpp.llama_log_callback
        def _drop(level, text, user_data):  # noqa: ARG001
            return None

        cls._callback = _drop  # keep a reference: llama.cpp calls it for the process's lifetime
        llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
        cls.installed = True


class LlamaCppTarget(Target):
    """One sequence (id 0) in a llama.cpp context; ``rollback`` removes cache cells past the length."""

    def __init__(self, lib, model, gguf: Path, info: ModelInfo, precision: str, threads: int):
        self.lib, self.model, self.path = lib, model, gguf
        self.backend, self.device, self.precision = "llama_cpp", "cpu", precision
        self.info = info
        self.aux_layers: tuple[int, ...] = ()
        self.threads = threads
        self.ctx = None
        self.n_ctx = 0
        self.n_batch = 512
        self._len = 0
        self.exact_blocks: bool | None = None
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):  # every token belongs to sequence 0, once and for all
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._want = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))

    @property
    def length(self) -> int:
        return self._len

    def _make_context(self, n_ctx: int) -> None:
        lib = self.lib
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.threads
        params.n_seq_max = 1
        params.no_perf = True
        params.flash_attn_type = FLASH_ATTN
        if self.precision == "f32":  # an f32 model keeps an f32 cache (llama.cpp's default is f16)
            params.type_k = params.type_v = 0  # GGML_TYPE_F32
        else:  # keys in Q8_0, values f16: see KEY_CACHE
            params.type_k, params.type_v = KEY_CACHE, 1  # GGML_TYPE_F16
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx and params.type_k == KEY_CACHE:  # heads narrower than a Q8_0 block (32): f16 keys
            params.type_k = 1
            ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise SpecrunError(f"llama.cpp could not make a context of {n_ctx} tokens for {self.path}")
        self.ctx, self.n_ctx = ctx, n_ctx
        self._memory = lib.llama_get_memory(ctx)

    def reset(self, capacity: int) -> None:
        capacity = max(1, min(int(capacity), self.info.context_length))
        if self.ctx is None or capacity > self.n_ctx:
            self._make_context(min(-(-capacity // CTX_STEP) * CTX_STEP, self.info.context_length))
        else:
            self.lib.llama_memory_clear(self._memory, True)
        self._len = 0

    def forward(self, tokens: Sequence[int], *, all_logits: bool = True) -> StepOutput:
        T = len(tokens)
        if T == 0:
            raise ValueError("forward needs at least one token")
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.min() < 0 or ids.max() >= self.info.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.info.vocab_size - 1}")
        end = self._len + T
        if end > self.info.context_length:
            raise SpecrunError(f"sequence of {end} tokens exceeds the model's context limit of {self.info.context_length}")
        if self.ctx is None or end > self.n_ctx:  # grow: the loop reserves enough up front, so rare
            kept = self._len
            if kept:
                raise SpecrunError(f"llama.cpp context of {self.n_ctx} tokens is full; reset with a larger capacity")
            self.reset(end)
        rows = []
        for c in range(0, T, self.n_batch):
            chunk = ids[c : c + self.n_batch]
            n = len(chunk)
            last = c + n == T
            b = self._batch
            b.n_tokens = n
            self._tokens[:n] = chunk
            self._pos[:n] = np.arange(self._len, self._len + n)
            self._want[:n] = 1 if all_logits else 0
            if last:
                self._want[n - 1] = 1
            rc = self.lib.llama_decode(self.ctx, b)
            if rc != 0:
                self.lib.llama_memory_seq_rm(self._memory, 0, self._len, -1)
                raise SpecrunError(f"llama.cpp failed to decode a block of {n} tokens (llama_decode returned {rc})")
            self._len += n
            if all_logits or last:
                k = n if all_logits else 1
                ptr = self.lib.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(k, self.info.vocab_size)).copy())
        return StepOutput(np.concatenate(rows) if len(rows) > 1 else rows[0], None)

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot roll back to {length}: cache holds {self._len} tokens")
        if length < self._len:
            self.lib.llama_memory_seq_rm(self._memory, 0, length, -1)
        self._len = length

    def close(self) -> None:
        lib = self.lib
        if lib is None:
            return
        if self.ctx is not None:
            lib.llama_free(self.ctx)
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
        if self.model is not None:
            lib.llama_model_free(self.model)
        self.ctx = self.model = self._batch = None
        self.lib = None


class LlamaCppBackend(Backend):
    name = "llama_cpp"
    description = "llama.cpp on CPU (GGUF; Q4_1 / Q8_0 / f32 weights) through llama-cpp-python"

    def availability(self) -> Availability:
        try:
            _import_llama()
        except SpecrunError as exc:
            return Availability(False, str(exc), INSTALL_HINT)
        return Availability(True)

    def devices(self) -> list[str]:
        return ["cpu"]

    def precisions(self, device: str) -> list[str]:
        return list(FORMATS)

    def capabilities(self) -> set[str]:
        return {"weights:f32", "weights:int8", "weights:int4"}

    def conformance_requirements(self):
        return Path(__file__).with_name("conformance.toml")

    def preference(self, device: str):
        """On a CPU: int4 (Q4_1, the default model's own GGUF file), the fastest plain decoding
        of specrun's backends on the CPUs where it was measured, with blocks exact (flash attention,
        Q8_0 keys; probed per CPU).  Intel Xeon with AVX-512 VNNI, 2026-12-07, 24 MT-bench
        questions, 256 tokens: plain 77.6 tokens/s, openvino int8 51.0 (60.3 with lookup).  AMD EPYC without AVX-512, 2026-12-06, ``specrun bench``, 24 MT-bench
        questions, 128 tokens: llama_cpp int4 plain 93.6 tokens/s, openvino 30.1 (f32, its default
        on that CPU; int8 28-34 with ``specrun generate``); on an AVX-512 AMD EPYC llama.cpp's own
        plain decoding (110) beat openvino int8 with prompt lookup (103)."""
        return (70, "int4") if device.lower().partition(".")[0] == "cpu" else None

    def versions(self) -> dict[str, str]:
        return {"llama-cpp-python": _import_llama().__version__}

    def gguf_path(self, model_dir: str, precision: str, force: bool = False) -> Path:
        """The GGUF file for this model and weight format: the bundled model's own file for its
        format, else converted (and quantized) once into the cache."""
        fmt, ftype = FORMATS[precision]
        source = bundled_gguf(model_dir)
        if source is not None and _file_type(source) == fmt and not force:
            return source
        from . import convert

        convert.check_convertible(model_dir)
        lib = _import_llama()
        base = self._f32_folder(model_dir)
        key = base.name.rsplit("-", 1)[-1]
        f32 = store.build_once(base, "model.gguf", lambda tmp: convert.write_gguf(model_dir, tmp / "model.gguf"),
                               version=GGUF_VERSION, force=force, info={"source": str(model_dir)})
        if precision == "f32":
            return f32
        folder = cache_dir() / "gguf" / f"{Path(model_dir).name}-{precision}-g{GGUF_VERSION}-{key}-{lib.__version__}"
        threads = os.cpu_count() or 1
        return store.build_once(folder, "model.gguf",
                                lambda tmp: convert.quantize(lib, f32, tmp / "model.gguf", ftype, threads),
                                version=GGUF_VERSION, force=force, info={"source": str(model_dir), "format": fmt})

    def _f32_folder(self, model_dir: str) -> Path:
        from specrun_kit.export import export_key

        return cache_dir() / "gguf" / f"{Path(model_dir).name}-f32-g{GGUF_VERSION}-{export_key(model_dir, (), 'gguf-f32')}"

    def _f32_source(self, model_dir: str) -> Path | None:
        folder = self._f32_folder(model_dir)
        return folder / "model.gguf" if folder.exists() else None

    def export(self, model_dir: str, *, precision: str | None = None, aux_hidden_layers: Sequence[int] = (),
               force: bool = False, progress: bool = True) -> Path:
        precision = self.check_precision("cpu", precision)
        if aux_hidden_layers:
            raise SpecrunError("the llama_cpp backend returns no hidden states (EAGLE-3 heads need another backend)")
        return self.gguf_path(model_dir, precision, force=force)  # conversion prints one line; no bar needed (~4 s)

    def build_target(self, model_dir, *, device, precision, aux_hidden_layers, options) -> Target:
        if aux_hidden_layers:
            raise SpecrunError(
                "the llama_cpp backend returns no hidden states, so it cannot feed an EAGLE-3 head; "
                "use --drafter ngram, or --backend openvino for the head"
            )
        lib = _import_llama()
        gguf = self.gguf_path(model_dir, precision)
        cfg = ModelConfig.load(model_dir)
        _Quiet.install(lib)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(gguf).encode(), params)
        if not model:
            if gguf.parent.parent == cache_dir() / "gguf":  # ours: damaged despite its digests, or a converter bug
                for folder in (gguf.parent, *(p.parent for p in [self._f32_source(model_dir)] if p)):
                    store.invalidate(folder)
                raise SpecrunError(f"llama.cpp could not load {gguf} (removed from the cache); run the command again to rebuild it")
            raise SpecrunError(f"llama.cpp {lib.__version__} could not load {gguf}")
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        if vocab != cfg.vocab_size:
            lib.llama_model_free(model)
            raise SpecrunError(f"{gguf} has {vocab} tokens but {model_dir} has {cfg.vocab_size}: not the same model")
        info = ModelInfo(cfg.vocab_size, cfg.context_length, cfg.hidden_size, cfg.num_layers)
        threads = int((options or {}).get("threads") or os.cpu_count() or 1)
        target = LlamaCppTarget(lib, model, gguf, info, precision, threads)
        target.exact_blocks = _exact_blocks(target)
        return target


def _file_type(gguf: Path) -> str | None:
    """The weight format a GGUF file declares (``general.file_type``), e.g. ``Q4_1``."""
    try:
        import gguf as gg

        reader = gg.GGUFReader(str(gguf))
        field = reader.get_field("general.file_type")
        return None if field is None else gg.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").replace("ALL_", "")
    except Exception:
        return None


def _exact_blocks(target: LlamaCppTarget) -> bool:
    """Whether blocks are the bits of single steps, probed once per GGUF file (path, size, mtime),
    thread count and llama.cpp version on this CPU, and remembered in the cache."""
    st = target.path.stat()
    key = [str(target.path), st.st_size, st.st_mtime_ns, target.threads, target.lib.__version__, KEY_CACHE, PROBE_CONTEXTS]
    contexts = sorted({min(c, target.info.context_length - 20) for c in PROBE_CONTEXTS} - {0})
    verdict = remembered("llama_cpp", key, lambda: {"exact": all(blocks_match_steps(target, c) for c in contexts)},
                         lambda v: isinstance(v.get("exact"), bool))
    return verdict["exact"]
