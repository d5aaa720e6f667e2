"""The public Python API: `tg_llama.load(source)` gives a model with `.logits()` and `.generate()`."""
from __future__ import annotations
import pathlib, sys
from typing import Callable, Iterator
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tg_llama.backend import Backend, resolve_backend
from tg_llama.config import LlamaConfig
from tg_llama.convert import Checkpoint, check_weights, open_checkpoint
from tg_llama.errors import CheckpointError
from tg_llama.generate import Generator, greedy
from tg_llama.model import Llama

DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16, "half": dtypes.float16, "bfloat16": dtypes.bfloat16}

def load_weights(model: Llama, ckpt: Checkpoint, device: str, dtype: DType, progress: Callable[[int, int], None] | None = None):
  """Fill the model's parameters from the checkpoint: only the tensors this shard holds are read."""
  check_weights(ckpt, model.start_layer, model.end_layer)
  params = model.weights()
  if model.is_first and model.is_last and ckpt.config.tie_embeddings:
    model.lm_head.weight = model.embed_tokens.weight  # one tensor for both, as in the checkpoint
    params.pop("lm_head.weight")
  for i, (name, param) in enumerate(params.items()):
    param.replace(ckpt.tensors[name](device).cast(dtype).contiguous()).realize()
    if progress: progress(i + 1, len(params))

def progress_bar(label: str) -> Callable[[int, int], None]:
  def show(done: int, total: int):
    if not sys.stderr.isatty() and done != total: return
    sys.stderr.write(f"\r{label} {done}/{total} tensors ({100 * done // total}%)" + ("\n" if done == total else ""))
    sys.stderr.flush()
  return show

class Model:
  """A loaded whole model on one backend, with its KV cache and captured JIT graphs."""
  def __init__(self, llama: Llama, checkpoint: Checkpoint, backend: Backend, dtype: DType, max_context: int):
    self.llama, self.checkpoint, self.backend, self.dtype = llama, checkpoint, backend, dtype
    self.config: LlamaConfig = llama.config
    self.generator = Generator(llama, backend.device, dtype, max_context)

  @property
  def max_context(self) -> int: return self.generator.max_context

  def logits(self, token_ids: list[int]) -> np.ndarray:
    """The next-token logits after `token_ids` (float32, shape (vocab,))."""
    return self.generator.prefill(list(token_ids)).numpy()[0]

  def generate(self, token_ids: list[int], max_new_tokens: int = 32, sample: Callable[[Tensor], Tensor] = greedy,
               stop_ids: frozenset[int] = frozenset()) -> Iterator[int]:
    """Yield new token ids (greedy unless `sample` says otherwise), using the KV cache."""
    return self.generator.generate(list(token_ids), max_new_tokens, sample, stop_ids)

def load(source: str | pathlib.Path, backend: str | None = None, dtype: str | None = None, max_context: int | None = None,
         progress: bool = False) -> Model:
  """Load a checkpoint (HF dir, Meta dir, GGUF file or a converted dir; the format is detected) onto a backend.

  backend: "cpu", "opencl", "cuda", ... (default: TG_LLAMA_BACKEND, else tinygrad's DEV).
  dtype: "float32", "float16" or "bfloat16" (default: the backend's compute dtype).
  max_context: the KV cache size (default: the model's context, capped at 4096)."""
  be = resolve_backend(backend)
  if dtype is not None and dtype not in DTYPES: raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
  compute = DTYPES[dtype] if dtype else be.dtype
  ckpt = open_checkpoint(source)
  context = max_context or min(ckpt.config.max_context, 4096)
  if context < 1: raise ValueError(f"max_context must be positive, got {context}")
  llama = Llama(ckpt.config)
  load_weights(llama, ckpt, be.device, compute, progress_bar(f"loading {pathlib.Path(source).name}") if progress else None)
  return Model(llama, ckpt, be, compute, context)
