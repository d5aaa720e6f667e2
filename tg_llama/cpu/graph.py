"""Replay a captured TinyJit on DEV=CPU from C, on every core.

tinygrad 0.14's CPU backend runs a captured graph one kernel at a time from Python (~20 us of Python per
kernel, 600+ kernels per decoded token) and runs a kernel's per-core parts one after another on one thread:
the machine's other cores stay idle. This module hands the whole kernel list to a small C runner instead:
one ctypes call per replay, kernels called in order through their function pointers, each kernel's `core_id`
parts spread over a pool of threads with a spin barrier between kernels. The kernels are tinygrad's own, as
compiled; only the way they are launched changes.

The runner works from a table of uint64 words per kernel: function address, number of core parts, the slot
of the core_id argument, and the arguments. Buffer addresses are fixed once a graph is captured (its memory
plan does not move), so only the input buffers' addresses and the symbolic variables (start_pos) are written
into the table before each replay.

The engine's Jit (tg_llama/engine/runner.py) hands each graph it captures or loads on the CPU to install(). The table is
read from tinygrad's internals (the CapturedJit's linear, each kernel's program info and runtime, each buffer's address):
when this tinygrad lacks one, the graph replays through tinygrad, after one warning naming what is missing.

Not here: other backends (their own graph runners exist in tinygrad), graphs with copies or several devices
(those replay through tinygrad as before)."""
from __future__ import annotations
import contextlib, ctypes, functools, hashlib, os, pathlib, platform, subprocess, tempfile, threading, warnings
import numpy as np
import tinygrad.engine.realize as realize
from tinygrad.engine.jit import CapturedJit
from tinygrad.helpers import NUM_CPU_THREADS
from tinygrad.uop.ops import Ops, UOp
from tg_llama import private_dir
from tg_llama.backend import cache_folder
from tg_llama.cpu import fall_back

MAX_ARGS = 24  # arguments a kernel may take here (tinygrad's CPU programs allow 63; ours use about 10)
WORDS = 3 + MAX_ARGS  # per kernel: function, core parts, core_id slot, arguments

RUNNER_C = r"""
#include <stdint.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <immintrin.h>
#define MAX_ARGS %(max_args)d
#define WORDS %(words)d
#define MAX_NAPS 2000  // of 50 us: about 0.1-0.2 s
typedef void (*kernel_fn)(%(arg_types)s);

static int n_threads = 1;
static volatile const uint64_t *job_table;
static volatile int64_t job_n, job_gen;
static volatile int64_t bar_count, bar_flag;
static volatile long spin_after = 1L << 18;  // pauses spun after a replay before napping; 0: sleep until the next (tg_set_spin)
static pthread_mutex_t job_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_cv = PTHREAD_COND_INITIALIZER;
static volatile int64_t sleepers;

void tg_set_spin(long pauses) { spin_after = pauses; }

static void barrier(int *sense) {
  *sense = !*sense;
  if (__atomic_add_fetch(&bar_count, 1, __ATOMIC_ACQ_REL) == n_threads) {
    __atomic_store_n(&bar_count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&bar_flag, *sense, __ATOMIC_RELEASE);
  } else {
    // spin; yield the core after a while in case the thread we wait for is not running (more threads than cores)
    for (int spins = 0; __atomic_load_n(&bar_flag, __ATOMIC_ACQUIRE) != *sense; spins++) {
      if (spins < 4096) _mm_pause(); else sched_yield();
    }
  }
}

static void run_part(int tid, int *sense) {
  // read the job once: after the last barrier the main thread may already be posting the next one
  const uint64_t *t = (const uint64_t *)job_table;
  const int64_t n = job_n;
  for (int64_t i = 0; i < n; i++, t += WORDS) {
    for (uint64_t core = tid; core < t[1]; core += n_threads) {
      uint64_t a[MAX_ARGS];
      for (int j = 0; j < MAX_ARGS; j++) a[j] = t[3 + j];
      if (t[2] < MAX_ARGS) a[t[2]] = core;
      ((kernel_fn)t[0])(%(arg_list)s);
    }
    barrier(sense);
  }
}

static void *worker(void *arg) {
  int tid = (int)(intptr_t)arg, sense = 0;
  int64_t seen = 0;
  for (;;) {
    // spin for a few milliseconds after each replay (the next token's comes soon), nap for a while in short naps, then
    // sleep until the next job: an idle process (a chat waiting for its user, a server between requests) takes no core
    long naps = 0;
    for (long spins = 0; __atomic_load_n(&job_gen, __ATOMIC_ACQUIRE) == seen; spins++) {
      if (spins < spin_after) _mm_pause();
      else if (spin_after == 0 || naps >= MAX_NAPS) {  // asleep until tg_run posts a job
        pthread_mutex_lock(&job_mu);
        __atomic_add_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&job_gen, __ATOMIC_SEQ_CST) == seen) pthread_cond_wait(&job_cv, &job_mu);
        __atomic_sub_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&job_mu);
      } else { struct timespec ts = {0, 50000}; nanosleep(&ts, 0); naps++; }
    }
    seen++;
    run_part(tid, &sense);
  }
  return 0;
}

static int main_sense = 0;

int tg_start(int threads) {
  // once per library: dlopen hands a process the library it already loaded, and a second pool would share its barrier
  static int started = 0;
  if (started) return 0;
  started = 1;
  n_threads = threads;
  for (int i = 1; i < threads; i++) {
    pthread_t th;
    if (pthread_create(&th, 0, worker, (void *)(intptr_t)i)) return -1;
    pthread_detach(th);
  }
  return 0;
}

void tg_run(const uint64_t *table, int64_t n) {
  job_table = table; job_n = n;
  __atomic_add_fetch(&job_gen, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST)) {  // a worker counts itself before it looks at job_gen: none is missed
    pthread_mutex_lock(&job_mu);
    pthread_cond_broadcast(&job_cv);
    pthread_mutex_unlock(&job_mu);
  }
  run_part(0, &main_sense);  // ends with a barrier: every thread is done with every kernel
}
"""

