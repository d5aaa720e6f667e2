"""A block's lazy graph, built once and reused by the blocks after it, each with its own buffers.

Building a block's graph is tinygrad ops in Python, their symbolic shapes (a row's cache position) simplified at every
op: when a decode step of 8 rows is captured, about 0.3 s a block on the CPU (8.5-9.4 s for SmolLM2's 30). The blocks of a
model are the same code on other weights, so the graph of one block, its buffers swapped for another block's
(UOp.substitute), is the graph that building the other block would give, in about 20 ms. tinygrad then schedules it as
it schedules a block it built (the same kernels, from its schedule cache).

Reused only where that is sure, else each block is built as before:
- the blocks match attribute for attribute: the same types, the same values of everything that is not a tensor, and
  tensors of the same shapes, dtypes and devices;
- the first graph reads no buffer but its input, its block's tensors, its KV cache, the tensors every block shares
  (RoPE tables) and what it realized itself while it was built (a prefill chunk's products, each realized where it is
  made, through `realize` below, so that one weight's panels are in memory at a time: tg_llama/linear.py). A first
  shard's first block reads the embedding: not reused. Another block's realizes run again in the same order, on its
  own buffers (graphs of what it realized included), before its output's graph is given.

Capturing a 64-token prefill chunk of SmolLM2 (30 blocks; CPU, kernels compiled) took 22.2 s to the first token of a
256-token prompt, 17.7-17.9 s with its blocks reused."""
from __future__ import annotations
import contextlib, functools, types
from tinygrad import Tensor
from tinygrad.dtype import DType
from tinygrad.uop.ops import AddrSpace, Ops, UOp

def is_storage(u: UOp) -> bool:
  """A device buffer; not a variable (a BUFFER too, in no device's memory), nor a kernel's registers or local memory."""
  return u.op is Ops.BUFFER and u.arg.addrspace is AddrSpace.GLOBAL and u.arg.device is not None

def buffers(*graphs: UOp) -> set[UOp]: return {u for g in graphs for u in g.toposort() if is_storage(u)}

def reads(graph: UOp) -> set[UOp]:
  """The buffers a graph reads that it does not fill itself (a constant it makes, like Tensor.ones, is a buffer it stores
  into: the same for every block)."""
  return buffers(graph) - buffers(*[u.src[0] for u in graph.toposort() if u.op is Ops.STORE])

PLAIN = (int, float, str, bytes, bool, type(None), DType)
CODE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType, functools.partial)

def parts(obj, seen: set[int] | None = None) -> tuple[list, list[Tensor]]:
  """What a block's graph depends on besides its buffers (its objects' types and plain values, its tensors' shapes,
  dtypes and devices) and its tensors, in the same order for two blocks that match."""
  seen = set() if seen is None else seen
  if isinstance(obj, Tensor): return [("tensor", obj.shape, obj.dtype, obj.device)], [obj]
  if isinstance(obj, PLAIN): return [(type(obj), obj)], []
  if id(obj) in seen: return [("seen",)], []
  seen.add(id(obj))
  if isinstance(obj, dict): items = sorted(obj.items(), key=lambda kv: str(kv[0]))
  elif isinstance(obj, (list, tuple)): items = list(enumerate(obj))
  elif hasattr(obj, "__dict__") and not isinstance(obj, CODE): items = sorted(vars(obj).items())
  else: return [(type(obj), id(obj))], []  # a function, a class, anything else: matches only itself (shared by the blocks)
  sig, tensors = [type(obj), len(items)], []
  for k, v in items:
    s, t = parts(v, seen)
    sig += [k, *s]
    tensors += t
  return sig, tensors

_steps: list[tuple[UOp, UOp]] | None = None  # the realizes of the block being built: (graph, what it became)

def realize(t: Tensor) -> Tensor:
  """t.realize() inside a block, noted when the block's graph is being built for reuse."""
  before = t.uop
  t.realize()
  if _steps is not None: _steps.append((before, t.uop))
  return t

@contextlib.contextmanager
def _noting(steps: list):
  global _steps
  outer, _steps = _steps, steps
  try: yield
  finally: _steps = outer

class LayerGraph:
  """The lazy output graph of one block, with what it reads and realizes: `apply` gives another block's (or None)."""
  def __init__(self, out: Tensor, x: Tensor, cache: Tensor, steps: list[tuple[UOp, UOp]], signature: list, tensors: list[Tensor]):
    self.out, self.x, self.cache, self.steps, self.signature, self.tensors = out.uop, x.uop, cache.uop, steps, signature, tensors

  @classmethod
  def build(cls, block, x: Tensor, cache: Tensor, *args, shared: tuple[Tensor, ...]) -> tuple[Tensor, LayerGraph | None]:
    """block(x, cache, *args), not yet realized, and its graph for the blocks after it where it reads nothing but x
    (realized), cache, its block's tensors, the `shared` tensors among args and what it realized itself."""
    steps: list[tuple[UOp, UOp]] = []
    with _noting(steps): out = block(x, cache, *args)
    signature, tensors = parts(block)
    allowed = buffers(*[t.uop for t in (x, cache, *tensors, *shared)])
    for before, after in steps:
      if not reads(before) <= allowed: return out, None
      allowed |= buffers(after)
    if not x.uop.has_buffer_identity() or not reads(out.uop) <= allowed: return out, None
    return out, cls(out, x, cache, steps, [x.shape, cache.shape, *signature], tensors)

  def apply(self, x: Tensor, block, cache: Tensor) -> Tensor | None:
    """What block(x, cache, ...) gives, with the other arguments as the first one's; None where the block does not match."""
    signature, tensors = parts(block)
    if [x.shape, cache.shape, *signature] != self.signature or not x.uop.has_buffer_identity(): return None
    swap = {self.x: x.uop, self.cache: cache.uop, **{a.uop: b.uop for a, b in zip(self.tensors, tensors)}}
    for before, after in self.steps: swap[after] = Tensor(before.substitute(swap)).realize().uop
    return Tensor(self.out.substitute(swap))
