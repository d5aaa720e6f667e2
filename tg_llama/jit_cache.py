"""Captured TinyJit graphs on disk, so that the second start of a model skips the capture before its first token.

Without them, each function is captured at its first call (tg_llama/engine/runner.py's Jit), scheduling every kernel in
Python (seconds for SmolLM2-135M on the CPU, even with every kernel compiled and cached). A captured graph
(tinygrad's CapturedJit) pickles as its kernels, compiled code included, and the buffers they run on. We write it
without any buffer's contents: a buffer of the model's own state (weights, KV caches, RoPE tables, sampler state) is
written as its name and mapped back onto the loaded model's buffer of that name, after checking its size, dtype and
device; every other buffer (the memory planner's arenas, outputs) must be one the graph writes itself, and is written as
its size and dtype and made anew, empty, on load. A graph that reads any other buffer is not written at all.

The file is `<backend cache>/graphs/<key>.pkl`; the key hashes everything the graphs depend on (`graph_key`), the
source of the modules that build them included. Graphs are looked up at the model's first call, not at load, so that a
model changed after load (quantized, say) finds the graphs of what it has become. A file that does not fit the model or
does not unpickle is ignored with a warning: the graphs are captured again and the file rewritten.

A graph file is code: its kernels are machine code that runs on replay, and unpickling builds tinygrad objects. So files
are read and written only in a backend cache folder that is this user's alone (tg_llama/backend.py's cache_folder, else
there are no graph files), and the reader builds only the exact (module, name) pairs that a captured graph holds
(GRAPH_CLASSES): a file that names anything else (os.system, builtins, a dotted name, any other tinygrad function) is
refused before anything in it runs. Not defended against: a crafted file that drives the allowed classes (their
constructors and __setstate__ build UOps and Tensors from its data), or that simply holds a kernel of its own, which
runs as machine code at the first replay. So the folder must stay the user's own; the allow-list only keeps a foreign
file from reaching the rest of Python.

Files of older code or settings stay until more than KEEP pile up; then the least recently used go. `tg-llama cache
--clear` removes them all, with the kernels.

Not here: sharing graph files between machines (a key holds the checkpoint's local path and mtime; on the CPU, the
CPU's features too, as its kernels are built for this CPU's instruction set)."""
from __future__ import annotations
import contextlib, dataclasses, functools, hashlib, importlib.metadata, os, pathlib, pickle, sys, types, warnings
from typing import TYPE_CHECKING, Callable
from tinygrad import Device, Tensor
from tinygrad.device import Buffer, MultiBuffer
from tinygrad.engine.jit import CapturedJit
from tinygrad.helpers import BEAM, JIT, JIT_BATCH_SIZE, getenv
from tinygrad.nn.state import get_state_dict
from tinygrad.uop.ops import Ops, UOp
from tg_llama import private_dir
from tg_llama.backend import on_cpu
from tg_llama.models.layer_graph import is_storage
if TYPE_CHECKING: from tg_llama.api import Model

FORMAT = 1  # bump when what the files hold changes: old files then get a new key and are never read
KEEP = 32   # graph files per backend: the least recently used go when there are more (each edit of the model code makes new keys)
# what find_class was asked for while loading the tiny model's captured graphs with tinygrad 0.14 (CPU and OpenCL, one and two
# devices, float32 and float16, int8/int4/GGUF-quantized: the same 16 each time); one missing costs a warning and a capture
GRAPH_CLASSES = frozenset({
  ("tinygrad.codegen.opt", "Opt"), ("tinygrad.codegen.opt", "OptOps"), ("tinygrad.dtype", "AddrSpace"), ("tinygrad.dtype", "ConstFloat"),
  ("tinygrad.dtype", "DType"), ("tinygrad.engine.jit", "CapturedJit"), ("tinygrad.helpers", "Target"), ("tinygrad.renderer", "Estimates"),
  ("tinygrad.tensor", "Tensor"), ("tinygrad.uop", "Ops"), ("tinygrad.uop.ops", "AxisType"), ("tinygrad.uop.ops", "CallInfo"),
  ("tinygrad.uop.ops", "KernelInfo"), ("tinygrad.uop.ops", "ParamArg"), ("tinygrad.uop.ops", "ProgramInfo"), ("tinygrad.uop.ops", "UOp")})

