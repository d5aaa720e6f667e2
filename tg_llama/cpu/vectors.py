"""Vector loads and stores as wide as the CPU's registers.

tinygrad 0.14 folds a kernel's contiguous loads and stores of floats (and 32-bit ints) into vectors of at most 4
(codegen/late/coalesce.py's memory_coalescing: lengths [4, 2] for every renderer that supports float4), and clang keeps
that width: a prefill chunk's panel product (tg_llama/linear.py: a 16-row panel is one vector, times one input value)
ran as 128-bit multiply-adds where AVX2 has 256-bit and AVX-512 512-bit ones. For the CPU's kernels we fold up to the
register's width instead (16 floats with AVX-512, 8 with AVX2, else tinygrad's 4); every other device's kernels keep
tinygrad's lengths. On the AMD EPYC (2 cores, AVX2): a 256-token prompt's prefill 1.28-1.30 -> 0.54-0.58 s, a decoded
token unchanged (9.5-10.5 ms).

tinygrad has no setting for these lengths: they are one expression inside memory_coalescing. We compile tinygrad's own
function again with that expression replaced by ours (its source, from its file, in its module's namespace), so that the
rest of it stays tinygrad's; where that expression is not found (another tinygrad), tinygrad's function stays (one
warning)."""
from __future__ import annotations
import functools, inspect
import tinygrad.codegen as codegen
import tinygrad.codegen.late.coalesce as coalesce
from tg_llama.cpu import fall_back, missing
from tg_llama.cpu.graph import cpu_features

THEIRS = 'lengths = [8,4,2] if buf.dtype == dtypes.half and getenv("ALLOW_HALF8") else [4,2]'

def widest(features: str) -> int:
  """Floats in one of this CPU's vector registers, from its feature flags (/proc/cpuinfo's)."""
  flags = set(features.split())
  return 16 if "avx512f" in flags else 8 if "avx2" in flags else 4

def tinygrads(): return getattr(coalesce, "memory_coalescing", None)  # install() rebinds codegen's name for it, not this one

@functools.cache
def wide_coalescing(width: int):
  """tinygrad's memory_coalescing folding up to `width` elements; None where its lengths are not the expression we know."""
  try: src = inspect.getsource(tinygrads())
  except (OSError, TypeError): return None
  if src.count(THEIRS) != 1: return None
  namespace = dict(vars(coalesce))
  exec(compile(src.replace(THEIRS, f"lengths = {[n for n in (16, 8, 4, 2) if n <= width]}"), coalesce.__file__, "exec"), namespace)
  return namespace["memory_coalescing"]

@functools.cache
def width() -> int: return widest(cpu_features())

def memory_coalescing(sink, ctx):
  """What codegen calls: CPU kernels folded to the register's width, every other device's as tinygrad folds them."""
  wide = wide_coalescing(width()) if ctx is not None and getattr(ctx.target, "device", None) == "CPU" else None
  return (wide or tinygrads())(sink, ctx)

def describe() -> str:
  """The vector width in use, in words (the bench prints it with the kernel choices)."""
  if codegen.memory_coalescing is memory_coalescing: return f"loads up to {width()} floats a vector"  # installed: lacking() found nothing
  return "loads up to 4 floats a vector (tinygrad's)"

def lacking() -> list[str]:
  """What this module rebinds or rewrites of tinygrad's that this tinygrad does not have."""
  if gone := missing(coalesce, "memory_coalescing") + missing(codegen, "memory_coalescing"): return gone
  return [] if wide_coalescing(8) is not None else [f"'{THEIRS}' in memory_coalescing"]

def install():
  """Route codegen's memory_coalescing through ours in this process (opts.py's compile workers call this when they start),
  or where tinygrad lacks what it rebinds or rewrites, leave tinygrad's (one warning)."""
  if gone := lacking(): return fall_back("folding the CPU's loads into vectors", ", ".join(gone))
  codegen.memory_coalescing = memory_coalescing  # looked up at each use
