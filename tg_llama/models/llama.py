"""Llama (and Mistral, which shares its layout): blocks of RMSNorm, GQA attention with half-split RoPE and a SwiGLU
feed-forward; the model shell that every architecture's blocks run in (embedding, blocks, final norm, output head);
and Llama's tensor names in each format with their fix-ups.

The model holds weights only: the keys and values of the sequences it runs live in a KVCache
(tg_llama/engine/kv_cache.py) passed to each call, so one model serves many sequences, a batch at a time.
A model may be a layer shard: `start_layer..end_layer` of `n_layers`. The first shard embeds token ids,
the last applies the final norm and the head; a middle shard takes and returns hidden states.
Attribute names follow Hugging Face's (`self_attn.q_proj`, `mlp.gate_proj`); tg_llama/convert.py maps every format
onto them with the tables below. The model never knows which format it came from."""
from __future__ import annotations
from typing import TYPE_CHECKING, Callable
import numpy as np
from tinygrad import Tensor, UOp, nn
from tg_llama.config import LlamaConfig
from tg_llama.linear import Linear
from tg_llama.models import module
from tg_llama.models.blocks import Attention, Rows, rope_tables
from tg_llama.models.layer_graph import LayerGraph
if TYPE_CHECKING: from tg_llama.engine.kv_cache import KVCache

HF_CLASS = ("LlamaForCausalLM", "llama")  # a converted config.json's architectures[0] and model_type

# canonical name (HF's) -> (GGUF name, Meta name): outside the layers, then per layer
GLOBAL_NAMES = {"model.embed_tokens.weight": ("token_embd.weight", "tok_embeddings.weight"),
                "model.norm.weight": ("output_norm.weight", "norm.weight"), "lm_head.weight": ("output.weight", "output.weight")}
LAYER_NAMES = {
  "input_layernorm.weight": ("attn_norm.weight", "attention_norm.weight"),
  "self_attn.q_proj.weight": ("attn_q.weight", "attention.wq.weight"),
  "self_attn.k_proj.weight": ("attn_k.weight", "attention.wk.weight"),
  "self_attn.v_proj.weight": ("attn_v.weight", "attention.wv.weight"),
  "self_attn.o_proj.weight": ("attn_output.weight", "attention.wo.weight"),
  "post_attention_layernorm.weight": ("ffn_norm.weight", "ffn_norm.weight"),
  "mlp.gate_proj.weight": ("ffn_gate.weight", "feed_forward.w1.weight"),
  "mlp.up_proj.weight": ("ffn_up.weight", "feed_forward.w3.weight"),
  "mlp.down_proj.weight": ("ffn_down.weight", "feed_forward.w2.weight"),
}
ATTENTION_NAMES = {k: v for k, v in LAYER_NAMES.items() if not k.startswith("mlp.")}  # the part other architectures share

def attention_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  return {"input_layernorm.weight": (c.dim,), "self_attn.q_proj.weight": (q, c.dim), "self_attn.k_proj.weight": (kv, c.dim),
          "self_attn.v_proj.weight": (kv, c.dim), "self_attn.o_proj.weight": (c.dim, q), "post_attention_layernorm.weight": (c.dim,)}

def layer_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Each per-layer tensor's canonical name (under model.layers.N.) and shape."""
  return {**attention_shapes(c), "mlp.gate_proj.weight": (c.hidden_dim, c.dim), "mlp.up_proj.weight": (c.hidden_dim, c.dim),
          "mlp.down_proj.weight": (c.dim, c.hidden_dim)}

def layer_sources(c: LlamaConfig, fmt: str) -> dict[str, list[str]]:
  """Each per-layer tensor's canonical name -> the names it is read from in format `fmt` ("hf", "gguf", "meta"), under
  that format's layer prefix; several are stacked on a new first axis."""
  return {k: [k if fmt == "hf" else v[("gguf", "meta").index(fmt)]] for k, v in LAYER_NAMES.items()}

def sanitize(c: LlamaConfig, fmt: str, name: str, w: Tensor | np.ndarray) -> Tensor | np.ndarray:
  """The fix-up a tensor read from `fmt` needs, under its canonical name. Meta and llama.cpp store each q/k head's
  rotary pairs interleaved (x0,y0,x1,y1..); HF, and we, store them half-split (x0,x1..,y0,y1..): without this the
  model diverges after a few tokens. Only whole rows move, so it applies to a GGUF weight's raw blocks too (numpy)."""
  heads = c.n_heads if name.endswith("q_proj.weight") else c.n_kv_heads if name.endswith("k_proj.weight") else 0
  return interleaved_to_half_split(w, heads) if heads and fmt in ("gguf", "meta") else w

def interleaved_to_half_split(w: Tensor | np.ndarray, n_heads: int) -> Tensor | np.ndarray:
  out_dim, in_dim = w.shape
  w = w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim)
  return (w.transpose(1, 2) if isinstance(w, Tensor) else w.swapaxes(1, 2)).reshape(out_dim, in_dim)

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

  def feed_forward(self, x: Tensor) -> Tensor: return self.mlp(x)

  def __call__(self, x: Tensor, cache: Tensor, rows: Rows, cos: Tensor, sin: Tensor) -> Tensor:
    h = x + self.self_attn(self.input_layernorm(x), cache, rows, cos, sin)
    return (h + self.feed_forward(self.post_attention_layernorm(h))).contiguous()

  def linears(self) -> list[tuple[str, object, str]]:
    """(name under the layer, parent, attribute) of each layer that quantization swaps."""
    return [(f"self_attn.{n}", p, a) for n, p, a in self.self_attn.linears()] + \
           [(f"mlp.{n}", self.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]

class Llama:
  """The model shell: embedding, the blocks of the architecture `config.arch` names, final norm, output head."""
  def __init__(self, config: LlamaConfig, start_layer: int = 0, end_layer: int | None = None,
               linear: Callable = Linear, embedding: Callable = nn.Embedding):
    end_layer = config.n_layers if end_layer is None else end_layer
    if not 0 <= start_layer < end_layer <= config.n_layers:
      raise ValueError(f"bad layer shard {start_layer}..{end_layer} of a {config.n_layers}-layer model")
    self.config, self.start_layer, self.end_layer = config, start_layer, end_layer
    self.is_first, self.is_last = start_layer == 0, end_layer == config.n_layers
    block = module(config.arch).Block
    self.layers = {i: block(config, linear) for i in range(start_layer, end_layer)}
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
    # one block at a time: scheduled whole, a quantized model's prefill would decode every layer's weights first. A block's
    # graph is built once and reused by the blocks after it, with their own buffers, where that gives the same graph
    # (tg_llama/models/layer_graph.py; tried on the first two blocks: the first shard's first one reads the embedding)
    like = None
    for n, (i, block) in enumerate(self.layers.items()):
      if like is None or (out := like.apply(h, block, cache.layers[i])) is None:
        if like is None and n < 2: out, like = LayerGraph.build(block, h, cache.layers[i], rows, cos, sin, shared=(cos, sin))
        else: out = block(h, cache.layers[i], rows, cos, sin)
      h = out.realize()
    if not self.is_last: return h
    if last_only: h = h[:, -1:, :] if last_index is None else h[:, last_index:last_index+1, :]
    logits = self.lm_head(self.norm(h)).float()
    return logits[:, -1, :] if last_only else logits

def _params(prefix: str, obj) -> dict[str, Tensor]: return dict(nn.state.get_state_dict(obj, prefix=f"{prefix}."))
