"""LlamaConfig from each source, checked against the published model configs and transformers' own RoPE code."""
import numpy as np
import pytest
import torch
from tg_llama.config import LlamaConfig, Llama3RopeScaling
from tg_llama.errors import UnsupportedModelError

# Llama 3.1 8B's config.json as transformers 4 writes it (hub: meta-llama/Llama-3.1-8B)
HF4 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
       "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
       "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256, "tie_word_embeddings": False, "bos_token_id": 128000,
       "eos_token_id": 128001, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}

def test_hf4_and_hf5_agree():
  hf5 = {k: v for k, v in HF4.items() if k not in ("rope_theta", "rope_scaling")}
  hf5["rope_parameters"] = {**HF4["rope_scaling"], "rope_theta": 500000.0}
  a, b = LlamaConfig.from_hf(HF4), LlamaConfig.from_hf(hf5)
  assert a == b
  assert (a.n_kv_heads, a.head_dim, a.rope_scaling) == (8, 128, Llama3RopeScaling(8.0, 1.0, 4.0, 8192))

def test_hf5_default_rope():
  cfg = {**HF4, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
  del cfg["rope_theta"], cfg["rope_scaling"]
  c = LlamaConfig.from_hf(cfg)
  assert c.rope_scaling is None and c.rope_theta == 10000.0

@pytest.mark.parametrize("params,hidden", [
  ({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}, 11008),  # Llama 2 7B
  ({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096, "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5, "vocab_size": -1}, 28672),                                                                     # Llama 2 70B
  ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
    "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}, 14336),                                   # Llama 3 8B
  ({"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "ffn_dim_multiplier": 1.5,
    "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}, 8192),                 # Llama 3.2 1B
])
def test_meta_params_ffn_size(params, hidden):
  c = LlamaConfig.from_meta(params, vocab_size=32000)
  assert c.hidden_dim == hidden
  assert c.vocab_size == (32000 if params["vocab_size"] == -1 else params["vocab_size"])
  assert (c.rope_scaling is not None) == params.get("use_scaled_rope", False)

def test_meta_params_without_vocab_needs_weights():
  with pytest.raises(UnsupportedModelError, match="vocab_size"):
    LlamaConfig.from_meta({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": -1})

@pytest.mark.parametrize("scaling", [None, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                     {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_inv_freq_matches_transformers(scaling):
  from transformers import LlamaConfig as HFConfig
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
  hf = HFConfig(hidden_size=2048, num_attention_heads=16, rope_theta=500000.0,
                rope_scaling=None if scaling is None else {"rope_type": "llama3", **scaling})
  ref = LlamaRotaryEmbedding(hf).inv_freq.double().numpy()
  ours = np.array(LlamaConfig.from_hf({**hf.to_dict(), "model_type": "llama"}).rope_inv_freq())
  np.testing.assert_allclose(ours, ref, rtol=1e-6)

def test_meta_scaled_rope_is_llama31():
  c = LlamaConfig.from_meta({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
                             "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True})
  assert c.rope_inv_freq() == LlamaConfig.from_hf(HF4).rope_inv_freq()

def test_gguf_metadata(smollm2_gguf):
  from tg_llama.formats.gguf import read_metadata
  c = LlamaConfig.from_gguf(read_metadata(smollm2_gguf))
  # SmolLM2-135M's published config.json
  assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.rope_theta) == (576, 30, 9, 3, 1536, 49152, 100000.0)

def test_presets_match_published_sizes():
  # parameter counts of the published models, in billions
  def params(c): return (c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.n_layers * (
    c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.hidden_dim)) / 1e9
  for name, billions in [("llama-2-7b", 6.7), ("llama-2-13b", 13.0), ("llama-2-70b", 69.0), ("llama-3-8b", 8.0), ("llama-3-70b", 70.6),
                         ("llama-3.1-405b", 405.9), ("llama-3.2-1b", 1.24), ("llama-3.2-3b", 3.2)]:
    assert abs(params(LlamaConfig.preset(name)) - billions) / billions < 0.02, name
  with pytest.raises(UnsupportedModelError, match="unknown preset"): LlamaConfig.preset("llama-9")

def test_gqa_must_divide():
  with pytest.raises(UnsupportedModelError, match="multiple"): LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8, vocab_size=8)
