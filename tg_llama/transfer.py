"""Host memory into and out of device buffers, by the backend's own copy: no tinygrad schedule, no kernel.

A Tensor made from numpy goes through tinygrad's scheduler when realized (1.6-3 ms on DEV=CPU, for one token id or one
weight); these take microseconds. Used for the graphs' inputs and outputs on every step, and for a GGUF file's blocks
at load (211 weights for SmolLM2)."""
from __future__ import annotations
import ctypes
import numpy as np
from tinygrad import Device, Tensor
from tinygrad.dtype import DType, _from_np_dtype, _to_np_dtype

def full(shape: tuple[int, ...], fill, dtype: DType, device: str | None) -> Tensor:
  """Tensor.full(...).contiguous().realize() without a kernel of its own to schedule and compile (each took 10-30 ms at
  start-up); through tinygrad for a dtype numpy lacks (bfloat16)."""
  if (np_dtype := _to_np_dtype(dtype)) is None: return Tensor.full(shape, fill, dtype=dtype, device=device).contiguous().realize()
  return to_device(np.zeros(shape, np_dtype) if fill == 0 else np.full(shape, fill, np_dtype), device)  # zeros: pages the OS gives zeroed

def to_device(a: np.ndarray, device: str | None) -> Tensor:
  """A new realized tensor on `device` holding a copy of `a`."""
  t = Tensor.empty(*a.shape, dtype=_from_np_dtype(a.dtype), device=device).realize()
  t.uop.buffer.ensure_allocated()  # an empty tensor's memory is allocated at first use
  return write(t, np.ascontiguousarray(a))

def write(t: Tensor, a: np.ndarray) -> Tensor:
  """t (realized, on one device) with its contents replaced by `a`, in place."""
  assert a.dtype == _to_np_dtype(t.dtype) and a.shape == t.shape and a.flags["C_CONTIGUOUS"]
  buf = t.uop.buffer
  buf.allocator._copyin(buf._buf, memoryview(a).cast("B"))
  return t

def read(t: Tensor) -> np.ndarray:
  """A realized tensor's contents, copied out (Tensor.numpy() takes 0.2 ms on DEV=CPU, this 5 us)."""
  buf, out = t.uop.buffer, np.empty(t.shape, dtype=_to_np_dtype(t.dtype))
  Device[buf.device].synchronize()  # a GPU's graph may still be running
  buf.allocator._copyout(memoryview(out).cast("B"), buf._buf)
  return out

def trim_host_heap() -> None:
  """Give back to the OS the heap that reading a checkpoint through numpy freed: glibc keeps freed memory below a trim
  threshold that grows with the large blocks freed (23 MB stayed resident after Llama 3.2 1B's load). Not glibc: nothing."""
  try: ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError): pass
