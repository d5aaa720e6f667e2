"""Kernel optimizations on tinygrad's CPU backend: the matrix products and attention of decoding and of a prefill chunk.

tg_llama/linear.py writes a one-token product in the CPU's layout (tg_llama/cpu/__init__.py's LAYOUT) as a reduction split
into lanes: rows x (K/A) x A, both reduce axes. tinygrad 0.14's hand-coded heuristic upcasts the row axis of such a kernel
by 3 once it has 1024 rows or more, which keeps clang from vectorizing the lanes (48 scalar accumulators), and threads it
only above 128K operations per thread. For these kernels we choose instead: split the rows over the cores (THREAD) and
unroll the lane axis into one vector, nothing else; attention's weights x values, a reduction over the cache length,
gets its head dimension upcast whole (independent vector accumulators instead of one chain per output); a prefill
chunk's matrix product gets a register tile and threads. Measured on DEV=CPU, 2 cores, Q4_1 blocks (GB/s of weights):
1536x576 9.6 -> 23.3, 3072x576 10.0 -> 34.7, 49152x576 10.0 -> 30.0, 576x576 13.7 -> 23.6 (tg_llama/cpu/graph.py
runs the per-core parts on separate threads; tinygrad alone runs them one after another). Decode attention over
300 positions (9 heads, GQA 3, head_dim 64): 437 -> 44 us per layer with models/blocks.py's decode_attention; a prefill
chunk's attention (64 queries over 256 positions) 9.5 -> 3.2 ms per layer on one core with its prefill_attention.

Every other kernel, and every kernel of other backends or under BEAM search, keeps tinygrad's own choice. The
choice is made where tinygrad calls its heuristic, so compiled kernels and their caches are tinygrad's as usual.
No per-kernel seam of tinygrad's serves here: its one, KernelInfo.opts_to_apply (the opts a CONTIGUOUS carries into its
kernel), is fixed while the tensor graph is built, before tinygrad splits it into kernels and numbers their axes, where
ours are read off the lowered kernel's shape (and it would bind them on every device and under BEAM too). So install()
rebinds tinygrad's heuristic for the whole process, to a function that gives tinygrad's own choice for every kernel not
ours (every kernel of another device). tinygrad lowers kernels in a pool of spawned worker processes: install() makes
that pool's workers install the same choice when they start. When tinygrad lacks what this rebinds or reads, nothing
is rebound (one warning)."""
from __future__ import annotations
import atexit, multiprocessing
import tinygrad.codegen.opt.heuristic as heuristic
import tinygrad.codegen.opt.search as search
import tinygrad.engine.realize as realize
import tinygrad.engine.worker as worker
from tinygrad import Device, dtypes
from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.helpers import BEAM, NUM_CPU_THREADS, PARALLEL, getenv, prod
from tinygrad.uop.ops import AxisType, Ops, UOp
from tg_llama.cpu import LAYOUT, fall_back, missing, vectors

_theirs = getattr(heuristic, "hand_coded_optimizations", None)  # tinygrad's, taken before install() rebinds it
MAX_LANES = LAYOUT.matvec_lanes  # the widest lane axis the CPU's layout writes

def _is_decode_length(s) -> bool:
  """The cache length one decoded token attends over: start_pos + 1 (a prefill chunk's is start_pos + T)."""
  return isinstance(s, UOp) and s.op is Ops.ADD and s.src[1].op is Ops.CONST and s.src[1].arg == 1

def _varies(k, buf, axis: int) -> bool:
  """Whether the kernel's buffer `buf` is indexed by `axis` (its index is that axis's range, or computed from it)."""
  return k.rngs[axis] in buf.src[1].get_idx().toposort()

def _broadcast(k, axis: int) -> bool:
  """Whether one of the kernel's buffers does not vary along `axis` (its values are reused across it)."""
  return any(not _varies(k, b, axis) for b in k.bufs)

def _vector(k, rows: int, reduce: int) -> bool:
  """Whether one of the kernel's buffers varies along the `reduce` axis but not along `rows` (a vector every row reads)."""
  return any(_varies(k, b, reduce) and not _varies(k, b, rows) for b in k.bufs)

def _reads(k, dtype) -> bool:
  """Whether one of the kernel's buffers holds values of `dtype` (int8: a Q8_0 or int8 weight's)."""
  return any(getattr(b.src[0].dtype, "base", b.src[0].dtype) == dtype for b in k.bufs)

