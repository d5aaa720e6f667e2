"""Backends: which tinygrad device runs the model, in what compute dtype, with which kernel cache.

Chosen by `--backend`, else TG_LLAMA_BACKEND, else tinygrad's own DEV; never by editing code."""
from __future__ import annotations
import os
from dataclasses import dataclass
from tinygrad import Device, dtypes
from tinygrad.dtype import DType
from tg_llama.errors import TgLlamaError

# our names -> tinygrad device prefixes
BACKENDS = {"cpu": "CPU", "opencl": "CL", "cl": "CL", "cuda": "CUDA", "nv": "NV", "amd": "AMD", "hip": "HIP", "metal": "METAL",
            "webgpu": "WEBGPU", "null": "NULL"}

@dataclass(frozen=True)
class Backend:
  name: str
  device: str
  dtype: DType   # the compute dtype for weights, activations and the KV cache

def resolve_backend(name: str | None = None) -> Backend:
  name = name or os.environ.get("TG_LLAMA_BACKEND")
  if name:
    key = name.lower()
    prefix = BACKENDS.get(key.split(":")[0])
    if prefix is None:
      raise TgLlamaError(f"unknown backend {name!r}; known: {', '.join(sorted(set(BACKENDS) - {'cl', 'null'}))}")
    device = prefix + (name[len(key.split(':')[0]):] if ":" in name else "")
  else:
    device = Device.DEFAULT
  prefix = device.split(":")[0]
  # float32 on the CPU: tinygrad's CPU kernels are fastest there (half and bf16 convert per element)
  return Backend(name=prefix.lower(), device=device, dtype=dtypes.float32 if prefix in ("CPU", "PYTHON") else dtypes.float16)
