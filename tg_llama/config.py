"""LlamaConfig: the hyperparameters of a Llama-architecture model, with one constructor per source
(HF config.json, Meta params.json, GGUF metadata) and presets for the published sizes.

Not here: anything about weights or files beyond the config dicts; architectures that are not Llama
(biases, MoE, sliding-window-only attention, other norms) are refused, never approximated."""
from __future__ import annotations
import math
from dataclasses import dataclass, field, replace
from tg_llama.errors import UnsupportedModelError

@dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1's frequency-dependent RoPE scaling (HF `rope_type: llama3`, Meta `use_scaled_rope`)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_context: int = 8192

@dataclass(frozen=True)
class LlamaConfig:
  dim: int
  n_layers: int
  n_heads: int
  hidden_dim: int          # the SwiGLU feed-forward size
  vocab_size: int
  n_kv_heads: int = 0      # 0: same as n_heads (MHA); fewer: GQA; 1: MQA
  head_dim: int = 0        # 0: dim // n_heads
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  rope_freq_factors: tuple[float, ...] | None = None  # GGUF's rope_freqs tensor: per-frequency divisors
  tie_embeddings: bool = False
  max_context: int = 4096
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = field(default_factory=tuple)

  def __post_init__(self):
    if self.n_kv_heads == 0: object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.head_dim == 0: object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if self.n_heads % self.n_kv_heads: raise UnsupportedModelError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2: raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for RoPE")

  def with_max_context(self, max_context: int | None) -> LlamaConfig:
    return self if max_context is None else replace(self, max_context=max_context)

  def rope_inv_freq(self) -> list[float]:
    """The inverse frequencies of the half-split RoPE, scaling applied (one per pair of head dims)."""
    inv = [1.0 / self.rope_theta ** (i / self.head_dim) for i in range(0, self.head_dim, 2)]
    if self.rope_freq_factors is not None: return [f / s for f, s in zip(inv, self.rope_freq_factors)]
    if (s := self.rope_scaling) is None: return inv
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    low_wavelen, high_wavelen = s.original_max_context / s.low_freq_factor, s.original_max_context / s.high_freq_factor
    out = []
    for f in inv:
      wavelen = 2 * math.pi / f
      if wavelen < high_wavelen: out.append(f)
      elif wavelen > low_wavelen: out.append(f / s.factor)
      else:
        smooth = (s.original_max_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        out.append((1 - smooth) * f / s.factor + smooth * f)
    return out

  def shard_plan(self, n_parts: int) -> list[tuple[int, int]]:
    """Split the layers into n_parts contiguous (start, end) ranges, as even as they go."""
    if not 1 <= n_parts <= self.n_layers: raise ValueError(f"cannot split {self.n_layers} layers into {n_parts} parts")
    bounds = [self.n_layers * i // n_parts for i in range(n_parts + 1)]
    return list(zip(bounds, bounds[1:]))

  # ---- constructors, one per source ----

  @staticmethod
  def from_hf(cfg: dict) -> LlamaConfig:
    model_type = cfg.get("model_type", "")
    if model_type not in HF_LLAMA_TYPES:
      raise UnsupportedModelError(f"unsupported architecture {model_type or cfg.get('architectures')!r}: tg-llama runs Llama-architecture "
                                  f"models ({', '.join(sorted(HF_LLAMA_TYPES))})")
    for flag in ("attention_bias", "mlp_bias"):
      if cfg.get(flag): raise UnsupportedModelError(f"{model_type} with {flag}=true is not a Llama architecture tg-llama runs")
    if cfg.get("hidden_act", "silu") != "silu": raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU needs silu)")
    # transformers 5 writes rope_parameters; transformers 4 writes rope_theta and rope_scaling at the top level
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else (cfg.get("rope_scaling") or {})
    max_context = cfg.get("max_position_embeddings", 4096)
    if model_type == "mistral" and (window := cfg.get("sliding_window")): max_context = min(max_context, window)  # exact within the window
    eos = cfg.get("eos_token_id")
    return LlamaConfig(
      dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
      n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim=cfg.get("head_dim") or 0,
      hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta), rope_scaling=_hf_rope_scaling(scaling), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      max_context=max_context, bos_id=cfg.get("bos_token_id"),
      eos_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)))

  @staticmethod
  def from_meta(params: dict, vocab_size: int | None = None) -> LlamaConfig:
    """Meta's params.json. Llama 2 writes vocab_size -1: pass the size read off the weights."""
    dim, multiple_of = params["dim"], params.get("multiple_of", 256)
    hidden = int(2 * 4 * dim / 3)  # as Meta's FeedForward computes it
    if (mult := params.get("ffn_dim_multiplier")) is not None: hidden = int(mult * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
      if vocab_size is None: raise UnsupportedModelError("params.json has no vocab_size and none was read off the weights")
      vocab = vocab_size
    theta = float(params.get("rope_theta", 10000.0))
    scaled = bool(params.get("use_scaled_rope", False))
    max_context = params.get("max_seq_len") or (131072 if scaled else 8192 if theta >= 500000 else 4096)
    return LlamaConfig(dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"], n_kv_heads=params.get("n_kv_heads") or 0,
                       hidden_dim=hidden, vocab_size=vocab, norm_eps=params.get("norm_eps", 1e-5), rope_theta=theta,
                       rope_scaling=Llama3RopeScaling() if scaled else None, max_context=max_context)

  @staticmethod
  def from_gguf(kv: dict, rope_freq_factors: tuple[float, ...] | None = None) -> LlamaConfig:
    arch = kv.get("general.architecture")
    if arch != "llama": raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}: tg-llama runs 'llama' models")
    if kv.get("llama.expert_count", 0): raise UnsupportedModelError("GGUF llama with experts (a MoE) is not supported")
    n_heads, dim = kv["llama.attention.head_count"], kv["llama.embedding_length"]
    head_dim = kv.get("llama.attention.key_length", dim // n_heads)
    if kv.get("llama.rope.dimension_count", head_dim) != head_dim: raise UnsupportedModelError("partial rotary embeddings are not supported")
    vocab = kv.get("llama.vocab_size") or len(kv.get("tokenizer.ggml.tokens", ()))
    eos = kv.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(dim=dim, n_layers=kv["llama.block_count"], n_heads=n_heads, n_kv_heads=kv.get("llama.attention.head_count_kv", n_heads),
                       head_dim=head_dim, hidden_dim=kv["llama.feed_forward_length"], vocab_size=vocab,
                       norm_eps=kv.get("llama.attention.layer_norm_rms_epsilon", 1e-5), rope_theta=float(kv.get("llama.rope.freq_base", 10000.0)),
                       rope_freq_factors=rope_freq_factors, max_context=kv.get("llama.context_length", 4096),
                       bos_id=kv.get("tokenizer.ggml.bos_token_id"), eos_ids=() if eos is None else (eos,))

  @staticmethod
  def preset(name: str) -> LlamaConfig:
    if name not in PRESETS: raise UnsupportedModelError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]

  def to_hf(self) -> dict:
    """config.json as transformers writes it (so a converted checkpoint also loads in transformers)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
           "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
           "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
           "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_context, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "bos_token_id": self.bos_id,
           "eos_token_id": list(self.eos_ids) if len(self.eos_ids) > 1 else (self.eos_ids[0] if self.eos_ids else None)}
    if self.rope_scaling is not None:
      s = self.rope_scaling
      cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_context}
    if self.rope_freq_factors is not None: cfg["tg_llama_rope_freq_factors"] = list(self.rope_freq_factors)
    return cfg

HF_LLAMA_TYPES = {"llama", "mistral"}

def _hf_rope_scaling(s: dict) -> Llama3RopeScaling | None:
  kind = s.get("rope_type", s.get("type", "default")) if s else "default"
  if kind == "default": return None
  if kind != "llama3": raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (only Llama 3.1's 'llama3')")
  return Llama3RopeScaling(factor=s["factor"], low_freq_factor=s["low_freq_factor"], high_freq_factor=s["high_freq_factor"],
                           original_max_context=s["original_max_position_embeddings"])

def _llama2(dim, n_layers, n_heads, hidden_dim, n_kv_heads=0):
  return LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim, vocab_size=32000,
                     norm_eps=1e-5, max_context=4096, bos_id=1, eos_ids=(2,))

def _llama3(dim, n_layers, n_heads, hidden_dim, n_kv_heads=8, scaled=False, tied=False):
  return LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim, vocab_size=128256,
                     norm_eps=1e-5, rope_theta=500000.0, rope_scaling=Llama3RopeScaling(factor=32.0 if tied else 8.0) if scaled else None,
                     tie_embeddings=tied, max_context=131072 if scaled else 8192, bos_id=128000, eos_ids=(128001, 128009))

# the published sizes, so a shard plan can be made from a name alone
PRESETS: dict[str, LlamaConfig] = {
  "llama-2-7b": _llama2(4096, 32, 32, 11008), "llama-2-13b": _llama2(5120, 40, 40, 13824),
  "llama-2-70b": _llama2(8192, 80, 64, 28672, n_kv_heads=8),
  "llama-3-8b": _llama3(4096, 32, 32, 14336), "llama-3-70b": _llama3(8192, 80, 64, 28672),
  "llama-3.1-8b": _llama3(4096, 32, 32, 14336, scaled=True), "llama-3.1-70b": _llama3(8192, 80, 64, 28672, scaled=True),
  "llama-3.1-405b": _llama3(16384, 126, 128, 53248, scaled=True),
  "llama-3.2-1b": _llama3(2048, 16, 32, 8192, scaled=True, tied=True), "llama-3.2-3b": _llama3(3072, 28, 24, 8192, scaled=True, tied=True),
}