def _int8_steps(k, blocks: int) -> list[Opt]:
  """One row's product of int8 weights: 3 blocks of lanes a step where they divide the blocks (see rule), none for other
  weights. Never 2: clang 14 then leaves the kernel scalar on the AMD EPYC (Zen 4) for Q8_0 blocks 2048 wide (8192x2048,
  one core: a batch loop of 4 rows 133 ms with 2 a step, 5.4 ms with none; one row 32.8 ms with 2 a step in the 32-lane
  layout, 1.4 ms in quantize.py's 16 lanes with none; 2 was never measured to win)."""
  return [Opt(OptOps.UNROLL, 0, 3)] if blocks % 3 == 0 and _reads(k, dtypes.int8) else []

def loop_opts(k, at_a_time: int | None = None) -> list[Opt]:
  """A quantized decode batch (batch x rows x (K/A) x A) as one row's code (its lanes unrolled whole) for each row,
  `at_a_time` rows at a time (default BATCH_ROWS; 2 where those do not divide the batch): each weight decoded once for
  those rows, 16 x 4 accumulators in registers for 4. Measured on the AMD EPYC (Zen 4, AVX-512), Q4_1, float16
  scales, 4 rows at a time against one (tune.py's timer: both cores' parts on one core): 1536x576 8 rows 0.85 -> 0.43 ms,
  4 rows 0.43 -> 0.24, 2 rows 0.25 -> 0.17; 576x576 8 rows 0.32 -> 0.17; 8192x2048 8 rows 10.4 -> 7.6; 2048x8192 8 rows
  9.8 -> 6.8, 4 rows 4.8 -> 3.3 (8 rows at a time 1.2-6.5x slower than 4, 4 rows with 8 lanes a step 1.2-1.6x). Since
  clang's vectorizer bundles at most a register of floats (vectors.py), 4 rows at a time of 1536x576 take 0.43 -> 0.28 ms
  for 8 rows, and int8 blocks take rows at a time too: the Q8_0 head 49152x576, 8 rows 13.0 -> 8.3 ms, 4 rows 6.5 -> 4.1,
  2 rows 3.2 -> 2.9 (before that cap, 4 at a time gained nothing there, 12.3-13.3 ms either way, and 2 lost: 3.2 -> 4.4).
  One row at a time, int8 blocks take _int8_steps; so they do where the vectorizer is not capped (the probe's choice there)."""
  n, rows = at_a_time or BATCH_ROWS, k.full_shape[0]
  if not vectors.CAP and _reads(k, dtypes.int8): n = 1
  step = next((s for s in (n, 2) if 1 < s <= n and rows % s == 0), None)
  return ([Opt(OptOps.UPCAST, 0, step)] if step else []) + [Opt(OptOps.UNROLL, 1, 0)] + ([] if step else _int8_steps(k, k.full_shape[2]))

