"""A graph's kernels compiled while the graph is still being captured.

tinygrad's TinyJit captures a graph without running it: each realize inside the capture hands its scheduled kernels to
the capturing jit (`add_linear`), and only when the captured function has returned are they all lowered and compiled, in
tinygrad's pool of compile workers (jit_lower). Capturing a 64-token prefill chunk of SmolLM2 on a cold cache scheduled
for ~3 s and then compiled its 34 kernels for ~5 s, the workers idle during the first part and the scheduler during the
second. Here each kernel goes to the pool as soon as it is scheduled; what comes back fills tinygrad's program cache, and
is put in the captured calls' place of their kernels' ASTs (`compiled`), so that jit_lower has nothing left to compile.

Nothing is sent early where BEAM searches (it compiles in the parent, where it can time the candidates), where there is
no pool (PARALLEL=0), or where this tinygrad lacks what is read here (then jit_lower compiles everything, as tinygrad
does)."""
from __future__ import annotations
from tinygrad.engine import realize
from tinygrad.helpers import BEAM, getenv
from tinygrad.uop.ops import Ops, UOp

NEEDS = ("_compile_kernel", "_get_call_to_compile", "to_program_key", "to_program_cache", "to_program_context", "get_worker_pool")

def available() -> bool: return all(hasattr(realize, name) for name in NEEDS)

class EarlyCompile:
  """The kernels sent to the pool during one capture, by their program-cache key."""
  def __init__(self): self.pending: dict = {}

  def send(self, linear: UOp) -> None:
    """Each kernel of a captured realize that is neither compiled nor on its way, to the compile pool."""
    if BEAM.value or getenv("JITBEAM", 0) or not available() or (pool := realize.get_worker_pool()) is None: return
    context = {v.key: v.value for v in realize.to_program_context}
    for call in linear.src:
      if call.op is not Ops.CALL or (job := realize._get_call_to_compile(call)) is None: continue
      if (key := realize.to_program_key(*job)) in realize.to_program_cache or key in self.pending: continue
      self.pending[key] = pool.apply_async(realize._compile_kernel, ((0, job, context),))

  def collect(self) -> None:
    """Wait for what was sent, and put it where tinygrad's compile looks first."""
    pending, self.pending = self.pending, {}
    for key, result in pending.items(): realize.to_program_cache[key] = result.get()[1]

  def compiled(self, linear: UOp) -> UOp:
    """`linear` with each kernel's compiled program in place of its AST, as jit_lower's compile would put it there; that
    compile then has nothing to do. It swaps each call's program in by a graph rewrite of its own, 0.6 s for the 420 calls
    of SmolLM2's prefill chunk on the AMD EPYC, where the calls share 34 programs."""
    if not available(): return linear
    programs: dict[UOp, UOp | None] = {}
    def program(call: UOp) -> UOp | None:
      if (ast := call.src[0]) not in programs:
        job = realize._get_call_to_compile(call)
        programs[ast] = None if job is None or job[0] is not ast else realize.to_program_cache.get(realize.to_program_key(*job))
      return programs[ast]
    return linear.replace(src=tuple(call.replace(src=(prg, *call.src[1:])) if call.op is Ops.CALL and (prg := program(call)) is not None
                                    else call for call in linear.src))
