"""The blocks every architecture shares: RoPE (half-split layout) and grouped-query attention over a KV cache slot per
row. The norms are tinygrad's nn.RMSNorm. No weights are read here and no format is known, nor any backend: where the
way a reduction is written matters to one (decode attention's scores), the backend's KernelLayout says how."""
from __future__ import annotations
import math
from typing import Callable, Sequence
import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.uop.ops import resolve
from tg_llama.backend import KernelLayout, kernel_layout
from tg_llama.config import LlamaConfig
from tg_llama.linear import dot

# per row of a batch: (cache slot, start position), ints or bound symbolic variables
Rows = Sequence[tuple["int | UOp", "int | UOp"]]

def rope_tables(config: LlamaConfig, max_context: int, device: str) -> tuple[Tensor, Tensor]:
  """cos and sin of shape (max_context, head_dim//2), float32."""
  freqs = np.outer(np.arange(max_context, dtype=np.float64), np.array(config.rope_inv_freq(), dtype=np.float64))
  return Tensor(np.cos(freqs).astype(np.float32), device=device).realize(), Tensor(np.sin(freqs).astype(np.float32), device=device).realize()

def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  # x: (B, H, T, head_dim) in the half-split layout; cos, sin: (T, head_dim//2)
  x1, x2 = x.chunk(2, dim=-1)
  cos, sin = cos.cast(x.dtype), sin.cast(x.dtype)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)

def softmax(x: Tensor, axis: int) -> Tensor:
  """Tensor.softmax's numbers, its exponentials computed once: left to fuse, the sum's kernel computes them again
  (on the CPU tinygrad's exp2 is a polynomial, several ns an element)."""
  e = (x - x.max(axis, keepdim=True)).exp().contiguous()
  return e / e.sum(axis, keepdim=True)

def decode_attention(q: Tensor, keys: Tensor, values: Tensor, layout: KernelLayout = KernelLayout()) -> Tensor:
  """Attention of one query position over the cache: q (B, H, 1, hd), keys and values (B, KvH, P, hd), P symbolic.
  Each key row serves its G = H/KvH query heads without being repeated. The scores' dot products are written in the
  backend's layout: in `layout.dot_lanes` partial sums, and with an odd G padded to an even one (a zero query head, sliced
  off below) where `layout.even_groups` (the CPU's, tg_llama/cpu/: its attention kernels split over two cores then).
  The softmax's exponentials are computed once (softmax above): one token at 960 positions 13.7 -> 11.6 ms a step, at
  300 9.9 -> 9.4 (4 rows at 960: 71 -> 63 ms; both graphs replayed in turn in one process, 2 cores). The same numbers
  as scaled_dot_product_attention, accumulated in float32."""
  B, H, _, hd = q.shape
  KvH = keys.shape[1]
  G = H // KvH
  qg = q.float().reshape(B, KvH, G, 1, hd)
  if layout.even_groups and G % 2: qg = qg.pad((None, None, (0, 1), None, None))
  lanes = layout.dot_lanes if hd % layout.dot_lanes == 0 else 1
  scores = dot(qg, keys.float().reshape(B, KvH, 1, -1, hd), lanes) * (1 / math.sqrt(hd))  # (B, KvH, G, P)
  out = (softmax(scores, -1).unsqueeze(-1) * values.float().reshape(B, KvH, 1, -1, hd)).sum(-2).contiguous()  # (B, KvH, G, hd)
  return out[:, :, :G].reshape(B, H, 1, hd).cast(q.dtype)

def prefill_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
  """Causal attention of T query positions, the last T of the cache: q (B, H, T, hd), keys and values (B, KvH, P, hd), P
  symbolic; query t sees keys up to P - T + t. Each key row serves its G = H/KvH query heads without being repeated, and
  the queries are laid out (hd, G*T): a key row's value times T consecutive queries is a vector multiply-add, each score
  a sum of multiply-adds in its own place. Laid out (G*T, hd), as scaled_dot_product_attention has them, each score is a
  dot product summed across a vector at the end: on DEV=CPU the scores ran 5-8x slower, and attention took 40% of a
  64-token chunk's time at 256 positions, 19% then (tg_llama/cpu/opts.py's prefill scores and values). The softmax runs
  over the cache length where the scores lie, (P, G*T), its exponentials computed once (softmax above), and
  the weights x values product reads them so; its kernels are split over the cores (tg_llama/cpu/opts.py's threaded).
  Before, transposed to (G*T, P), with an arange for the mask: a 64-token chunk at 960 positions took 455 ms on 2 cores,
  now 285 (at 192 positions 216 -> 193; the two graphs replayed in turn in one process, median of 7).
  The same numbers as scaled_dot_product_attention, accumulated in float32."""
  B, H, T, hd = q.shape
  KvH, P = keys.shape[1], keys.shape[2]
  G = H // KvH
  qt = q.float().reshape(B, KvH, G * T, hd).transpose(-1, -2).contiguous().reshape(B, KvH, 1, hd, G * T)
  scores = (qt * keys.float().reshape(B, KvH, -1, hd, 1)).sum(-2) * (1 / math.sqrt(hd))  # (B, KvH, P, G*T)
  # (P, 1, T): key after query, which only the last T keys can be: a constant triangle below the earlier keys (an arange
  # over the symbolic P is a cumsum, a P x P kernel in every layer)
  future = Tensor.ones(T, T, device=q.device).tril(-1).cast(dtypes.bool).reshape(T, 1, T).pad(((P - T, 0), None, None), value=False)
  scores = future.where(float("-inf"), scores.reshape(B, KvH, -1, G, T)).reshape(B, KvH, -1, G * T)
  out = (softmax(scores, -2).unsqueeze(-1) * values.float().reshape(B, KvH, -1, 1, hd)).sum(-3)  # (B, KvH, G*T, hd)
  return out.reshape(B, H, T, hd).cast(q.dtype)

class Attention:
  def __init__(self, config: LlamaConfig, linear: Callable):
    self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
    self.q_proj = linear(config.dim, config.n_heads * config.head_dim, bias=False)
    self.k_proj = linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
    self.v_proj = linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
    self.o_proj = linear(config.n_heads * config.head_dim, config.dim, bias=False)

  def __call__(self, x: Tensor, cache: Tensor, rows: Rows, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, dim): row b continues the sequence in cache slot rows[b][0] at position rows[b][1].
    cache (2, slots, KvH, positions, hd) is written at those places, then read up to them."""
    B, T, _ = x.shape
    q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)       # (B, H, T, hd)
    k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # (B, KvH, T, hd)
    v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kv = Tensor.stack(k, v).cast(cache.dtype)                                             # (2, B, KvH, T, hd)
    stores = [cache[:, slot:slot+1, :, pos:pos+T, :].uop.store(kv[:, b:b+1].uop) for b, (slot, pos) in enumerate(rows)]
    cache = Tensor(cache.uop.after(*stores))
    outs = []
    for b, (slot, pos) in enumerate(rows):
      # each row attends over its own slot, up to its own position: a symbolic length per row
      keys, values = cache[0, slot:slot+1, :, 0:pos+T, :].cast(x.dtype), cache[1, slot:slot+1, :, 0:pos+T, :].cast(x.dtype)
      if resolve(T == 1): outs.append(decode_attention(q[b:b+1], keys, values, kernel_layout(x.device)))
      else: outs.append(prefill_attention(q[b:b+1], keys, values))
    out = outs[0] if B == 1 else Tensor.cat(*outs)
    return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

  def linears(self) -> list[tuple[str, object, str]]:
    """(name under this module, parent, attribute) of each linear, for quantization to swap."""
    return [(name, self, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
