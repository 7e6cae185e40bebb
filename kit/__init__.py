"""The graph kit: what the exported-graph backends share, public for every backend to import.

* ``llama`` — the one Llama-family model definition (torch) every backend is built from;
* ``torch_eagle3`` — the EAGLE-3 head in torch (inference and training);
* ``graph`` / ``export`` — the step graph and its cached ONNX export (f32, int8);
* ``head`` — the EAGLE-3 head's ONNX export and the KV-buffer head;
* ``kvbuffer`` — the KV-buffer target (numpy cache buffers bound to a runtime).

Cached artefacts are built through ``specrun.store.build_once``."""