def graphs_enabled(requested: bool = True) -> bool:
  """Off when load(graph_cache=False), TG_LLAMA_GRAPH_CACHE=0, or tinygrad's JIT is off (nothing is captured then)."""
  return requested and os.environ.get("TG_LLAMA_GRAPH_CACHE", "1") != "0" and bool(JIT.value)

def model_jits(model: Model) -> dict: return model.runner.jits()

def model_state(model: Model) -> dict[str, Tensor]:
  """Every tensor the graphs may use that outlives a call: the model's weights, caches and RoPE tables, the sampler's state."""
  return get_state_dict(model.runner.state())

def state_buffers(state: dict[str, Tensor]) -> dict[str, UOp]:
  """The BUFFER uops behind the state tensors, by name (a tensor split over devices may hold several)."""
  out: dict[str, UOp] = {}
  seen: set[UOp] = set()
  for name, t in state.items():
    bufs = [u for u in t.uop.toposort() if is_storage(u)]
    for i, u in enumerate(bufs):
      if u not in seen: out[name if len(bufs) == 1 else f"{name}#{i}"] = u  # a tied weight keeps its first name
      seen.add(u)
  return out

def file_identity(path: pathlib.Path) -> tuple:
  """The checkpoint as seen on disk: path, size and mtime of the file, or of every file in the directory."""
  path = path.resolve()
  files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
  return tuple((str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)

def code_identity(model: Model) -> str:
  """The source of the modules that built the graphs: the model's layers' (a quantized Linear's too), the Model's, and every
  tg_llama module they import. Graphs replay the code that captured them, so an edit to any of these must miss the cache;
  the front ends (cli, bench, chat) are not among them."""
  return _source_identity([type(model).__module__, *{type(o).__module__ for o in _objects(model.llama)}])

def backend_identity(model: Model) -> tuple:
  """What the graphs owe to the backend's own code, where it has some: on the CPU, tg_llama/cpu's source (its layout and
  kernel choices) and the CPU's features (tinygrad builds CPU kernels with -march=native, for this CPU's instruction set)."""
  if not on_cpu(model.backend.device): return ()
  from tg_llama.cpu import graph, opts, tune  # all, whether this process has imported them yet or not: the key must not change
  return _source_identity([graph.__name__, opts.__name__]), graph.cpu_features(), tune.fingerprint()  # + the tuned choices in use

def _source_identity(todo: list[str]) -> str:
  # the source of these modules and of every tg_llama module they import (modules, and classes and functions of others)
  seen = set()
  while todo:
    if (name := todo.pop()) in seen or name.split(".")[0] != __name__.split(".")[0]: continue
    seen.add(name)
    for v in vars(sys.modules[name]).values():
      if isinstance(module := v.__name__ if isinstance(v, types.ModuleType) else getattr(v, "__module__", None), str): todo.append(module)
  return _hash_files(tuple(sorted(sys.modules[name].__file__ for name in seen)))

@functools.cache
def _hash_files(files: tuple[str, ...]) -> str:
  h = hashlib.sha256()
  for f in files: h.update(f.encode() + b"\0" + pathlib.Path(f).read_bytes() + b"\0")
  return h.hexdigest()

def _objects(obj, seen: set[int] | None = None) -> list:
  # obj and every object under it (attributes, list and dict items), Tensors left out
  seen = set() if seen is None else seen
  if id(obj) in seen or isinstance(obj, Tensor): return []
  seen.add(id(obj))
  items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else vars(obj).values() if hasattr(obj, "__dict__") else ()
  return [obj] + [o for item in items for o in _objects(item, seen)]

def graph_key(model: Model) -> str:
  runner, llama = model.runner, model.llama
  renderer = Device[model.backend.device].renderer
  state = sorted((name, u.dtype.name, u.arg.device, u.max_numel()) for name, u in state_buffers(model_state(model)).items())
  parts = (FORMAT, code_identity(model), _tinygrad_version(), model.backend.device, type(renderer).__name__,
           getattr(renderer, "target", None), type(renderer.compiler).__name__, getattr(renderer.compiler, "args", None), JIT.value, JIT_BATCH_SIZE.value,
           getenv("JITBEAM", BEAM.value), file_identity(model.checkpoint.path), repr(model.config), model.dtype.name,
           runner.max_context, runner.prefill_chunk, runner.slots, model.devices, (llama.start_layer, llama.end_layer), state,
           backend_identity(model))
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

def _tinygrad_version() -> str:
  try: return importlib.metadata.version("tinygrad")
  except importlib.metadata.PackageNotFoundError: return f"source at {pathlib.Path(sys.modules['tinygrad'].__file__).parent}"

def graph_path(model: Model) -> pathlib.Path | None:
  """The model's graph file; None when the backend has no cache folder of the user's own."""
  return None if model.backend.cache_dir is None else model.backend.cache_dir / "graphs" / f"{graph_key(model)}.pkl"

class GraphCache:
  """The captured graphs of some TinyJits (by name) in one file. `locate` gives the file for the state as it is now, and
  `state` the tensors whose buffers are written by name: both are asked again at each save. No file (None): nothing is
  read or written."""
  def __init__(self, jits: dict, state: Callable[[], dict[str, Tensor]], locate: Callable[[], pathlib.Path | None]):
    self.jits, self.state, self.locate = jits, state, locate
    self.path: pathlib.Path | None = None  # the file last read or written
    self.saved: set[str] = set()           # the JITs whose graphs that file holds
    self.loaded: tuple[str, ...] = ()      # the JITs whose graphs came from it, not from a capture
    self.looked = False

  @classmethod
  def for_model(cls, model: Model) -> GraphCache:
    return cls(model_jits(model), lambda: model_state(model), lambda: graph_path(model))

  def load(self) -> tuple[str, ...]:
    """Once, before the model's first call: install the file's graphs into the JITs that have not run yet. The names
    installed; none if there is no usable file."""
    if self.looked: return self.loaded
    self.looked = True
    try:
      self.path = self.locate()
      if self.path is None or not self.path.is_file(): return ()
      if (why := private_dir.problem(self.path)) is not None: raise PermissionError(why)
      with open(self.path, "rb") as f: data = _Reader(f, state_buffers(self.state())).load()
      if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(graphs := data.get("graphs"), dict)
              and set(graphs) <= set(self.jits) and all(isinstance(c, CapturedJit) for c in graphs.values())):
        raise pickle.UnpicklingError("not a graph file of this format")
    except Exception as e:  # a truncated or foreign pickle raises almost anything; all mean "capture again"
      warnings.warn(f"not using the captured graphs in {self.path or 'the cache'} ({type(e).__name__}: {e}); capturing them again",
                    RuntimeWarning)
      return ()
    fresh = {name: c for name, c in graphs.items() if self.jits[name].captured is None}
    for name, captured in fresh.items():
      jit = self.jits[name]
      jit.captured, jit.cnt = captured, 2  # what TinyJit holds after its capture run: the next call replays
    self.saved, self.loaded = set(graphs), tuple(fresh)
    with contextlib.suppress(OSError): os.utime(self.path)  # marks it recently used for _prune; only a hint
    return self.loaded

  def save_new(self) -> bool:
    """Write the file again if a JIT captured a graph that it does not hold yet; whether it was written."""
    graphs = {name: jit.captured for name, jit in self.jits.items() if jit.captured is not None}
    if set(graphs) <= self.saved: return False
    self.saved |= set(graphs)  # once: a file that cannot be written is not retried at every token
    names = {u: name for name, u in state_buffers(self.state()).items()}
    if outside := {name: bufs for name, c in graphs.items() if (bufs := _outside_buffers(c, set(names)))}:
      warnings.warn(f"not writing the captured graphs: {', '.join(outside)} read buffers that are not the model's state "
                    f"(was the model changed after its first call?): {next(iter(outside.values()))[:3]}", RuntimeWarning)
      return False
    try:
      if (path := self.locate()) is None: return False
      self.path = path
      private_dir.make(path.parent)
      with private_dir.replacing(self.path, ".tmp-", ".tmp") as f: _Writer(f, names).dump({"format": FORMAT, "graphs": graphs})
    except (OSError, pickle.PicklingError, RecursionError) as e:
      warnings.warn(f"could not write the captured graphs to {self.path} ({type(e).__name__}: {e})", RuntimeWarning)
      return False
    _prune(self.path.parent, KEEP)
    return True

