"""The public Python API: `tg_llama.load(source)` gives a model with `.logits()`, `.generate()` (token ids)
and `.stream()` (text chunks, through the checkpoint's own tokenizer)."""
from __future__ import annotations
import contextlib, math, os, pathlib, sys
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tg_llama.assets import resolve_model
from tg_llama.backend import Backend, free_buffer_cache, resolve_backend
from tg_llama.config import LlamaConfig
from tg_llama.convert import Checkpoint, check_weights, open_checkpoint, release_file_pages
from tg_llama import constraint
from tg_llama.engine.engine import Engine, Handle, Request
from tg_llama.engine.kv_cache import KVCache
from tg_llama.engine.runner import ModelRunner
from tg_llama.jit_cache import GraphCache, graphs_enabled
from tg_llama.errors import InvalidArgumentError, UnsupportedModelError
from tg_llama.models.llama import Llama
from tg_llama.quantize import GGUF_BLOCKS, quantize_model, quantized_names
from tg_llama.parallel import check_divisible, devices_for, split_axis
from tg_llama.sampling import SamplingParams
from tg_llama.transfer import trim_host_heap
from tg_llama.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16, "half": dtypes.float16, "bfloat16": dtypes.bfloat16}

def load_weights(model: Llama, ckpt: Checkpoint, device: str, dtype: DType, progress: Callable[[int, int], None] | None = None,
                 devices: tuple[str, ...] = (), quantize: str = "none") -> dict:
  """Fill the model's parameters from the checkpoint: only the tensors this shard holds are read. Linears to quantize
  (tg_llama/quantize.py's modes) come first, each weight quantized as it is read, so the float model is never held
  whole; then the float parameters. With several devices each tensor is split over them as it is read, so no device
  ever holds the whole model. Returns the quantization, as quantize_model does."""
  check_weights(ckpt, model.start_layer, model.end_layer)
  # once each tensor is on the device, its file pages and what reading it left in tinygrad's buffer cache are dropped:
  # the file is never resident next to its copy (Llama 3.2 1B's Q4_1 GGUF: peak RSS at load 1.91 -> 1.31 GB)
  release = lambda: (release_file_pages(), free_buffer_cache(devices or (device,)))
  quantization = quantize_model(model, quantize, ckpt, read=lambda name: ckpt.tensors[_stored_name(name, ckpt)](device), built=release)
  skip = quantized_names(model)
  params = {name: t for name, t in model.weights().items() if name not in skip}
  if model.is_first and model.is_last and ckpt.config.tie_embeddings and "lm_head.weight" in params:
    model.lm_head.weight = model.embed_tokens.weight  # one tensor for both, as in the checkpoint
    params.pop("lm_head.weight")
  for i, (name, param) in enumerate(params.items()):
    t = ckpt.tensors[name](device).cast(dtype).contiguous()
    param.replace(t.shard(devices, split_axis(name, model.config, len(devices))) if len(devices) > 1 else t).realize()
    release()
    if progress: progress(i + 1, len(params))
  return quantization

def _stored_name(name: str, ckpt: Checkpoint) -> str:
  # a tied output head is the token embedding in the file
  return "model.embed_tokens.weight" if name == "lm_head.weight" and name not in ckpt.tensors else name

def say_line(line: str):
  sys.stderr.write(line + "\n")
  sys.stderr.flush()

def progress_bar(label: str) -> Callable[[int, int], None]:
  def show(done: int, total: int):
    if not sys.stderr.isatty() and done != total: return
    sys.stderr.write(f"\r{label} {done}/{total} tensors ({100 * done // total}%)" + ("\n" if done == total else ""))
    sys.stderr.flush()
  return show

