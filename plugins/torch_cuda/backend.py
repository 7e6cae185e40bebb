"""PyTorch backend: CUDA when present, CPU as the numerical reference (fp32).

torch is imported when the backend is used, not when the plugin registers: other backends' start-up
(first token within a few seconds) does not pay for it."""

from __future__ import annotations

from specrun.interfaces import Availability, Backend, Target


class TorchBackend(Backend):
    name = "torch_cuda"
    description = "PyTorch: CUDA GPUs, and CPU as the fp32 numerical reference"

    def availability(self) -> Availability:
        try:
            import torch  # noqa: F401
        except Exception as exc:
            return Availability(False, f"torch cannot be imported ({type(exc).__name__}: {exc})", "pip install torch")
        return Availability(True)

    def devices(self) -> list[str]:
        import torch

        devs = ["cpu"]
        if torch.cuda.is_available():
            devs += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return devs

    def known_devices(self) -> list[str]:
        return ["cpu", "cuda", "cuda:0"]

    def precisions(self, device: str) -> list[str]:
        if device.startswith("cuda"):
            return ["bf16", "f16", "f32"]
        return ["f32", "bf16"]

    def preference(self, device: str):
        """The fastest path on CUDA; on a CPU the fp32 reference, slower than the graph backends
        (33.7 tokens/s plain here against openvino int8 45.6, onnx_cpu f32 32.5; README)."""
        return (100, "bf16") if device.startswith("cuda") else (10, "f32")

    def versions(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__, "cuda": str(torch.version.cuda)}

    def capabilities(self) -> set[str]:
        return {"hidden_states", "tree_attention", "eagle3", "weights:f32", "weights:bf16"}

    def build_target(self, model_dir, *, device, precision, aux_hidden_layers, options) -> Target:
        import torch

        from specrun_kit.llama import load_model

        from .target import DTYPES, TorchTarget

        threads = (options or {}).get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        model = load_model(model_dir, DTYPES[precision], device)
        return TorchTarget(model, device, precision, aux_hidden_layers)

    def training_kit(self):
        """The torch pieces ``specrun train-draft`` builds on: (load_model, Eagle3Module)."""
        from specrun_kit.llama import load_model
        from specrun_kit.torch_eagle3 import Eagle3Module

        return load_model, Eagle3Module

    def slot_engine(self, model_dir, *, slots: int, capacity: int, kv_dtype: str = "f32", weights: str = "f32"):
        """The continuous-batching engine of ``specrun train-draft --stage data`` on the CPU:
        ``weights`` f32 or bf16 (the matmuls; bf16 uses the CPU's AMX / avx512_bf16 units),
        ``kv_dtype`` bf16 or f32 (the cache; with bf16 weights the cache is bf16)."""
        import torch

        from specrun_kit.llama import load_model

        from .slots import SlotEngine

        dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
        model = load_model(model_dir, dtypes[weights], "cpu")
        kv = torch.bfloat16 if weights == "bf16" else dtypes[kv_dtype]
        return SlotEngine(model, slots, capacity, dtype=kv)

    def load_eagle3_head(self, checkpoint_dir, target_dir, *, device, precision=None, options=None):
        from specrun_kit.torch_eagle3 import load_torch_head

        from .target import DTYPES

        device = self.check_device(device)
        precision = self.check_precision(device, precision)
        head = load_torch_head(checkpoint_dir, target_dir, device=device, dtype=DTYPES[precision], precision=precision)
        head.backend = self.name
        return head


