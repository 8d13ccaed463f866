"""The base models' code, shared by compute (serving), the store (PLOT) and training.

Dimensions and loading (dims.py, loading.py), a tenant's adapter and its file format (adapter_format.py),
the encoder and decoder upper stacks over packed batches that mix tenants and entry layers (encoder.py,
decoder.py), the lower stacks that build PLOT (lower.py), one way to add a tenant's LoRA at a projection
(lora.py; merged into a plain model for references: lora_merge.py), the per-layer active-prefix loop
(active_prefix.py) and the packed-batch builder (packing.py). No gRPC and no service state here.
"""
import os

# Nothing is ever downloaded: transformers and the hub stay offline wherever model code is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
