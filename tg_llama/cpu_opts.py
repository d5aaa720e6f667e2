"""Kernel optimizations for the matrix-vector products of one-token decoding on tinygrad's CPU backend.

tg_llama/linear.py writes a one-token product as a reduction split into lanes: rows x (K/A) x A, both reduce axes.
tinygrad 0.14's hand-coded heuristic upcasts the row axis of such a kernel by 3 once it has 1024 rows or more,
which keeps clang from vectorizing the lanes (48 scalar accumulators), and threads it only above 128K
operations per thread. For these kernels we choose instead: split the rows over the cores (THREAD) and unroll
the lane axis into one vector, nothing else. Measured on DEV=CPU, 2 cores, Q4_1 blocks (GB/s of weights):
1536x576 9.6 -> 23.3, 3072x576 10.0 -> 34.7, 49152x576 10.0 -> 30.0, 576x576 13.7 -> 23.6 (tg_llama/cpu_graph.py
runs the per-core parts on separate threads; tinygrad alone runs them one after another).

Every other kernel, and every kernel of other backends or under BEAM search, keeps tinygrad's own choice. The
choice is made where tinygrad calls its heuristic, so compiled kernels and their caches are tinygrad's as usual.
tinygrad lowers kernels in a pool of spawned worker processes: install() makes that pool's workers install the
same choice when they start."""
from __future__ import annotations
import atexit, multiprocessing
import tinygrad.codegen.opt.heuristic as heuristic
import tinygrad.codegen.opt.search as search
import tinygrad.engine.realize as realize
import tinygrad.engine.worker as worker
from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
from tinygrad.helpers import NUM_CPU_THREADS, PARALLEL, getenv
from tinygrad.uop.ops import AxisType

_hand_coded = heuristic.hand_coded_optimizations
MAX_LANES = 64

def is_lanes_reduction(k) -> bool:
  """rows x (K/A) x A with both trailing axes reduced, rows and A known, A a lane count (see linear.lanes)."""
  shape, types = k.full_shape, k.axis_types
  return (len(shape) == 3 and types[0] in (AxisType.WEAK, AxisType.LOOP, AxisType.GLOBAL) and types[1] is AxisType.REDUCE
          and types[2] is AxisType.REDUCE and all(isinstance(s, int) for s in shape) and 4 <= shape[2] <= MAX_LANES)

def lanes_reduction_opts(k):
  """Threads over the rows and the lane axis unrolled, or None when the kernel does not take them."""
  if k.ren.target.device != "CPU" or not is_lanes_reduction(k): return None
  ok = k.copy()
  try:
    threads = NUM_CPU_THREADS.value
    if threads > 1 and k.full_shape[0] % threads == 0: ok.apply_opt(Opt(OptOps.THREAD, 0, threads))
    ok.apply_opt(Opt(OptOps.UNROLL, 1, 0))  # the second reduce axis, the lanes, whole
  except KernelOptError: return None
  return ok

def hand_coded_optimizations(k):
  return lanes_reduction_opts(k) or _hand_coded(k)

def install():
  """Route tinygrad's heuristic through ours, in this process and in the compile workers it starts (idempotent)."""
  heuristic.hand_coded_optimizations = hand_coded_optimizations  # looked up at each use
  realize.get_worker_pool = search.get_worker_pool = get_worker_pool

def _init_worker():
  worker._init_worker()
  heuristic.hand_coded_optimizations = hand_coded_optimizations

def get_worker_pool():
  """tinygrad's compile pool (engine/worker.py's get_worker_pool), its workers started with our heuristic."""
  if multiprocessing.current_process().daemon or PARALLEL == 0: return None
  if worker.worker_pool is not None and not getattr(worker.worker_pool, "tg_llama", False): worker.terminate_worker_pool()
  if worker.worker_pool is None:
    worker.worker_pool = pool = worker._WorkerContext().Pool(PARALLEL.value, _init_worker, (), getenv("BEAM_MAX_TASKS_PER_CHILD", 16))
    pool.tg_llama = True
    atexit.register(pool.close)
  return worker.worker_pool
