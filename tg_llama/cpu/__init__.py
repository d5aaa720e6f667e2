"""What the CPU backend needs beyond tinygrad: the kernel choices for decoding (opts.py; tune.py searches them on the
machine, `tg-llama tune`), vector loads as wide as the CPU's registers (vectors.py), the replay of captured graphs from C
on every core (graph.py), and the layout the model writes its reductions in for them (LAYOUT).

Imported only when the CPU backend runs: tg_llama/backend.py calls install() when it resolves the CPU, the runner's Jit
hands a captured graph of CPU kernels to graph.py, and backend.kernel_layout gives the model LAYOUT for CPU tensors.
On any other backend nothing here is imported, so a tinygrad change that breaks this package leaves them alone.

Each part relies on tinygrad internals; where one is missing (another tinygrad version), that part keeps tinygrad's own
path, after one RuntimeWarning naming what is missing: slower, the same results.

Not here: other backends' kernels (tinygrad's heuristic and graph runners serve them as they are)."""
from __future__ import annotations
import functools, warnings
from tg_llama.backend import KernelLayout

# lanes of 4 in decode attention's scores and up to 64 in a one-token product: the CPU's compiler vectorizes independent partial
# sums, where a dot product written as one sum is one serial chain (opts.py chooses their kernels); an odd group of query heads
# (SmolLM2's 9 over 3) padded to an even one, so that the attention kernels split over two cores (the cache length is symbolic);
# a prefill chunk's weight written in panels of 16 output rows, each (in, 16), so that its product runs a panel at a time over
# every token, in vector multiply-adds of a contiguous panel row by one input value (tg_llama/linear.py's matmul)
LAYOUT = KernelLayout(dot_lanes=4, matvec_lanes=64, even_groups=True, panel=16)

def install(say=None):
  """Set up this process for the CPU backend: tinygrad's heuristic and its compile workers use our kernel choices (those
  `tg-llama tune` chose on this machine where it ran, else the defaults with the probe's choice for a decode batch, tune.py;
  `say`, where given, hears of a probe before it runs)."""
  from tg_llama.cpu import tune
  tune.install(say)

@functools.cache
def fall_back(what: str, lacking: str):
  """The one warning that `what` keeps tinygrad's own path, as tinygrad lacks `lacking` (once per process for each)."""
  warnings.warn(f"{what} uses tinygrad's own path: this tinygrad has no {lacking}", RuntimeWarning, stacklevel=3)

def missing(owner, *names: str) -> list[str]:
  """The names of `names` that `owner` (a tinygrad module or class) lacks, as '<owner>.<name>'."""
  return [f"{owner.__name__}.{name}" for name in names if not hasattr(owner, name)]
