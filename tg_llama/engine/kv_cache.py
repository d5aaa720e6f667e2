"""The keys and values of several sequences at once: one tensor per layer of (2, slots, kv heads, positions, head dim),
allocated once at its full size and written by position (tg_llama/models/blocks.py's Attention).

A slot holds one sequence. What each slot holds is tracked here too (its tokens, when it was last used), so that a new
request can continue the slot that already holds the longest prefix of its prompt (prefix reuse), as llama.cpp's server
picks a slot by prompt similarity and vLLM caps a cache hit at the prompt length minus one (the last prompt token is
always computed again, for its logits)."""
from __future__ import annotations
import itertools
from dataclasses import dataclass, field
from tinygrad.dtype import DType
from tg_llama.config import LlamaConfig
from tg_llama.transfer import full

@dataclass
class Slot:
  index: int
  tokens: list[int] = field(default_factory=list)  # whose keys and values the slot holds, from position 0
  last_used: int = 0
  busy: bool = False

class KVCache:
  def __init__(self, config: LlamaConfig, layers: range, slots: int, positions: int, dtype: DType, device: str):
    if slots < 1: raise ValueError(f"a KV cache needs at least one slot, got {slots}")
    self.positions = positions
    shape = (2, slots, config.n_kv_heads, positions, config.head_dim)
    self.layers = {i: full(shape, 0, dtype, device) for i in layers}
    self.slots = [Slot(i) for i in range(slots)]
    self._clock = itertools.count(1)

  def nbytes(self) -> int: return sum(t.nbytes() for t in self.layers.values())

  def shard(self, devices: tuple[str, ...]):
    """Split every layer's cache on its kv heads over `devices`, as tensor parallelism splits the attention heads."""
    for t in self.layers.values():
      if not isinstance(t.device, tuple): t.shard_(devices, 2).realize()

  def acquire(self, prompt: list[int]) -> tuple[Slot, int] | None:
    """A free slot for `prompt` and how many of its first tokens that slot already holds (at most len(prompt) - 1);
    None when every slot is busy. The longest shared prefix wins; without one, the least recently used slot."""
    free = [s for s in self.slots if not s.busy]
    if not free: return None
    reuse = lambda s: _common_prefix(s.tokens, prompt, len(prompt) - 1)
    slot = max(free, key=lambda s: (reuse(s), -s.last_used))
    kept = reuse(slot)
    slot.tokens, slot.busy, slot.last_used = slot.tokens[:kept], True, next(self._clock)
    return slot, kept

  def release(self, slot: Slot):
    slot.busy, slot.last_used = False, next(self._clock)

  def free_slots(self) -> int: return sum(not s.busy for s in self.slots)

def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
  n = 0
  while n < min(len(a), len(b), limit) and a[n] == b[n]: n += 1
  return n
