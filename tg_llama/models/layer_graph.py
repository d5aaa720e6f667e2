"""A block's lazy graph, built once and reused by the blocks after it, each with its own buffers.

Building a block's graph is tinygrad ops in Python, their symbolic shapes (a row's cache position) simplified at every
op: when a decode step of 8 rows is captured, about 0.3 s a block on the CPU (8.5-9.4 s for SmolLM2's 30). The blocks of a
model are the same code on other weights, so the graph of one block, its buffers swapped for another block's
(UOp.substitute), is the graph that building the other block would give, in about 20 ms. tinygrad then schedules it as
it schedules a block it built (the same kernels, from its schedule cache).

Reused only where that is sure, else each block is built as before:
- the blocks match attribute for attribute: the same types, the same values of everything that is not a tensor, and
  tensors of the same shapes, dtypes and devices;
- the first graph reads no buffer but its input, its block's tensors, its KV cache and the tensors every block shares
  (RoPE tables). A block that realizes something while it is built (a prefill chunk's weight panels,
  tg_llama/linear.py) reads buffers of its own, and a first shard's first block reads the embedding: neither is reused."""
from __future__ import annotations
import functools, types
from tinygrad import Tensor
from tinygrad.dtype import DType
from tinygrad.uop.ops import AddrSpace, Ops, UOp

def buffers(*tensors: Tensor) -> set[UOp]:
  """The device buffers a graph reads (a bound variable is a BUFFER too, in no device's memory: the same in every block)."""
  return {u for t in tensors for u in t.uop.toposort() if u.op is Ops.BUFFER and u.arg.addrspace is AddrSpace.GLOBAL and u.arg.device is not None}

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

class LayerGraph:
  """The lazy output graph of one block, with what it reads: `apply` gives another block's (or None where it cannot)."""
  def __init__(self, out: Tensor, x: Tensor, cache: Tensor, signature: list, tensors: list[Tensor]):
    self.out, self.x, self.cache, self.signature, self.tensors = out.uop, x.uop, cache.uop, signature, tensors

  @classmethod
  def of(cls, out: Tensor, x: Tensor, block, cache: Tensor, shared: tuple[Tensor, ...]) -> LayerGraph | None:
    """out = block(x, cache, ..., *shared), not yet realized, on x realized: its graph, if it reads nothing else."""
    signature, tensors = parts(block)
    if not x.uop.has_buffer_identity() or not buffers(out) <= buffers(x, cache, *tensors, *shared): return None
    return cls(out, x, cache, [x.shape, cache.shape, *signature], tensors)

  def apply(self, x: Tensor, block, cache: Tensor) -> Tensor | None:
    """The graph of block(x, cache, ...) with the other arguments as the first one's; None where the block does not match."""
    signature, tensors = parts(block)
    if [x.shape, cache.shape, *signature] != self.signature or not x.uop.has_buffer_identity(): return None
    swap = {self.x: x.uop, self.cache: cache.uop, **{a.uop: b.uop for a, b in zip(self.tensors, tensors)}}
    return Tensor(self.out.substitute(swap))
