"""Mixtral: Llama's block with a sparse mixture of SwiGLU experts in place of its feed-forward (transformers'
MixtralSparseMoeBlock), and Mixtral's tensor names. HF checkpoints keep a tensor per expert
(`block_sparse_moe.experts.E.w1.weight`), llama.cpp one (experts, out, in) tensor per projection (`ffn_gate_exps`);
both are held stacked, as the GGUF's, under `block_sparse_moe.experts.w1.weight`.

Routing, as Mixtral's: the router's logits over all experts, the k largest kept, their weights a softmax over those k
(the same numbers as a softmax over all, renormalized over the top k). A decode step's few rows (linear.matvec_rows)
gather their chosen experts' weights by index, so one row reads k of the E experts (quantized ones decoded inside the
product, as the 2-D layers decode theirs). A prefill chunk runs every expert over every row, weighted zero where
unrouted: each expert read once, quantized ones decoded once into a float stack first (E x out x in floats for the
moment of that product, as Int4Linear decodes its one matrix).

Not here: Meta-format Mixtral checkpoints; a quantized router (a rounding flip in its top-k changes the output
discontinuously, and it is only experts x dim); expert parallelism (parallel.py splits each expert's hidden axis)."""
from __future__ import annotations
from typing import Callable
from tinygrad import Tensor, nn
from tg_llama.config import LlamaConfig
from tg_llama.errors import UnsupportedModelError
from tg_llama.linear import Experts, matvec_rows
from tg_llama.models import llama
from tg_llama.models.blocks import Attention

HF_CLASS = ("MixtralForCausalLM", "mixtral")
GLOBAL_NAMES = llama.GLOBAL_NAMES
# canonical name under model.layers.N. -> (GGUF name, Meta name)
LAYER_NAMES = {**llama.ATTENTION_NAMES, "block_sparse_moe.gate.weight": ("ffn_gate_inp.weight", None),
               "block_sparse_moe.experts.w1.weight": ("ffn_gate_exps.weight", None),
               "block_sparse_moe.experts.w2.weight": ("ffn_down_exps.weight", None),
               "block_sparse_moe.experts.w3.weight": ("ffn_up_exps.weight", None)}
sanitize = llama.sanitize  # q/k rows as Llama's; the experts are stored alike in both formats

def layer_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  E, D, H = c.n_experts, c.dim, c.hidden_dim
  return {**llama.attention_shapes(c), "block_sparse_moe.gate.weight": (E, D), "block_sparse_moe.experts.w1.weight": (E, H, D),
          "block_sparse_moe.experts.w2.weight": (E, D, H), "block_sparse_moe.experts.w3.weight": (E, H, D)}

def layer_sources(c: LlamaConfig, fmt: str) -> dict[str, list[str]]:
  if fmt == "meta": raise UnsupportedModelError("Mixtral is read from HF or GGUF checkpoints, not Meta's")
  if fmt == "gguf": return {k: [v[0]] for k, v in LAYER_NAMES.items()}
  # HF: experts.{e}.w1.weight, one (out, in) tensor per expert, stacked into (experts, out, in)
  return {k: [k.replace(".experts.", f".experts.{e}.") for e in range(c.n_experts)] if ".experts." in k else [k] for k in LAYER_NAMES}

def route(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
  """The k largest of each row's expert logits (..., E): their weights, a softmax over those k, and their experts, both
  (..., k), largest first. Ranked by comparing every pair (E is small), so every shape stays fixed; ties go to the
  lower index."""
  E = logits.shape[-1]
  idx = Tensor.arange(E)
  a, b = logits.unsqueeze(-1), logits.unsqueeze(-2)  # [..., e, f]: does f rank above e?
  rank = ((b > a) | ((b == a) & (idx < idx.unsqueeze(-1)))).sum(-1)  # (..., E): how many experts rank above each
  picked = rank.unsqueeze(-1) == Tensor.arange(k)  # (..., E, k): expert e holds rank j
  sel = (picked * idx.unsqueeze(-1)).sum(-2).cast("int32")
  return picked.where(logits.unsqueeze(-1), 0).sum(-2).softmax(-1), sel

class SwiGLUExperts:
  def __init__(self, config: LlamaConfig):
    E, D, H = config.n_experts, config.dim, config.hidden_dim
    self.w1, self.w2, self.w3 = Experts(E, D, H), Experts(E, H, D), Experts(E, D, H)

  def __call__(self, x: Tensor, sel: Tensor | None = None) -> Tensor:
    """x (..., 1, dim) through the experts sel (..., k) picks, or through all of them: (..., k or E, dim)."""
    return self.w2((self.w1(x, sel).silu() * self.w3(x, sel)).contiguous(), sel)

class SparseMoE:
  def __init__(self, config: LlamaConfig, linear: Callable):
    if not 0 < config.n_active_experts <= config.n_experts:
      raise UnsupportedModelError(f"a Mixtral block needs 0 < n_active_experts <= n_experts, got {config.n_active_experts} of {config.n_experts}")
    self.k = config.n_active_experts
    self.gate = linear(config.dim, config.n_experts, bias=False)  # the router
    self.experts = SwiGLUExperts(config)

  def __call__(self, x: Tensor) -> Tensor:
    logits = self.gate(x).float()                                 # (B, T, E)
    weights, sel = route(logits, self.k)                          # (B, T, k)
    if matvec_rows(x):
      return (self.experts(x.unsqueeze(-2), sel) * weights.unsqueeze(-1).cast(x.dtype)).sum(-2)
    dense = (sel.unsqueeze(-1) == Tensor.arange(logits.shape[-1])).where(weights.unsqueeze(-1), 0).sum(-2)  # (B, T, E)
    return (self.experts(x.unsqueeze(-2)) * dense.unsqueeze(-1).cast(x.dtype)).sum(-2)

class Block(llama.Block):
  def __init__(self, config: LlamaConfig, linear: Callable):
    self.input_layernorm = nn.RMSNorm(config.dim, config.norm_eps)
    self.self_attn = Attention(config, linear)
    self.post_attention_layernorm = nn.RMSNorm(config.dim, config.norm_eps)
    self.block_sparse_moe = SparseMoE(config, linear)

  def feed_forward(self, x: Tensor) -> Tensor: return self.block_sparse_moe(x)

  def linears(self) -> list[tuple[str, object, str]]:
    # the router stays float (see the docstring)
    return [(f"self_attn.{n}", p, a) for n, p, a in self.self_attn.linears()] + \
           [(f"block_sparse_moe.experts.{n}", self.block_sparse_moe.experts, n) for n in ("w1", "w2", "w3")]