def _prune(folder: pathlib.Path, keep: int):
  # the least recently used beyond `keep`; best effort, as another process may be pruning the same folder
  with contextlib.suppress(OSError):
    files = sorted(folder.glob("*.pkl"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
    for f in files[keep:]: f.unlink(missing_ok=True)

def _outside_buffers(captured: CapturedJit, state: set[UOp]) -> list[UOp]:
  # written empty, a buffer the graph reads without writing it (an old weight, say) would load as zeros
  return [u for u in captured._linear.toposort() if is_storage(u) and u not in state and u not in captured._written_uops]

def _signature(u: UOp) -> tuple: return (u.dtype, dataclasses.replace(u.arg, slot=0), u.max_numel(), u.tag)

class _Writer(pickle.Pickler):
  def __init__(self, f, names: dict[UOp, str]):
    super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
    self.names = names

  def persistent_id(self, obj):
    # a BUFFER uop pickles with its Buffer's contents (the weights!): write a reference instead
    if isinstance(obj, (Buffer, MultiBuffer)): raise pickle.PicklingError(f"a {obj} outside a BUFFER uop: its contents would be written")
    if type(obj) is not UOp or not is_storage(obj): return None
    if (name := self.names.get(obj)) is not None: return ("state", name, _signature(obj))
    return ("new", obj.dtype, obj.src, obj.arg, obj.tag)  # the old slot keeps buffers apart until the reader renumbers them

class _Reader(pickle.Unpickler):
  def __init__(self, f, buffers: dict[str, UOp]):
    super().__init__(f)
    self.buffers = buffers
    # pickle does not memoize persistent ids: without this, each reference to one buffer would get a buffer of its own
    self.made: dict[tuple, UOp] = {}

  def find_class(self, module: str, name: str):
    if (module, name) not in GRAPH_CLASSES: raise pickle.UnpicklingError(f"refusing {module}.{name}: not a class that a graph holds")
    return super().find_class(module, name)

  def persistent_load(self, pid):
    if pid[0] == "state":
      _, name, sig = pid
      if (u := self.buffers.get(name)) is None: raise pickle.UnpicklingError(f"the model has no buffer {name!r}")
      if _signature(u) != sig: raise pickle.UnpicklingError(f"buffer {name!r} is {_signature(u)} in the model, {sig} in the file")
      return u
    if pid[0] == "new":
      if pid not in self.made:
        _, dtype, src, arg, tag = pid
        # a fresh slot: the written one may be a live buffer's in this process, and equal uops are one uop in tinygrad
        self.made[pid] = UOp(Ops.BUFFER, dtype, src, dataclasses.replace(arg, slot=next(UOp.unique_num)), tag)
      return self.made[pid]
    raise pickle.UnpicklingError(f"unknown reference {pid[0]!r}")