def _source() -> str:
  return RUNNER_C % {"max_args": MAX_ARGS, "words": WORDS, "arg_types": ", ".join(["uint64_t"] * MAX_ARGS),
                     "arg_list": ", ".join(f"a[{i}]" for i in range(MAX_ARGS))}

@functools.cache
def runner() -> ctypes.CDLL:
  """The C runner, loaded with its thread pool started. Built once per source, compiler and CPU (it is built for this
  CPU's instruction set) into the CPU backend's cache folder; when that folder is not the user's alone, built afresh in
  a private temporary folder, so that no library another user could have planted is ever loaded."""
  src, cache = _source(), cache_folder("cpu")
  lib = None if cache is None else cache / f"graph_runner_{runner_key(src)}.so"
  with tempfile.TemporaryDirectory(prefix="tg-llama-runner-") as tmp:  # private (0700); gone once the library is loaded
    if lib is None or not lib.is_file() or private_dir.problem(lib) is not None: lib = _build(src, pathlib.Path(tmp), lib)
    dll = ctypes.CDLL(str(lib))
  dll.tg_run.argtypes, dll.tg_run.restype = [ctypes.c_void_p, ctypes.c_int64], None
  dll.tg_set_spin.argtypes, dll.tg_set_spin.restype = [ctypes.c_long], None
  if dll.tg_start(threads()) != 0: raise OSError("could not start the CPU graph's threads")
  return dll

def runner_key(src: str) -> str:
  """The source, the compiler and the CPU's features: -march=native code must not run on another CPU."""
  clang = subprocess.run(["clang", "--version"], check=True, capture_output=True, text=True).stdout
  return hashlib.sha256("\0".join((src, clang, cpu_features())).encode()).hexdigest()[:16]

def cpu_features() -> str:
  """This CPU's instruction-set features, as the OS lists them: code built with -march=native runs only where they are all."""
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f: return next((line for line in f if line.startswith(("flags", "Features"))), "")  # x86, ARM
  return f"{platform.machine()} {platform.processor()} {platform.platform()}"

def _build(src: str, tmp: pathlib.Path, lib: pathlib.Path | None) -> pathlib.Path:
  """Compile the runner in `tmp`; then copy it to `lib` (whole or not at all), if there is one. The library to load."""
  (c := tmp / "runner.c").write_text(src)
  subprocess.run(["clang", "-O2", "-march=native", "-shared", "-fPIC", "-pthread", str(c), "-o", str(out := tmp / "r.so")],
                 check=True, capture_output=True)
  if lib is None: return out
  try:
    with private_dir.replacing(lib, ".tmp-graph_runner_", ".so") as f: f.write(out.read_bytes())
  except OSError: return out  # a cache that cannot be written: this process's own copy still runs
  return lib

@functools.cache
def runner_available() -> bool:
  """Whether the runner builds and loads here; if not, graphs replay through tinygrad (with one warning)."""
  try: runner()
  except (OSError, subprocess.CalledProcessError) as e:
    detail = e.stderr.decode(errors="replace").strip()[-300:] if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
    warnings.warn(f"the CPU graph runner is unavailable ({detail}); captured graphs replay through tinygrad, slower", RuntimeWarning)
    return False
  return True

def threads() -> int: return max(1, NUM_CPU_THREADS.value)

def nap_between_replays():
  """The runner's threads sleep right after a replay until the next one, instead of spinning a few milliseconds and then
  napping 50 us at a time: for a process that shares its cores with another that runs in between (a pipeline's stages
  on one machine), whose cores the spinning and the naps' wake-ups would take."""
  if runner_available(): runner().tg_set_spin(0)

_replaying = threading.Lock()  # one job table at a time: the runner's threads are shared by every graph

