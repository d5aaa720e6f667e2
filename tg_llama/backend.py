"""Backends: which tinygrad device runs the model, in what compute dtype, with which kernel cache.

Chosen by `--backend`, else TG_LLAMA_BACKEND, else tinygrad's own DEV, else the first device tinygrad can open
(an OpenCL that runs on the CPU, like PoCL, loses to the CPU backend there). Each backend keeps its compiled
kernels in its own folder, `~/.cache/tg-llama/<backend>/cache.db` ($XDG_CACHE_HOME respected, $TG_LLAMA_CACHE
moves the root), so one backend's kernels can be cleared or copied without touching the others. Resolving a
backend sets up the process for it (kernel cache folder, tinygrad's default device): load() does it first thing.

What a cache holds runs as code (tinygrad unpickles cache.db's rows, graphs hold compiled kernels, the CPU's graph
runner is a shared library), so a backend's folder is used only while it is this user's alone (tg_llama/private_dir.py):
made 0700 with a 0600 cache.db, and refused, with one warning, when the root, the folder or a file of ours in it is
another user's or writable by group or others. Then nothing is cached: kernels go to a temporary folder of the process.

A backend whose kernels need more than tinygrad gives them keeps that in a package of its own, imported only when the backend
is resolved: tg_llama/cpu/ (the CPU's graph runner and kernel choices). What it asks of the model's code is a KernelLayout:
how reductions are written so that its code generator vectorizes them (the model, written for any layout, asks for the
one of the device its tensors are on).

Not here: spreading one model over several devices (see load_shard), choosing kernels (BEAM is tinygrad's knob)."""
from __future__ import annotations
import contextlib, ctypes, functools, os, pathlib, sqlite3, threading, warnings
from dataclasses import dataclass
from typing import Callable
from tinygrad import Device, dtypes
from tinygrad.dtype import DType
from tinygrad.helpers import DEV, Context
import tinygrad.helpers as tg_helpers
from tg_llama import private_dir
from tg_llama.errors import TgLlamaError

# our names -> tinygrad device prefixes
BACKENDS = {"cpu": "CPU", "opencl": "CL", "cuda": "CUDA", "nv": "NV", "amd": "AMD", "hip": "HIP", "metal": "METAL",
            "webgpu": "WEBGPU", "null": "NULL"}
ALIASES = {"cl": "opencl"}
NAMES = {prefix: name for name, prefix in BACKENDS.items()}
# what tg-llama and tinygrad write in a backend's cache folder: trusted only when they are the user's own, cleared by name
CACHE_FILES = ("cache.db", "cache.db-wal", "cache.db-shm", "cache.db-journal", "graphs/*.pkl", "graph_runner_*.so", "tuned.json")
PARTIAL_FILES = ("graphs/.tmp-*.tmp", ".tmp-graph_runner_*.so", ".tmp-tuned-*.json")  # being written, or left by a process that died writing
# where each backend's set-up is written down (NV is NVIDIA without CUDA's runtime, HIP is AMD through ROCm)
SETUP_DOCS = {"cpu": "cpu", "opencl": "opencl", "cuda": "cuda", "nv": "cuda", "amd": "amd", "hip": "amd", "metal": "metal"}

@dataclass(frozen=True)
class Backend:
  name: str                 # ours: "cpu", "opencl", "cuda", ...
  device: str               # tinygrad's: "CPU", "CL", "CUDA:1", ...
  dtype: DType              # the compute dtype for weights, activations and the KV cache
  cache_dir: pathlib.Path | None  # compiled kernels (cache.db) and anything else kept between runs; None: not this user's alone

@dataclass(frozen=True)
class KernelLayout:
  """How the model writes its reductions for a backend: the same numbers in any layout, summed in another order."""
  dot_lanes: int = 1        # a dot product over a head (decode attention's scores) as this many independent partial sums
  matvec_lanes: int = 1     # the most lanes of a one-token matrix-vector product (tg_llama/linear.py's lanes_matvec)
  even_groups: bool = False # an odd group of query heads per KV head padded to an even count (decode attention)
  panel: int = 0            # a prefill chunk's weight written out as panels of this many output rows, each (in, rows)

def kernel_layout(device: str | tuple[str, ...]) -> KernelLayout:
  """The layout for tensors on `device` (or on devices of one backend): the plain one, but on the CPU its own."""
  if not on_cpu(device): return KernelLayout()
  from tg_llama import cpu
  return cpu.LAYOUT

