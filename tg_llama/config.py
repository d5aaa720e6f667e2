"""LlamaConfig: the hyperparameters of a Llama-architecture model, with one constructor per source
(HF config.json, Meta params.json, GGUF metadata) and presets for the published sizes.

Not here: anything about weights or files beyond the config dicts; architectures that are not of the Llama family
(biases, sliding-window-only attention, other norms) are refused, never approximated. Which family member a config
runs is `arch`, a module of tg_llama/models/ (its tables map the checkpoints' names for it)."""
from __future__ import annotations
import math
from dataclasses import dataclass, field, replace
from tg_llama.errors import CheckpointError, UnsupportedModelError
from tg_llama.models import GGUF_ARCHS, HF_TYPES

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
  n_experts: int = 0       # a sparse mixture of this many SwiGLU experts in place of the feed-forward (Mixtral); 0: dense
  n_active_experts: int = 0  # the experts each token is routed to
  arch: str = "llama"      # the module of tg_llama/models/ that runs it
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
    if self.arch not in {*HF_TYPES.values(), *GGUF_ARCHS.values()}: raise UnsupportedModelError(f"unknown architecture {self.arch!r}")
    if self.n_experts > MAX_EXPERTS: raise UnsupportedModelError(f"{self.n_experts} experts (at most {MAX_EXPERTS} are run)")
    if self.n_active_experts > self.n_experts or bool(self.n_experts) != bool(self.n_active_experts):
      raise UnsupportedModelError(f"{self.n_active_experts} active experts of {self.n_experts}: need 0 < active <= experts, or both 0")

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
  def from_hf(cfg: dict, src: str = "config.json") -> LlamaConfig:
    _check_dict(cfg, src)
    model_type = cfg.get("model_type", "")
    if not isinstance(model_type, str) or model_type not in HF_TYPES:
      raise UnsupportedModelError(f"{src}: unsupported architecture {_short(model_type or cfg.get('architectures'))}: tg-llama runs "
                                  f"Llama-family models ({', '.join(sorted(HF_TYPES))})")
    for key in ("attention_bias", "mlp_bias"):
      if cfg.get(key): raise UnsupportedModelError(f"{src}: {model_type} with {key}=true is not a Llama architecture tg-llama runs")
    if cfg.get("hidden_act", "silu") != "silu":
      raise UnsupportedModelError(f"{src}: hidden_act {_short(cfg['hidden_act'])} is not supported (SwiGLU needs silu)")
    # transformers 5 writes rope_parameters; transformers 4 writes rope_theta and rope_scaling at the top level
    rope = _check_dict(cfg.get("rope_parameters") or {}, src, "rope_parameters")
    theta = number(rope, "rope_theta", src, float, number(cfg, "rope_theta", src, float, 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else _check_dict(cfg.get("rope_scaling") or {}, src, "rope_scaling")
    max_context = number(cfg, "max_position_embeddings", src, default=4096)
    if model_type in ("mistral", "mixtral") and (window := number(cfg, "sliding_window", src, default=0)): max_context = min(max_context, window)
    n_heads = number(cfg, "num_attention_heads", src)
    experts = number(cfg, "num_local_experts", src) if model_type == "mixtral" else 0
    return _make(src, dim=number(cfg, "hidden_size", src), n_layers=number(cfg, "num_hidden_layers", src), n_heads=n_heads,
                 n_kv_heads=number(cfg, "num_key_value_heads", src, default=n_heads), head_dim=number(cfg, "head_dim", src, default=0),
                 hidden_dim=number(cfg, "intermediate_size", src), vocab_size=number(cfg, "vocab_size", src),
                 n_experts=experts, n_active_experts=number(cfg, "num_experts_per_tok", src) if experts else 0, arch=HF_TYPES[model_type],
                 norm_eps=number(cfg, "rms_norm_eps", src, float, 1e-6), rope_theta=theta, rope_scaling=_hf_rope_scaling(scaling, src),
                 tie_embeddings=flag(cfg, "tie_word_embeddings", src), max_context=max_context,
                 bos_id=number(cfg, "bos_token_id", src, default=None, minimum=0), eos_ids=token_ids(cfg.get("eos_token_id"), src, "eos_token_id"))

  @staticmethod
  def from_meta(params: dict, vocab_size: int | None = None, src: str = "params.json") -> LlamaConfig:
    """Meta's params.json. Llama 2 writes vocab_size -1: pass the size read off the weights."""
    _check_dict(params, src)
    dim, multiple_of = number(params, "dim", src), number(params, "multiple_of", src, default=256)
    hidden = int(2 * 4 * dim / 3)  # as Meta's FeedForward computes it
    if (mult := number(params, "ffn_dim_multiplier", src, float, None)) is not None:
      if not math.isfinite(mult * hidden): raise CheckpointError(f"{src}: ffn_dim_multiplier {mult} makes an infinite feed-forward size")
      hidden = int(mult * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    vocab = number(params, "vocab_size", src, default=-1, minimum=-1)
    if vocab <= 0:
      if vocab_size is None: raise UnsupportedModelError(f"{src}: params.json has no vocab_size and none was read off the weights")
      vocab = vocab_size
    theta = number(params, "rope_theta", src, float, 10000.0)
    scaled = flag(params, "use_scaled_rope", src)
    max_context = number(params, "max_seq_len", src, default=131072 if scaled else 8192 if theta >= 500000 else 4096)
    return _make(src, dim=dim, n_layers=number(params, "n_layers", src), n_heads=number(params, "n_heads", src),
                 n_kv_heads=number(params, "n_kv_heads", src, default=0), hidden_dim=hidden, vocab_size=vocab,
                 norm_eps=number(params, "norm_eps", src, float, 1e-5), rope_theta=theta, rope_scaling=Llama3RopeScaling() if scaled else None,
                 max_context=max_context)

  @staticmethod
  def from_gguf(kv: dict, rope_freq_factors: tuple[float, ...] | None = None, src: str = "GGUF metadata") -> LlamaConfig:
    name = kv.get("general.architecture")
    if not isinstance(name, str) or name not in GGUF_ARCHS:
      raise UnsupportedModelError(f"{src}: unsupported GGUF architecture {_short(name)}: tg-llama runs {', '.join(map(repr, GGUF_ARCHS))} models")
    key = lambda k: f"{name}.{k}"
    # llama.cpp writes Mixtral as a "llama" with experts
    experts = number(kv, key("expert_count"), src, default=0, minimum=0)
    arch = "mixtral" if experts and GGUF_ARCHS[name] == "llama" else GGUF_ARCHS[name]
    n_heads, dim = number(kv, key("attention.head_count"), src), number(kv, key("embedding_length"), src)
    head_dim = number(kv, key("attention.key_length"), src, default=dim // n_heads)
    if number(kv, key("rope.dimension_count"), src, default=head_dim) != head_dim:
      raise UnsupportedModelError(f"{src}: partial rotary embeddings are not supported")
    tokens = kv.get("tokenizer.ggml.tokens", [])
    if not isinstance(tokens, list): raise CheckpointError(f"{src}: tokenizer.ggml.tokens must be an array, got {type(tokens).__name__}")
    if not (vocab := number(kv, key("vocab_size"), src, default=len(tokens))):
      raise CheckpointError(f"{src}: no {key('vocab_size')} and no tokenizer.ggml.tokens")
    if rope_freq_factors is not None:
      if len(rope_freq_factors) != head_dim // 2:
        raise CheckpointError(f"{src}: rope_freqs.weight has {len(rope_freq_factors)} factors, head_dim {head_dim} needs {head_dim // 2}")
      if not all(math.isfinite(f) and f > 0 for f in rope_freq_factors):
        raise CheckpointError(f"{src}: rope_freqs.weight holds a factor that is not finite and positive")
    return _make(src, dim=dim, n_layers=number(kv, key("block_count"), src), n_heads=n_heads,
                 n_kv_heads=number(kv, key("attention.head_count_kv"), src, default=n_heads), head_dim=head_dim,
                 hidden_dim=number(kv, key("feed_forward_length"), src), vocab_size=vocab, arch=arch,
                 n_experts=experts, n_active_experts=number(kv, key("expert_used_count"), src) if experts else 0,
                 norm_eps=number(kv, key("attention.layer_norm_rms_epsilon"), src, float, 1e-5),
                 rope_theta=number(kv, key("rope.freq_base"), src, float, 10000.0), rope_freq_factors=rope_freq_factors,
                 max_context=number(kv, key("context_length"), src, default=4096),
                 bos_id=number(kv, "tokenizer.ggml.bos_token_id", src, default=None, minimum=0),
                 eos_ids=token_ids(kv.get("tokenizer.ggml.eos_token_id"), src, "tokenizer.ggml.eos_token_id"))

  @staticmethod
  def preset(name: str) -> LlamaConfig:
    if name not in PRESETS: raise UnsupportedModelError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]

  def to_hf(self) -> dict:
    """config.json as transformers writes it (so a converted checkpoint also loads in transformers)."""
    from tg_llama.models import module  # the architecture's module imports this one
    hf_class, model_type = module(self.arch).HF_CLASS
    cfg = {"architectures": [hf_class], "model_type": model_type, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
           "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
           "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
           "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_context, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "bos_token_id": self.bos_id,
           "eos_token_id": list(self.eos_ids) if len(self.eos_ids) > 1 else (self.eos_ids[0] if self.eos_ids else None)}
    if self.rope_scaling is not None:
      s = self.rope_scaling
      cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_context}
    if self.n_experts: cfg.update(num_local_experts=self.n_experts, num_experts_per_tok=self.n_active_experts)
    if self.rope_freq_factors is not None: cfg["tg_llama_rope_freq_factors"] = list(self.rope_freq_factors)
    return cfg

MAX_EXPERTS = 1 << 12  # DeepSeek-V3 has 256: a larger count is a corrupt file, not a model

def _hf_rope_scaling(s: dict, src: str) -> Llama3RopeScaling | None:
  kind = s.get("rope_type", s.get("type", "default")) if s else "default"
  if kind == "default": return None
  if kind != "llama3": raise UnsupportedModelError(f"{src}: rope scaling type {_short(kind)} is not supported (only Llama 3.1's 'llama3')")
  low, high = number(s, "low_freq_factor", src, float), number(s, "high_freq_factor", src, float)
  if high <= low: raise CheckpointError(f"{src}: rope scaling high_freq_factor {high} must exceed low_freq_factor {low}")
  return Llama3RopeScaling(factor=number(s, "factor", src, float), low_freq_factor=low, high_freq_factor=high,
                           original_max_context=number(s, "original_max_position_embeddings", src))

# ---- validating the config dicts of a file: every number a file gives is checked before it is used ----

_REQUIRED = object()

def number(d: dict, key: str, src: str, kind: type = int, default=_REQUIRED, minimum: float | None = None):
  """d[key] as an int (or a finite float, for kind=float), positive (or >= minimum); `default` when the key is absent
  or null. Anything else is a CheckpointError naming `src` and the key."""
  if d.get(key) is None:
    if default is _REQUIRED: raise CheckpointError(f"{src}: missing key {key!r}")
    return default
  v = d[key]
  if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
    raise CheckpointError(f"{src}: {key} must be {'a number' if kind is float else 'an integer'}, got {_short(v)}")
  if not math.isfinite(v): raise CheckpointError(f"{src}: {key} must be finite, got {v!r}")
  if v <= 0 if minimum is None else v < minimum:
    raise CheckpointError(f"{src}: {key} must be {'positive' if minimum is None else f'>= {minimum}'}, got {v!r}")
  return float(v) if kind is float else v

def token_ids(v, src: str, key: str) -> tuple[int, ...]:
  """One token id or a list of them (as eos_token_id may be)."""
  return tuple(number({key: x}, key, src, minimum=0) for x in (v if isinstance(v, list) else [] if v is None else [v]))

def flag(d: dict, key: str, src: str) -> bool:
  if not isinstance(v := d.get(key, False), bool) and v is not None: raise CheckpointError(f"{src}: {key} must be true or false, got {_short(v)}")
  return bool(v)

def _short(v) -> str: return r if len(r := repr(v)) <= 80 else r[:77] + "..."  # a hostile value can be megabytes

def _check_dict(d, src: str, key: str | None = None) -> dict:
  if not isinstance(d, dict): raise CheckpointError(f"{src}: {key or 'the file'} must be a JSON object, got {type(d).__name__}")
  return d

def _make(src: str, **fields) -> LlamaConfig:
  try: return LlamaConfig(**fields)
  except UnsupportedModelError as e: raise UnsupportedModelError(f"{src}: {e}") from None

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
  "mixtral-8x7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000, n_experts=8,
                              n_active_experts=2, arch="mixtral", norm_eps=1e-5, rope_theta=1e6, max_context=32768, bos_id=1, eos_ids=(2,)),
}