class Model:
  """A loaded model: its weights on one backend (or the stages of a pipeline, tg_llama/cluster/), and the engine that runs
  sequences on them (a KV cache of `slots` sequences, the captured graphs). Every generation goes through the engine."""
  def __init__(self, runner, checkpoint: Checkpoint, backend: Backend | None, dtype: DType, devices: tuple[str, ...] = (),
               quantization: dict | None = None):
    self.runner, self.checkpoint, self.backend, self.dtype, self.devices = runner, checkpoint, backend, dtype, devices
    self.llama: Llama | None = getattr(runner, "llama", None)  # None for a pipeline: its layers live in the stages
    self.config: LlamaConfig = runner.config
    self.quantization = quantization or {"mode": "none"}
    self.engine = Engine(runner)

  @property
  def device(self) -> str:
    """Where the model runs, in words: a tinygrad device ("CPU", "CL"), or a pipeline's stages."""
    return self.backend.device if self.backend is not None else self.runner.device

  @property
  def max_context(self) -> int: return self.runner.max_context

  @property
  def graphs(self) -> GraphCache | None: return self.engine.graphs

  @cached_property
  def tokenizer(self) -> Tokenizer:
    """The checkpoint's own tokenizer (from the GGUF, or the files beside the weights)."""
    if self.checkpoint.format == "gguf":  # its metadata, read when the file was opened
      return Tokenizer.from_gguf_metadata(self.checkpoint.metadata, str(self.checkpoint.path))
    return load_tokenizer(self.checkpoint.path)

  def logits(self, token_ids: list[int]) -> np.ndarray:
    """The next-token logits after `token_ids` (float32, shape (vocab,))."""
    return next(out.logits for out in self.engine.submit(Request(_checked_ids(token_ids, self.config.vocab_size), 0, logits=True))
                if out.logits is not None)

  def generate(self, token_ids: list[int], max_new_tokens: int = 32, sampling: SamplingParams | None = None,
               stop_ids: frozenset[int] = frozenset(), json_schema: dict | str | bool | None = None, grammar: str | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids (greedy unless `sampling` says otherwise), using the KV cache;
    a token in stop_ids is yielded and ends the generation. With `json_schema` (a schema as a dict or JSON text; True
    for any JSON object) or `grammar` (Lark, or llama.cpp's GBNF), only tokens that keep the output valid are drawn,
    and the generation ends where the output is complete (tg_llama/constraint.py)."""
    return (out.token for out in self._submit(token_ids, max_new_tokens, sampling, stop_ids, json_schema, grammar) if out.token is not None)

  def stream(self, token_ids: list[int], max_new_tokens: int = 256, sampling: SamplingParams | None = None,
             stop_ids: frozenset[int] | None = None, json_schema: dict | str | bool | None = None, grammar: str | None = None) -> Iterator[Chunk]:
    """Yield text chunks as they are generated, never half a UTF-8 character; stops on the tokenizer's stop tokens, or
    where a `json_schema` or `grammar` (as in generate) is complete."""
    token_ids = _checked_ids(token_ids, self.config.vocab_size)  # before the tokenizer is read
    stops = self.tokenizer.stop_ids if stop_ids is None else stop_ids
    return self._chunks(self._submit(token_ids, max_new_tokens, sampling, stops, json_schema, grammar), stops)  # checked now, not at next()

  def _submit(self, token_ids, max_new_tokens, sampling, stop_ids, json_schema, grammar) -> Handle:
    token_ids, sampling = _checked_ids(token_ids, self.config.vocab_size), sampling or SamplingParams()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
      raise InvalidArgumentError(f"max_new_tokens must be an int >= 0, but is {max_new_tokens!r}")
    if not isinstance(sampling, SamplingParams): raise InvalidArgumentError(f"sampling must be a SamplingParams, not {type(sampling).__name__}")
    rule = None if json_schema is None and grammar is None else constraint.compile(self.tokenizer, json_schema=json_schema, grammar=grammar)
    return self.engine.submit(Request(token_ids, max_new_tokens, sampling, frozenset(stop_ids), constraint=rule))

  def _chunks(self, outputs: Handle, stops: frozenset[int]) -> Iterator[Chunk]:
    decoder = self.tokenizer.stream()
    for out in outputs:
      if out.token is None: continue
      if out.token in stops:
        yield Chunk(decoder.flush(), out.token, "stop")
        return
      yield Chunk(decoder.add(out.token) + (decoder.flush() if out.finish_reason else ""), out.token, out.finish_reason)

def _checked_ids(token_ids, vocab_size: int) -> list[int]:
  ids = list(token_ids)
  if not ids: raise InvalidArgumentError("an empty prompt: give at least one token id")
  for n, i in enumerate(ids):
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < vocab_size:
      raise InvalidArgumentError(f"token id {i!r} at position {n} is not in the vocabulary [0, {vocab_size})")
  return [int(i) for i in ids]

@dataclass(frozen=True)
class Chunk:
  text: str
  token: int | None
  finish_reason: str | None  # "stop" (a stop token, a constraint complete), "length" (max_new_tokens), None (more to come)

def load_shard(source: str | pathlib.Path, start_layer: int, end_layer: int, backend: str | None = None, dtype: str | None = None,
               max_context: int | None = None) -> Shard:
  """Layers start_layer..end_layer of a checkpoint, reading only their tensors, with a KV cache ready.
  Call it as `shard(x, start_pos)`: x is token ids (B, T) for the first shard, else the previous shard's hidden
  states (B, T, dim); the last shard returns logits. To run a model as a pipeline of shards on several processes or
  machines, see tg_llama/cluster/."""
  be, compute, ckpt, context = _prepare(source, backend, dtype, max_context)
  llama, _ = build(ckpt, be.device, compute, start_layer, end_layer, quantize="none")
  return Shard(llama, context, compute, be.device)

class Shard:
  """Layers of a model with a KV cache of one sequence: `shard(x, start_pos)` runs x at start_pos."""
  def __init__(self, llama: Llama, max_context: int, dtype: DType, device: str):
    self.llama, self.layers = llama, llama.layers
    llama.setup_rope(max_context, device)
    self.cache = KVCache(llama.config, range(llama.start_layer, llama.end_layer), 1, max_context, dtype, device)

  def __call__(self, x: Tensor, start_pos: int, last_only: bool = True) -> Tensor:
    return self.llama(x, self.cache, [(0, start_pos)], last_only=last_only)

def _prepare(source, backend, dtype, max_context, slots: int = 1, quantize: str | None = None,
             say: Callable[[str], None] | None = None) -> tuple[Backend, DType, Checkpoint, int]:
  """The backend, compute dtype, checkpoint (its config only: no tensor data is read) and context, each checked; `say`
  hears of long work on the way (the CPU's first-use probe)."""
  if dtype is not None and dtype not in DTYPES: raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
  if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1):
    raise InvalidArgumentError(f"max_context must be an int >= 1, but is {max_context!r}")
  be = resolve_backend(backend, say)
  compute = DTYPES[dtype] if dtype else be.dtype
  if compute != be.dtype: _check_dtype(be, compute)
  ckpt = open_checkpoint(resolve_model(None if source is None else str(source)))
  context = min(ckpt.config.max_context, 4096) if max_context is None else max_context
  _check_memory(ckpt, be, compute, context, slots, quantize)
  return be, compute, ckpt, context

def _check_dtype(be: Backend, dtype: DType):
  # renderers claim dtypes their compiler lacks (tinygrad 0.14's CPU renderer lists bfloat16; clang < 17 has no __bf16
  # for its target): compile one kernel in it now, before any weights are read, with the compiler's complaints hushed
  try:
    with _quiet_stderr(): (Tensor([1.5, 2.0], dtype=dtype, device=be.device) * 3).float().realize()
  except Exception as e:
    name = lambda d: next(k for k, v in DTYPES.items() if v == d)
    raise UnsupportedModelError(f"dtype {name(dtype)} does not compile on the {be.name} backend here ({type(e).__name__}); "
                                f"use --dtype {name(be.dtype)} (its default)") from None

@contextlib.contextmanager
def _quiet_stderr():
  sys.stderr.flush()
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try: yield
  finally:
    os.dup2(saved, 2)
    os.close(saved), os.close(null)

def _check_memory(ckpt: Checkpoint, be: Backend, dtype: DType, context: int, slots: int, quantize: str | None = None):
  """Refuse a context whose KV cache (plus the weights, roughly) the machine cannot hold. Only on the CPU, whose memory
  /proc/meminfo reports; a GPU's is not checked here (its allocation fails when the cache is made)."""
  if be.device.split(":")[0] != "CPU" or (available := mem_available()) is None: return
  c = ckpt.config
  kv = 2 * slots * c.n_layers * c.n_kv_heads * c.head_dim * (context + 64) * dtype.itemsize  # +64: the prefill chunk's slack
  weights = _weight_bytes(ckpt, dtype, quantize)
  if kv + weights > available:
    raise InvalidArgumentError(f"max_context={context}{f' for {slots} slots' if slots > 1 else ''} needs a {_gb(kv)} KV cache and about {_gb(weights)} of weights, more than the "
                               f"{_gb(available)} of memory available on this machine; lower max_context (--max-context)")

# bytes per 32 weights once loaded (tg_llama/quantize.py): Q8_0's int8 and Q4_x's packed nibbles with float16 scales (and
# mins, Q4_0's made from its scale; float32 on a device without half, 4-8 bytes more); int8's one scale per row left out
LOADED_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 20, "Q4_1": 20, "int8": 32, "int4": 24}

def _weight_bytes(ckpt: Checkpoint, dtype: DType, quantize: str | None) -> int:
  """The weights' bytes once loaded (a tied head counted once): blocks a GGUF keeps (quantize "gguf", a GGUF file's
  default) and int8/int4 linears as quantize.py lays them out; the rest in the compute dtype."""
  keep = ckpt.format == "gguf" and quantize in (None, "gguf")
  total = 0
  for name, shape in ckpt.shapes.items():
    if name == "lm_head.weight" and ckpt.config.tie_embeddings: continue
    n, is_linear = math.prod(shape), len(shape) >= 2 and not name.endswith(("moe.gate.weight", "embed_tokens.weight"))
    kind = ckpt.raw_dtypes.get(name) if keep and ckpt.raw_dtypes.get(name) in GGUF_BLOCKS else None
    if kind is None and quantize in ("int8", "int4") and is_linear: kind = quantize
    total += n * LOADED_BLOCK_BYTES[kind] / 32 if kind else n * dtype.itemsize
  return int(total)

def mem_available() -> int | None:
  try:
    with open("/proc/meminfo") as f: return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
  except (OSError, StopIteration, ValueError): return None

def _gb(n: int) -> str: return f"{n / 1e9:.3g} GB"

def load(source: str | pathlib.Path | None = None, backend: str | None = None, dtype: str | None = None, max_context: int | None = None,
         progress: bool = False, devices: int = 1, graph_cache: bool = True, quantize: str | None = None, slots: int = 1) -> Model:
  """Load a checkpoint (HF dir, Meta dir, GGUF file or a converted dir; the format is detected) onto a backend.

  source: its path, an `org/name` Hugging Face repo id (downloaded when online), or None: the default model
  (SmolLM2-135M-Instruct, installed by `make chat`).

  backend: "cpu", "opencl", "cuda", ... (default: TG_LLAMA_BACKEND, else tinygrad's DEV).
  dtype: "float32", "float16" or "bfloat16" (default: the backend's compute dtype).
  max_context: the KV cache size (default: the model's context, capped at 4096).
  devices: split the model tensor-parallel over this many devices of the backend, from its own on (CUDA:0, CUDA:1, ...).
  graph_cache: reuse the JIT graphs captured by an earlier run of this model (in the backend's cache folder), and save
  them once captured; TG_LLAMA_GRAPH_CACHE=0 turns it off too.
  quantize: weight-only quantization, "none", "int8", "int4" or "gguf" (a GGUF file's Q8_0/Q4_0/Q4_1 blocks kept as
  stored, decoded inside the matmul: the same logits, half the bytes per token). Default: "gguf" for such a file
  on one device, else "none".
  slots: how many sequences the engine runs at once (a KV cache slot each; a server wants several)."""
  be, compute, ckpt, context = _prepare(source, backend, dtype, max_context, slots, quantize, say_line if progress else None)
  devs = devices_for(be.device, devices) if devices > 1 else ()
  if devs: check_divisible(ckpt.config, devices)  # before reading any weights
  llama, quantization = build(ckpt, be.device, compute, devices=devs, quantize=quantize,
                              progress=progress_bar(f"loading {ckpt.path.name}") if progress else None)
  model = Model(ModelRunner(llama, be.device, compute, context, slots, devices=devs), ckpt, be, compute, devs, quantization)
  if graphs_enabled(graph_cache): model.engine.graphs = GraphCache.for_model(model)
  return model

def build(ckpt: Checkpoint, device: str, dtype: DType, start_layer: int = 0, end_layer: int | None = None, devices: tuple[str, ...] = (),
          quantize: str | None = None, progress: Callable[[int, int], None] | None = None) -> tuple[Llama, dict]:
  """A model, or its layers start_layer..end_layer, with its weights read from the checkpoint (only those it holds), and its
  quantization (quantize: as load() takes it)."""
  llama = Llama(ckpt.config, start_layer, end_layer)
  mode = quantize or ("gguf" if ckpt.format == "gguf" and not devices and set(ckpt.raw_dtypes.values()) & set(GGUF_BLOCKS) else "none")
  if mode != "none" and devices: raise UnsupportedModelError(f"quantize={mode!r}: quantized layers run on one device; load without devices")
  quantization = load_weights(llama, ckpt, device, dtype, progress, devices, quantize=mode)
  trim_host_heap()
  return llama, quantization
