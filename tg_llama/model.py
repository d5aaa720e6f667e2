"""Llama in tinygrad tensors: embedding, blocks (RMSNorm, GQA attention with half-split RoPE, SwiGLU),
final norm and output head. The model holds weights only: the keys and values of the sequences it runs live in a
KVCache (tg_llama/engine/kv_cache.py) passed to each call, so one model serves many sequences, a batch at a time.

A model may be a layer shard: `start_layer..end_layer` of `n_layers`. The first shard embeds token ids,
the last applies the final norm and the head; a middle shard takes and returns hidden states.
Attribute names follow Hugging Face's (`self_attn.q_proj`, `mlp.gate_proj`); tg_llama/convert.py maps
every format onto them. No file I/O here, and the model never knows which format it came from."""
from __future__ import annotations
import math
from typing import TYPE_CHECKING, Callable, Sequence
import numpy as np
from tinygrad import Tensor, UOp, dtypes, nn
from tinygrad.dtype import DType
from tinygrad.uop.ops import resolve
from tg_llama.config import LlamaConfig
from tg_llama.linear import Linear
if TYPE_CHECKING: from tg_llama.engine.kv_cache import KVCache

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

def decode_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
  """Attention of one query position over the cache: q (B, H, 1, hd), keys and values (B, KvH, P, hd), P symbolic.
  Each key row serves its G = H/KvH query heads without being repeated, and each dot product is split into lanes of
  4 whose partial sums are independent, so the CPU's kernels vectorize instead of running one add chain per score
  (tg_llama/cpu_opts.py). The same numbers as scaled_dot_product_attention, accumulated in float32."""
  B, H, _, hd = q.shape
  KvH = keys.shape[1]
  G = H // KvH
  qg = q.float().reshape(B, KvH, G, 1, hd // 4, 4)
  # an odd group (SmolLM2's 9 heads over 3) gets a zero query head: an even axis lets the CPU split the attention
  # kernels over two cores (the cache length is symbolic, and 3 x 3 heads divide by nothing); sliced off below
  if G % 2: qg = qg.pad((None, None, (0, 1), None, None, None))
  scores = (qg * keys.float().reshape(B, KvH, 1, -1, hd // 4, 4)).sum(-2).sum(-1) * (1 / math.sqrt(hd))  # (B, KvH, G, P)
  out = (scores.softmax(-1).unsqueeze(-1) * values.float().reshape(B, KvH, 1, -1, hd)).sum(-2).contiguous()  # (B, KvH, G, hd)
  return out[:, :, :G].reshape(B, H, 1, hd).cast(q.dtype)

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
      if resolve(T == 1): outs.append(decode_attention(q[b:b+1], keys, values))
      else:
        # causal mask aligned to the lower right: query t sees keys up to pos+t
        mask = Tensor.full((1, 1, T, pos+T), float("-inf"), dtype=x.dtype, device=x.device).triu(pos+1)
        outs.append(q[b:b+1].scaled_dot_product_attention(keys, values, attn_mask=mask, enable_gqa=True))  # (1, H, T, hd)
    out = outs[0] if B == 1 else Tensor.cat(*outs)
    return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

class FeedForward:
  def __init__(self, config: LlamaConfig, linear: Callable):
    self.gate_proj = linear(config.dim, config.hidden_dim, bias=False)
    self.up_proj = linear(config.dim, config.hidden_dim, bias=False)
    self.down_proj = linear(config.hidden_dim, config.dim, bias=False)

  def __call__(self, x: Tensor) -> Tensor: return self.down_proj(self.gate_proj(x).silu() * self.up_proj(x))

class Block:
  def __init__(self, config: LlamaConfig, linear: Callable):
    self.input_layernorm = nn.RMSNorm(config.dim, config.norm_eps)
    self.self_attn = Attention(config, linear)
    self.post_attention_layernorm = nn.RMSNorm(config.dim, config.norm_eps)
    self.mlp = FeedForward(config, linear)

  def __call__(self, x: Tensor, cache: Tensor, rows: Rows, cos: Tensor, sin: Tensor) -> Tensor:
    h = x + self.self_attn(self.input_layernorm(x), cache, rows, cos, sin)
    return (h + self.mlp(self.post_attention_layernorm(h))).contiguous()

class Llama:
  def __init__(self, config: LlamaConfig, start_layer: int = 0, end_layer: int | None = None,
               linear: Callable = Linear, embedding: Callable = nn.Embedding):
    end_layer = config.n_layers if end_layer is None else end_layer
    if not 0 <= start_layer < end_layer <= config.n_layers:
      raise ValueError(f"bad layer shard {start_layer}..{end_layer} of a {config.n_layers}-layer model")
    self.config, self.start_layer, self.end_layer = config, start_layer, end_layer
    self.is_first, self.is_last = start_layer == 0, end_layer == config.n_layers
    self.layers = {i: Block(config, linear) for i in range(start_layer, end_layer)}
    if self.is_first: self.embed_tokens = embedding(config.vocab_size, config.dim)
    if self.is_last:
      self.norm = nn.RMSNorm(config.dim, config.norm_eps)
      self.lm_head = linear(config.dim, config.vocab_size, bias=False)
    self.cos: Tensor | None = None
    self.sin: Tensor | None = None

  def weights(self) -> dict[str, Tensor]:
    """Every parameter this shard holds, under its canonical (Hugging Face) name; global layer indices."""
    out: dict[str, Tensor] = {}
    if self.is_first: out.update(_params("model.embed_tokens", self.embed_tokens))
    for i, block in self.layers.items(): out.update(_params(f"model.layers.{i}", block))
    if self.is_last: out.update({**_params("model.norm", self.norm), **_params("lm_head", self.lm_head)})
    return out

  def setup_rope(self, max_positions: int, device: str | tuple[str, ...]):
    """The RoPE tables for positions 0..max_positions-1 (every position a KV cache of this model can hold)."""
    self.cos, self.sin = rope_tables(self.config, max_positions, device)

  def __call__(self, x: Tensor, cache: KVCache, rows: Rows, last_only: bool = True, last_index: int | UOp | None = None) -> Tensor:
    """x: token ids (B, T) on the first shard, else hidden states (B, T, dim). Row b continues the sequence in cache
    slot rows[b][0] from position rows[b][1] (ints or bound variables).
    Returns hidden states (B, T, dim), or on the last shard float32 logits: (B, vocab) for the last
    position when last_only (or for position `last_index` of a padded chunk), else (B, T, vocab)."""
    assert self.cos is not None and self.sin is not None, "call setup_rope() before running the model"
    h = self.embed_tokens(x) if self.is_first else x
    T = h.shape[1]
    tables = [(self.cos[pos:pos+T], self.sin[pos:pos+T]) for _, pos in rows]
    cos, sin = (tables[0] if len(rows) == 1 else (Tensor.stack(*[c for c, _ in tables]).unsqueeze(1), Tensor.stack(*[s for _, s in tables]).unsqueeze(1)))
    # one block at a time: scheduled whole, a quantized model's prefill would decode every layer's weights first
    for i, block in self.layers.items(): h = block(h, cache.layers[i], rows, cos, sin).realize()
    if not self.is_last: return h
    if last_only: h = h[:, -1:, :] if last_index is None else h[:, last_index:last_index+1, :]
    logits = self.lm_head(self.norm(h)).float()
    return logits[:, -1, :] if last_only else logits

def _params(prefix: str, module) -> dict[str, Tensor]: return dict(nn.state.get_state_dict(module, prefix=f"{prefix}."))