def rule(k) -> tuple[str, list[Opt]] | None:
  """The name of our rule that claims the kernel (its kind, as tg_llama/cpu/tune.py's table names it) and its default
  choice, or None for tinygrad's."""
  shape, types = k.full_shape, k.axis_types
  reduce = [i for i, t in enumerate(types) if t is AxisType.REDUCE]
  outs = [i for i, t in enumerate(types) if t in (AxisType.WEAK, AxisType.LOOP, AxisType.GLOBAL)]
  if len(reduce) + len(outs) != len(shape) or not outs: return None
  known = [isinstance(s, int) for s in shape]
  threads = NUM_CPU_THREADS.value
  def thread_axis(axes: list[int]) -> int | None:  # the first of these output axes the cores divide
    return next((i for i in axes if known[i] and threads > 1 and shape[i] % threads == 0), None)
  # a lanes reduction: rows x (K/A) x A (linear.lanes_matvec), or decode attention's scores, heads x positions x
  # (hd/A) x A (models/blocks.py's decode_attention). Threads over the first output axis they divide, the lane axis unrolled
  # whole into one vector, nothing else
  lanes = reduce == [len(shape) - 2, len(shape) - 1] and known[-1] and 4 <= shape[-1] <= MAX_LANES
  kv_length = [i for i in outs if not known[i]]
  decoding = len(kv_length) == 1 and _is_decode_length(shape[kv_length[0]])
  if lanes and (len(shape) == 3 and known[0] and not kv_length or decoding):
    axis = thread_axis(outs)
    opts = [Opt(OptOps.THREAD, axis, threads)] if axis is not None else []
    opts.append(Opt(OptOps.UNROLL, 1, 0))
    # one row's product of int8 weights: also 3 blocks of lanes a step, which keeps the int8 -> float conversions off
    # the critical path (measured on one core: the Q8_0 head 49152x576 12.6 -> 2.8 ms, int8 1536x576 0.47 -> 0.18 ms).
    # Not Q4 blocks (uint8) nor float: unchanged on the CPU where this was measured, and on the AMD EPYC (Zen 4) 1.03-1.06x
    # slower with 3 blocks a step (SmolLM2's 576-wide weights) and 3.8-4.1x with 2 (Llama 3.2 1B's 2048-wide: 8192x2048
    # Q4_1 1.31 -> 5.43 ms, its 128,256-row head 21.4 -> 82.7 ms). A short reduction (at most 8 steps: the sampler's sums
    # over the vocabulary, 256-2048 rows x 6 x 32) takes 2 rows a step instead: 2.4-2.5x on one core (`tg-llama tune`
    # found it)
    if not kv_length and shape[1] <= 8 and shape[0] % (2 * (threads if axis is not None else 1)) == 0: opts.append(Opt(OptOps.UPCAST, 0, 2))
    elif not kv_length: opts += _int8_steps(k, shape[1])
    return ("matvec" if not kv_length else "decode scores"), opts
  # a quantized layer's product for a decode batch of 2-8 rows: batch x rows x (K/A) x A. The batch axis upcast whole, so that each
  # weight is decoded once for every row of the batch. From 4 rows on, also 4 output rows per step (each input read once
  # for them) and short unrolls (every partial sum stays in a register): 8 x (1536x576) Q4_1 on one core 1.50 -> 0.53 ms,
  # 4 x 0.88 -> 0.37 ms; 2 rows are best with the lane axis unrolled whole (0.25 ms)
  # (measured on the Intel Xeon). On the AMD EPYC (Zen 4) every such upcast of a quantized weight's batch loses to one row's
  # code run for each row, 1.3-2.5x a kernel (clang reassembles the inputs' 4-float loads with shuffles there, worst with
  # float16 scales): where tune.py's probe finds that on the machine (BATCH_LOOP), loop_opts is the default
  if lanes and len(shape) == 4 and all(known) and 2 <= shape[0] <= 8:
    axis = thread_axis([1])
    opts = [Opt(OptOps.THREAD, axis, threads)] if axis is not None else []
    if BATCH_LOOP and (_reads(k, dtypes.uint8) or _reads(k, dtypes.int8)): return "batch matvec", opts + loop_opts(k)
    # more than 16 lanes (int8 weights with a scale per row), 2 or 4 rows: one output row a step, short unrolls. Measured on
    # Q8_0 blocks of 32 lanes on 2 cores, 49152x576: 2 rows 12.9 -> 3.5 ms, 4 rows 5.7 -> 4.3 ms; 8192x2048: 6.4 -> 2.4 ms,
    # 3.1 -> 2.6 ms (8 rows: mixed). Q8_0 batches take 16 lanes since 2026-12-04 (quantize.py), so not this branch: their
    # choice below is unmeasured on that CPU
    if shape[0] < 8 and shape[3] > 16 and shape[3] % 4 == 0 and shape[2] % 2 == 0:
      return "batch matvec", opts + [Opt(OptOps.UPCAST, 0, shape[0]), Opt(OptOps.UNROLL, 1, 4), Opt(OptOps.UNROLL, 0, 2)]
    if shape[0] >= 4 and shape[1] % (4 * (threads if axis is not None else 1)) == 0 and shape[3] % 4 == 0:
      return "batch matvec", opts + [Opt(OptOps.UPCAST, 1, 4), Opt(OptOps.UPCAST, 0, shape[0]), Opt(OptOps.UNROLL, 1, 4)] + \
             ([Opt(OptOps.UNROLL, 0, 2)] if shape[2] % 2 == 0 else [])
    return "batch matvec", opts + [Opt(OptOps.UPCAST, 0, shape[0]), Opt(OptOps.UNROLL, 1, 0)]
  # the sums of the sampler's searches (tg_llama/sampling.py's _filter), of one row or a batch: [rows x] candidates x lanes x
  # (V / lanes), reduced over the last, the lanes contiguous (the keys they compare are uint32). Threads over the lanes, 16 of
  # them (fewer where the cores would not divide them) times every candidate in registers, nothing unrolled: independent vector
  # accumulators. Measured on one core (AMD EPYC): one row's 3 x 64 x 768 45 -> 28 us, 8 rows' 293 -> 133 us, against
  # tinygrad's own split of the sums (partial sums of 192 contiguous tokens, 4 of them a vector)
  if reduce == [len(shape) - 1] and len(shape) in (3, 4) and all(known) and _reads(k, dtypes.uint32) and 2 <= shape[-3] <= 8:
    lane, cand = len(shape) - 2, len(shape) - 3
    if (up := next((u for u in (16, 8, 4) if shape[lane] % (u * threads) == 0), None)) is not None:
      return "batch sums", ([Opt(OptOps.THREAD, lane, threads)] if threads > 1 else []) + [Opt(OptOps.UPCAST, lane, up), Opt(OptOps.UPCAST, cand, shape[cand])]
  # the minimums of a one-token product of 4-bit blocks (quantize.py's Int4Linear) times the input's block sums: rows x
  # blocks, reduced over the blocks, the block sums a vector every row reads. Threads over the rows, 8 rows a step (one
  # vector a block, each row's minimums read in turn): 2048x8192's (8192 x 64, float16) on one core 0.89 -> 0.09 ms
  # against tinygrad's choice (4 rows a step, the blocks unrolled by 4; 16 rows a step 0.11 ms); as a lanes reduction (a
  # row's 16 lanes summed at its end, after 4 steps) 1.6 ms
  if len(shape) == 2 and reduce == [1] and all(known) and shape[1] <= 1024 and shape[0] % (8 * threads) == 0 and _vector(k, 0, 1):
    return "block minimums", ([Opt(OptOps.THREAD, 0, threads)] if threads > 1 else []) + [Opt(OptOps.UPCAST, 0, 8)]
  # a matrix product of a decode batch: 2-8 tokens x rows x K, all known. Threads over the rows, every token times 4 rows
  # in registers (each weight read once for the whole batch), K unrolled by 4: measured 8 x (1536x576) float32 on one
  # core 8.8 GFLOPS as a lanes reduction -> 30
  if len(shape) == 3 and reduce == [2] and all(known) and 2 <= shape[0] <= 8 and shape[1] % (4 * threads) == 0 and shape[2] % 4 == 0:
    return "batch matmul", ([Opt(OptOps.THREAD, 1, threads)] if threads > 1 else []) + [Opt(OptOps.UPCAST, 1, 4), Opt(OptOps.UPCAST, 0, shape[0]), Opt(OptOps.UNROLL, 0, 4)]
  # a matrix product of a prefill chunk, its weight in panels (linear.matmul in the CPU's layout): panels x tokens x the
  # panel's rows x K, all known. Threads over the panels, each panel's rows upcast whole (contiguous in the panel: vector
  # multiply-adds of a panel row by one input value) times 4 tokens, K unrolled by 4: measured 64 tokens x (1536x576)
  # Q4_1 decoded and multiplied on 2 cores 5.0 -> 2.8 ms against the best tile of an (out, in) weight, 8192x2048 204 ->
  # 36 ms against a whole (in, out) transpose
  if len(shape) == 4 and reduce == [3] and all(known) and shape[2] == LAYOUT.panel and shape[1] % 4 == 0 and shape[3] % 4 == 0:
    axis = thread_axis([0])
    return "prefill matmul", ([Opt(OptOps.THREAD, axis, threads)] if axis is not None else []) + \
           [Opt(OptOps.UPCAST, 2, shape[2]), Opt(OptOps.UPCAST, 1, 4), Opt(OptOps.UNROLL, 0, 4)]
  # a quantized weight decoded into a prefill chunk's panels (linear.matmul; Q4 blocks: panels x blocks x the block's two
  # halves x its bytes x the panel's rows, nothing reduced): the panel's 16 rows one vector, threads over the panels
  # (each row's block a step of its own), measured on 2 cores: 1536x576 0.38 -> 0.23 ms, 576x576 0.16 -> 0.10 ms,
  # 8192x2048 4.5 -> 3.4 ms against tinygrad's choice
  if not reduce and len(shape) == 5 and all(known) and shape[2] == 2 and shape[-1] == LAYOUT.panel:
    axis = thread_axis([0])  # after the upcast, as for attention's values (a panel axis of 2 would renumber the rows')
    return "panel pack", [Opt(OptOps.UPCAST, 4, shape[-1])] + ([Opt(OptOps.THREAD, axis, threads)] if axis is not None else [])
  # a prefill chunk's scores (models/blocks.py's prefill_attention): KV heads x cache length x G x queries x hd, reduced
  # over hd, the queries contiguous. 16 queries a vector (a key row's value times each, accumulated in place: no sum
  # across a vector per score), threads over the queries, hd unrolled by 4: measured 64 queries x 256 positions (9 heads,
  # 3 KV heads, hd 64) on one core 4.9 ms as dot products of 32 lanes -> 1.0 ms
  last = outs[-1]
  if reduce == [len(shape) - 1] and len(kv_length) == 1 and not decoding and known[last] and known[-1] and shape[-1] % 4 == 0 and \
     shape[last] % (16 * threads) == 0:
    return "prefill scores", ([Opt(OptOps.THREAD, last, threads)] if threads > 1 else []) + [Opt(OptOps.UPCAST, last, 16), Opt(OptOps.UNROLL, 0, 4)]
  # attention's weights x values, a reduction over the cache length: the head dimension (last output axis) upcast whole, so
  # that each position updates independent vector accumulators instead of one chain per output (a prefill chunk's: 3.7 ->
  # 0.9 ms on one core, 64 queries x 256 positions). The weights do not vary along it, and queries or heads come before it
  # (which tells this product from the softmax's own reductions over the cache length, whose last axis is the queries:
  # with one KV head, (G*T, P) alone; upcast whole, 128 values, tinygrad's compile worker died pickling the kernel)
  hd = shape[last]
  if reduce == [len(shape) - 1] and not known[-1] and len(outs) >= 2 and known[last] and hd % 16 == 0 and hd <= 128 and _broadcast(k, last):
    axis = thread_axis(outs[:-1])  # heads (or queries) over cores, after the upcasts (a head axis of 2 on 2 cores leaves
    # none behind, which would renumber the head dimension's)
    return ("decode values" if _is_decode_length(shape[-1]) else "prefill values"), \
           [Opt(OptOps.UPCAST, last, 16)] + ([Opt(OptOps.UPCAST, last, hd // 16)] if hd > 16 else []) + \
           ([Opt(OptOps.THREAD, axis, threads)] if axis is not None else [])
  return None

# the choices of tg_llama/cpu/tune.py's table in use, by (kind, shape_key, the default they beat): they replace a rule's
# default where they apply.
# One table per process, like the heuristic rebound below: install() sets it, and hands it to the compile workers
TUNED: dict[tuple[str, tuple[int, ...], tuple[Opt, ...]], tuple[Opt, ...]] = {}
# whether a quantized product's decode batch runs as one row's code for each row by default, not upcast, and how many rows of
# 4-bit blocks at a time (loop_opts; tune.py's probe chooses both)
BATCH_LOOP = False
BATCH_ROWS = 1

def shape_key(k) -> tuple[int, ...]:
  """The kernel's shape as the tuned table writes it: a symbolic size (a cache length) as -1."""
  return tuple(s if isinstance(s, int) else -1 for s in k.full_shape)

def cpu_optimizations(k):
  """The kernel with our opts applied (the tuned ones for its kind and shape where they apply, else the rule's default),
  or None when they are not ours to choose or do not apply."""
  if k.ren.target.device != "CPU" or (claimed := rule(k)) is None: return None
  kind, opts = claimed
  tuned = TUNED.get((kind, shape_key(k), tuple(opts)))  # tuned against this default: a changed rule voids its entries
  return (tuned is not None and applied(k, tuned)) or applied(k, opts)

def applied(k, opts):
  """A copy of the kernel with `opts` applied, or None when one of them does not apply (KernelOptError)."""
  ok = k.copy()
  try:
    for opt in opts: ok.apply_opt(opt)
  except KernelOptError: return None
  return ok

def hand_coded_optimizations(k):
  """tinygrad's heuristic, with our choice for the CPU kernels that are ours to choose."""
  return cpu_optimizations(k) or threaded(_theirs(k))

# tinygrad splits a kernel over the cores from 128K elements a core. graph.py's runner keeps a thread per core, so
# smaller kernels gain too: the sampler's, over the vocabulary (SmolLM2's 49,152 tokens: 12-84 us each on one core), ran
# on one core. From 8K elements a core, one row's sampling 0.76 -> 0.49 ms (a decode step's other kernels are ours or
# smaller); 16K: 0.54, 4K: 0.48
MIN_THREAD_ELEMENTS = 8192

def threaded(k):
  """tinygrad's choice for a CPU kernel, split over the cores from MIN_THREAD_ELEMENTS elements a core."""
  threads = NUM_CPU_THREADS.value
  if k.ren.target.device != "CPU" or threads < 2 or any(o.op is OptOps.THREAD for o in k.applied_opts): return k
  # a symbolic size counts as its least: a prefill chunk's cache length (start_pos + T) as T, whose softmax over it ran on
  # one core (3 x 64 x 192 elements and more a layer); a decoded token's (start_pos + 1) as 1
  if prod(s if isinstance(s, int) else s.vmin for s in k.full_shape) < MIN_THREAD_ELEMENTS * threads: return k
  for axis in k.axes_of(AxisType.WEAK):
    if isinstance(k.full_shape[axis], int) and k.full_shape[axis] % threads == 0:
      try: k.apply_opt(Opt(OptOps.THREAD, axis, threads))
      except KernelOptError: pass
      break
  return k

def lacking() -> list[str]:
  """What this module rebinds or reads of tinygrad's internals that this tinygrad does not have."""
  return missing(heuristic, "hand_coded_optimizations") + missing(realize, "get_worker_pool") + missing(search, "get_worker_pool") + \
         missing(worker, "_init_worker", "_WorkerContext", "worker_pool", "terminate_worker_pool") + \
         missing(Scheduler, "full_shape", "axis_types", "copy", "apply_opt", "rngs", "bufs")

def install(tuned: dict | None = None, batch_loop: bool = False, batch_rows: int = 1, capped: bool = True):
  """Route tinygrad's heuristic through ours, in this process and in the compile workers it starts (idempotent), with
  `tuned` (tune.py's Table.choices(): (kind, shape, default) -> opts) in place of the defaults, none by default, a
  quantized product's decode batch as one row's code, `batch_rows` at a time, where `batch_loop` (BATCH_LOOP, BATCH_ROWS),
  and clang's vectorizer capped or not (vectors.py's CAP); or, where tinygrad lacks any of it, leave tinygrad's own (one
  warning)."""
  global BATCH_LOOP, BATCH_ROWS
  if gone := lacking():
    fall_back("choosing the CPU's kernels", ", ".join(gone))
    return
  TUNED.clear()
  TUNED.update(tuned or {})
  BATCH_LOOP, BATCH_ROWS = batch_loop, batch_rows
  heuristic.hand_coded_optimizations = hand_coded_optimizations  # looked up at each use
  vectors.install(Device["CPU"].renderer.compiler, capped)
  realize.get_worker_pool = search.get_worker_pool = get_worker_pool

def _state() -> tuple: return (dict(TUNED), BATCH_LOOP, BATCH_ROWS, vectors.CAP)  # what a compile worker starts with

def _init_worker(tuned: dict, batch_loop: bool, batch_rows: int, capped: bool):
  global BATCH_LOOP, BATCH_ROWS
  worker._init_worker()
  TUNED.update(tuned)
  BATCH_LOOP, BATCH_ROWS = batch_loop, batch_rows
  heuristic.hand_coded_optimizations = hand_coded_optimizations
  if not vectors.lacking(): vectors.install(cap=capped)

# compiles a worker runs before it is replaced: tinygrad's 16 bounds what BEAM's workers grow to over thousands of
# candidates, but a new worker imports tinygrad again (~0.5 s of a core), and a cold start's prefill chunk alone is ~40
# kernels on 2 workers (each replaced once: 0.5 s later to its first token on the AMD EPYC). A worker grows with what it
# compiles: at most 83 MB through a chat's first-run compile, 240 MB through `tg-llama tune` (AMD EPYC, 2 workers)
COMPILES_PER_WORKER = 256

def get_worker_pool():
  """tinygrad's compile pool (engine/worker.py's get_worker_pool), its workers started with our heuristic."""
  if multiprocessing.current_process().daemon or PARALLEL == 0: return None
  # tinygrad's own pool, or ours started with another table
  if worker.worker_pool is not None and getattr(worker.worker_pool, "tg_llama", None) != _state(): worker.terminate_worker_pool()
  if worker.worker_pool is None:
    worker.worker_pool = pool = worker._WorkerContext().Pool(PARALLEL.value, _init_worker, _state(),
                                                               getenv("BEAM_MAX_TASKS_PER_CHILD", 16 if BEAM else COMPILES_PER_WORKER))
    pool.tg_llama = _state()
    atexit.register(pool.close)
  return worker.worker_pool