def on_cpu(device: str | tuple[str, ...]) -> bool:
  """Whether `device` (tinygrad's name, or a tuple of them for a tensor split over devices) is the CPU backend's."""
  return (device[0] if isinstance(device, tuple) else device).split(":")[0] == "CPU"

def free_buffer_cache(devices: tuple[str, ...]):
  """Free the buffers tinygrad keeps for reuse (its LRUAllocator, by exact size) on these devices: those loading leaves (each
  tensor's raw bytes, the pieces split from them; for Llama 3.2 1B's Q4_1 blocks, 200 MB) and those of a graph's runs
  before its capture fit nothing that runs later."""
  for name in devices:
    if (free := getattr(Device[name].allocator, "free_cache", None)) is not None: free()

def cache_root() -> pathlib.Path:
  if root := os.environ.get("TG_LLAMA_CACHE"): return pathlib.Path(root).expanduser().absolute()
  return (pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tg-llama").absolute()

def backend_cache_dir(name: str) -> pathlib.Path: return cache_root() / name

def cache_folder(name: str) -> pathlib.Path | None:
  """The backend's cache folder, made private if new; None (after one warning) when another user could have written
  what it holds: the cache root, the folder, its graphs folder or any file of ours in it."""
  folder = backend_cache_dir(name)
  try:
    if (why := private_dir.first_problem([cache_root(), private_dir.make(folder)])) is None:
      private_dir.touch(folder / "cache.db")  # only in a folder of ours
      why = private_dir.first_problem([folder / "graphs", *(f for pattern in CACHE_FILES for f in folder.glob(pattern))])
  except OSError as e: why = f"cannot create it ({e.strerror or e})"
  return folder if why is None else _no_cache(folder, why)

def _no_cache(folder: pathlib.Path, why: str) -> None:
  _warn_once(f"not using the cache in {folder}: {why}; running without a cache (make it yours alone, chmod go-w, "
             f"or set TG_LLAMA_CACHE to a folder of your own)")

@functools.cache
def _warn_once(message: str): warnings.warn(message, RuntimeWarning, stacklevel=4)

def known_backends() -> list[str]: return sorted(set(BACKENDS) - {"null"})

def resolve_backend(name: str | None = None, say: Callable[[str], None] | None = None) -> Backend:
  """The backend named (or the environment's), set up for this process: tinygrad's kernel cache points at its
  folder, and tensors made without a device land on it. Raises if its device does not open here."""
  name = name or os.environ.get("TG_LLAMA_BACKEND")
  device = _named_device(name) if name else _default_device()
  backend_name = NAMES.get(device.split(":")[0], device.split(":")[0].lower())
  # before the device opens: tinygrad compiles a few kernels of its own when it opens some devices (the CPU's)
  configure_cache(cache_dir := cache_folder(backend_name))
  if (probe_error := _probe(device)) is not None:
    with Context(CACHELEVEL=0): others = [n for n in available_backends() if n != backend_name]
    doc = f"; set it up: backends/{SETUP_DOCS[backend_name]}/README.md" if backend_name in SETUP_DOCS else ""
    raise TgLlamaError(f"backend {backend_name!r} (tinygrad device {device}) is not available on this machine ({probe_error}); "
                       f"available here: {', '.join(others) or 'none'}{doc}")
  prefix = device.split(":")[0]
  if prefix == "CPU":
    from tg_llama import cpu  # only here: no other backend imports it
    cpu.install(say)
  if DEV.device != prefix:  # a backend named by us, not by DEV: tinygrad's default device follows it
    DEV.value = prefix
    os.environ["DEV"] = prefix  # as tinygrad does, for the processes it spawns
  return Backend(backend_name, device, compute_dtype(device), cache_dir)

def compute_dtype(device: str) -> DType:
  # float32 on the CPU: tinygrad's CPU kernels are fastest there (half and bfloat16 convert per element, measured)
  if device.split(":")[0] in ("CPU", "PYTHON"): return dtypes.float32
  # half where the device has it natively. PoCL's OpenCL lacks cl_khr_fp16, and tinygrad 0.14 fails to lower the
  # model in emulated half there ("UOp verification failed"), so such a device gets float32
  return dtypes.float16 if dtypes.half in Device[device].renderer.supported_dtypes() else dtypes.float32

def available_backends() -> list[str]:
  """Our names of the backends whose device opens here (each probe opens the device: about a second for all)."""
  return [name for name in known_backends() if _probe(BACKENDS[name]) is None]

_db = threading.local()

def thread_db_connection() -> sqlite3.Connection:
  """tinygrad's db_connection with a connection per thread (sqlite objects belong to the thread that made them, and the
  engine's loop thread compiles as well as the main thread) to the current CACHEDB; opened as tinygrad opens its own."""
  if getattr(_db, "path", None) != tg_helpers.CACHEDB:
    if getattr(_db, "conn", None) is not None: _db.conn.close()
    os.makedirs(os.path.dirname(tg_helpers.CACHEDB), exist_ok=True)
    _db.conn, _db.path = sqlite3.connect(tg_helpers.CACHEDB, timeout=60, isolation_level="IMMEDIATE"), tg_helpers.CACHEDB
    with contextlib.suppress(sqlite3.OperationalError): _db.conn.execute("PRAGMA journal_mode=WAL").fetchone()
    _db.conn.execute("PRAGMA synchronous=NORMAL")
  return _db.conn

def configure_cache(folder: pathlib.Path | None) -> pathlib.Path:
  """Point tinygrad's compiled-kernel cache at `folder`/cache.db, before anything compiles for the backend; with no
  folder, at a private temporary one that lives as long as the process (so no other user's kernels are ever read).

  tinygrad reads CACHEDB from the environment once, at import, and compiles in worker processes that it spawns
  (they import tinygrad afresh): so the module value, the open connection and the environment all change here,
  and workers started with the old path are stopped, to be respawned on the next compile."""
  tg_helpers.db_connection = thread_db_connection
  db = str((folder or private_dir.temp_folder("kernels")) / "cache.db")
  if tg_helpers.CACHEDB == db and os.environ.get("CACHEDB") == db: return pathlib.Path(db)
  os.environ["CACHEDB"] = tg_helpers.CACHEDB = db
  if tg_helpers._db_connection is not None:
    tg_helpers._db_connection.close()
    tg_helpers._db_connection = None
  tg_helpers._db_tables.clear()
  from tinygrad.engine import worker
  if worker.worker_pool is not None: worker.terminate_worker_pool()
  return pathlib.Path(db)

def canonical_name(name: str) -> str:
  """Our name for a backend named by the user ("CL:1" -> "opencl"); raises on an unknown one."""
  base = ALIASES.get(key := name.lower().partition(":")[0], key)
  if base not in BACKENDS: raise TgLlamaError(f"unknown backend {name!r}; known: {', '.join(known_backends())}")
  return base

def _named_device(name: str) -> str:
  base, index = canonical_name(name), name.partition(":")[2]
  if index and not index.isdigit(): raise TgLlamaError(f"bad device index in backend {name!r}; write it as {base}:N, e.g. {base}:1")
  return BACKENDS[base] + (f":{index}" if index else "")

def _default_device() -> str:
  if DEV.device: return DEV.device
  # tinygrad opens devices until one works; what they compile on opening is not worth caching (we don't know where yet)
  try:
    with Context(CACHELEVEL=0): device = Device.DEFAULT
  except Exception as e: raise TgLlamaError(f"no tinygrad device opens on this machine ({_first_line(e)}); known backends: "
                                            f"{', '.join(known_backends())}, see backends/<name>/README.md") from None
  # tinygrad tries OpenCL before the CPU backend: an OpenCL that runs on the CPU (PoCL) is several times slower there
  return "CPU" if device == "CL" and _is_cpu_opencl() else device

def _is_cpu_opencl() -> bool:
  from tinygrad.runtime.autogen import opencl as cl
  kind = ctypes.c_uint64()
  cl.clGetDeviceInfo(Device["CL"].cl_dev, cl.CL_DEVICE_TYPE, ctypes.sizeof(kind), ctypes.byref(kind), None)
  return bool(kind.value & cl.CL_DEVICE_TYPE_CPU)

def _probe(device: str) -> str | None:
  """None when the device opens and has a renderer, else why not (tinygrad raises many kinds of errors for this)."""
  try:
    _ = Device[device].renderer
    return None
  except Exception as e: return _first_line(e)

def _first_line(e: Exception) -> str: return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