class CPUGraph:
  """The kernel table of one captured linear, bound to its buffers."""
  def __init__(self, linear: UOp):
    self.table = np.zeros((len(linear.src), WORDS), dtype=np.uint64)
    self.input_slots: list[tuple[int, int, int]] = []  # (row, column, input index)
    self.var_slots: list[tuple[int, int, str]] = []    # (row, column, variable name)
    for row, call in enumerate(linear.src):
      prg = call.src[0]
      info, args = prg.arg, realize.get_call_arg_uops(call)
      bufs = [args[i] for i in info.globals]
      runtime = realize.get_runtime(call.src[1].device, prg)
      self.table[row, 0], self.table[row, 1], self.table[row, 2] = runtime.addr, int(info.global_size[0]), MAX_ARGS
      for col, b in enumerate(bufs):
        if b.op is Ops.PARAM: self.input_slots.append((row, 3 + col, b.arg.slot))
        else: self.table[row, 3 + col] = _address(b.buffer)
      for j, v in enumerate(info.vars):
        if v.expr == "core_id": self.table[row, 2] = len(bufs) + j
        else: self.var_slots.append((row, 3 + len(bufs) + j, v.expr))
    self.lib = runner()

  def __call__(self, input_uops, var_vals: dict[str, int]):
    for row, col, i in self.input_slots: self.table[row, col] = _address(input_uops[i].buffer)
    for row, col, name in self.var_slots: self.table[row, col] = var_vals[name]
    with _replaying: self.lib.tg_run(self.table.ctypes.data, len(self.table))

def _address(buf) -> int: return buf.ensure_allocated().get_buf(buf.device).va_addr

def written_buffers(linear: UOp) -> set[UOp]:
  """The buffers the calls write and do not read, as CapturedJit._written_uops finds them; the arguments are buffers
  or bitcast/shrink views of one (`supported`), so each is its base buffer, without tinygrad's symbolic contiguous_view."""
  out: set[UOp] = set()
  for call in linear.src:
    args, (outs, ins) = realize.get_call_arg_uops(call), realize.get_call_outs_ins(call)
    out.update(b for b in (_base(args[i]) for i in set(outs) - set(ins)) if b.op is Ops.BUFFER)
  return out

def _base(b: UOp) -> UOp:
  """The UOp under a bitcast/shrink view: a BUFFER for a view of one (a fixed address); views of inputs are not handled."""
  while b.op in (Ops.BITCAST, Ops.SHRINK): b = b.src[0]
  return b

def supported(captured: CapturedJit) -> bool:
  """Every call a CPU kernel on one device, with arguments that are plain buffers (no views of inputs), not too many."""
  for call in captured.linear.src:
    if call.src[0].op is not Ops.PROGRAM or not isinstance(call.src[1].device, str) or not call.src[1].device.startswith("CPU"): return False
    if not all(b.op is Ops.PARAM or _base(b).op is Ops.BUFFER for b in realize.get_call_arg_uops(call)): return False
    if len(call.src[0].arg.globals) + len(call.src[0].arg.vars) > MAX_ARGS: return False
  return True

class ThreadedJit(CapturedJit):
  """A CapturedJit replayed by CPUGraph; pickles as a plain CapturedJit."""
  @classmethod
  def of(cls, captured: CapturedJit) -> ThreadedJit:
    """`captured`, its kernel table built now: what it needs of tinygrad's internals is found here, or not at all."""
    self = cls(captured.ret, captured._linear, captured.expected_names, captured.expected_input_info)
    self.graph = CPUGraph(self.linear)
    self._written_uops = written_buffers(self.linear)  # tinygrad's own way took 0.3 s a graph at load
    return self

  def __call__(self, input_uops, var_vals):
    if any(u in self._written_uops for u in input_uops): return super().__call__(input_uops, var_vals)
    self.graph(input_uops, var_vals)
    return self.ret

  def __reduce__(self): return CapturedJit, (self.ret, self._linear, self.expected_names, self.expected_input_info)

def install(jit) -> None:
  """Make a TinyJit that holds a captured graph replay it through CPUGraph, when it runs CPU kernels only.
  TG_LLAMA_CPU_GRAPH=0 keeps tinygrad's own replay, as does a tinygrad that lacks what the table is read from."""
  captured = jit.captured
  if captured is None or isinstance(captured, ThreadedJit) or os.environ.get("TG_LLAMA_CPU_GRAPH", "1") == "0": return
  try:
    if not supported(captured) or not runner_available(): return
    threaded = ThreadedJit.of(captured)
  except AttributeError as e:  # read from tinygrad's CapturedJit, engine.realize, a kernel's program info or runtime, a buffer
    fall_back("replaying captured graphs on the CPU", f"{getattr(e.obj, '__name__', type(e.obj).__name__)}.{e.name}")
    return
  jit.captured = threaded
