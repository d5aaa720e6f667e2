"""Vector loads and stores as wide as the CPU's registers, and clang's vectorizer bundles no wider.

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
warning).

tinygrad writes a kernel's vector work as scalar C, one statement a lane, and clang's vectorizer (SLP) regroups it. Left
to itself, clang 14 bundles a decode batch's 4 rows x 16 lanes of partial sums into one vector of 64 floats and keeps 3
of the 4 rows' lanes in reversed order, reversing each of their inputs and decoded weights first (two shuffles each, as
many shuffles as multiply-adds). Its bundles capped at one register of floats (`-mllvm -slp-max-vf=16` with AVX-512, 8
with AVX2), the same C runs in natural order: 4 rows of a 1536x576 Q4_1 layer 0.183 -> 0.130 ms on one core (AMD EPYC),
as fast as the product written by hand as vector code (0.134). So the CPU's clang compiler gets that flag (and a cache key
of its own: kernels compiled without it are not reused) where tg_llama/cpu/tune.py's probe finds a decode batch faster
with it on the machine (a choice measured on one CPU, the AMD EPYC; without the probe's table, capped)."""
from __future__ import annotations
import contextlib, functools, inspect
import tinygrad.codegen as codegen
import tinygrad.codegen.late.coalesce as coalesce
import tinygrad.runtime.support.compiler_cpu as compiler_cpu
from tinygrad import Device
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

def bundle_flags(width: int) -> list[str]:
  """clang's flags that cap its vectorizer's bundles at `width` elements (one register of floats)."""
  return ["-mllvm", f"-slp-max-vf={width}"]

def is_capped(compiler) -> bool:
  """Whether `compiler` (the CPU renderer's, or a compile worker's) compiles with bundle_flags."""
  return bundle_flags(width())[1] in getattr(compiler, "args", ())

CAP = True  # whether CPU clang compilers get bundle_flags (tune.py's probe chooses it per machine: opts.install passes it on)

def cap_bundles(compiler, on: bool | None = None):
  """Give an x86 CPU's clang compiler (tinygrad's ClangCompiler) bundle_flags for this CPU's registers and a cache key of its
  own (`on`, by default CAP), or take them away. Other compilers (DEV=CPU:LLVM's), other CPUs and 4-float registers stay as
  they are."""
  if not isinstance(compiler, compiler_cpu.ClangCompiler) or getattr(compiler, "arch", None) != "x86_64" or width() <= 4: return
  if not isinstance(args := getattr(compiler, "args", None), list): return
  flags, key = bundle_flags(width()), f"_slp{width()}"
  if CAP if on is None else on:
    if flags[1] not in args:
      compiler.args = [*args, *flags]
      if compiler.cachekey is not None: compiler.cachekey = f"{compiler.cachekey}{key}"
  elif flags[1] in args:  # the pair we added, not another flag's -mllvm
    i = args.index(flags[1])
    compiler.args = args[:i - 1] + args[i + 1:] if i and args[i - 1] == flags[0] else args[:i] + args[i + 1:]
    if compiler.cachekey is not None: compiler.cachekey = compiler.cachekey.removesuffix(key)

@contextlib.contextmanager
def compiling(compiler, on: bool):
  """Compile with `compiler` capped or not inside (tune.py's probe times both), in this process: as it was after. tinygrad
  keeps a process's programs by kernel and renderer, not by the compiler's flags, so those compiled inside are compiled
  anew and forgotten after."""
  was, programs = is_capped(compiler), codegen.to_program_cache
  codegen.to_program_cache = {}
  cap_bundles(compiler, on)
  try: yield
  finally:
    codegen.to_program_cache = programs
    cap_bundles(compiler, was)

def describe() -> str:
  """The vector width in use, in words (the bench prints it with the kernel choices)."""
  if codegen.memory_coalescing is memory_coalescing:  # installed: lacking() found nothing
    return f"loads up to {width()} floats a vector" + (f", clang's vectorizer capped at {width()}" if is_capped(Device["CPU"].renderer.compiler) else "")
  return "loads up to 4 floats a vector (tinygrad's)"

def lacking() -> list[str]:
  """What this module rebinds or rewrites of tinygrad's that this tinygrad does not have."""
  if gone := missing(coalesce, "memory_coalescing") + missing(codegen, "memory_coalescing", "to_program_cache") + missing(compiler_cpu, "ClangCompiler"):
    return gone
  return [] if wide_coalescing(8) is not None else [f"'{THEIRS}' in memory_coalescing"]

def capping(init):
  """ClangCompiler.__init__ that caps the new compiler's bundles (cap_bundles) after tinygrad's own."""
  @functools.wraps(init)
  def __init__(self, *args, **kwargs):
    init(self, *args, **kwargs)
    cap_bundles(self)
  __init__.tg_llama = True
  return __init__

def install(compiler=None, cap: bool = True):
  """Route codegen's memory_coalescing through ours in this process (opts.py's compile workers call this when they start),
  and cap the bundles (`cap`, CAP) of every CPU clang compiler made from now on (a renderer is made again from its target
  in each compile worker's task: tinygrad's Renderer.__reduce__) and of `compiler` (the CPU renderer's, made already), or
  leave them uncapped; or where tinygrad lacks what it rebinds or rewrites, leave tinygrad's (one warning)."""
  global CAP
  if gone := lacking(): return fall_back("folding the CPU's loads into vectors", ", ".join(gone))
  if cap != CAP: codegen.to_program_cache.clear()  # programs compiled the other way (the probe's) are not reused
  CAP = cap
  codegen.memory_coalescing = memory_coalescing  # looked up at each use
  if not getattr(compiler_cpu.ClangCompiler.__init__, "tg_llama", False): compiler_cpu.ClangCompiler.__init__ = capping(compiler_cpu.ClangCompiler.__init__)
  if compiler is not None: cap_bundles(compiler)
