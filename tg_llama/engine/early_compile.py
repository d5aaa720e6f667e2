"""A graph's kernels compiled while the graph is still being captured.

tinygrad's TinyJit captures a graph without running it: each realize inside the capture hands its scheduled kernels to
the capturing jit (`add_linear`), and only when the captured function has returned are they all lowered and compiled, in
tinygrad's pool of compile workers (jit_lower). Capturing a 64-token prefill chunk of SmolLM2 on a cold cache scheduled
for ~3 s and then compiled its 34 kernels for ~5 s, the workers idle during the first part and the scheduler during the
second. Here each kernel goes to the pool as soon as it is scheduled, and what comes back fills tinygrad's program cache
before jit_lower looks there.

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
