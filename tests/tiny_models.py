"""Tiny random Llama (and Mixtral) models built with transformers (the reference), written out as HF, Meta and GGUF
checkpoints the way each format's own tools lay them out."""
from __future__ import annotations
import copy, json, pathlib
from typing import Callable
import numpy as np
import torch
from transformers import LlamaConfig as HFConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

VOCAB = 384
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
VARIANTS = {
  "mha": {},
  "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
  "mqa": dict(num_key_value_heads=1),
  "gqa_rope_llama3": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}
PROMPT = [1, 17, 250, 33, 99, 5, 300, 41, 8, 120, 77, 3]

def hf_model(variant: str, seed: int = 0) -> LlamaForCausalLM:
  torch.manual_seed(seed)
  model = LlamaForCausalLM(HFConfig(**{**BASE, **VARIANTS[variant]})).eval()
  with torch.no_grad():  # norms start at 1: randomize them so a mixed-up norm weight cannot pass
    for name, p in model.named_parameters():
      if "norm" in name: p.add_(torch.randn_like(p) * 0.2)
  return model

MIXTRAL = dict(BASE, intermediate_size=96, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)

def mixtral_model(seed: int = 0) -> MixtralForCausalLM:
  torch.manual_seed(seed)
  model = MixtralForCausalLM(MixtralConfig(**MIXTRAL)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name: p.add_(torch.randn_like(p) * 0.2)
      if name.endswith("mlp.gate.weight"): p.mul_(20)  # the router: top-k gaps far above float rounding
  return model

def reference_logits(model: LlamaForCausalLM, ids: list[int]) -> np.ndarray:
  """transformers' logits for every position of `ids`: (T, vocab) float32."""
  with torch.no_grad(): return model(torch.tensor([ids])).logits[0].float().numpy()

def reference_greedy(model: LlamaForCausalLM, ids: list[int], n: int) -> list[int]:
  """Greedy decoding by full forward passes (no cache, no generation config, no stop tokens)."""
  ids = list(ids)
  with torch.no_grad():
    for _ in range(n): ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
  return ids[-n:]

def write_hf(model: LlamaForCausalLM, path: pathlib.Path, dtype=torch.float32, max_shard_size: str | None = None) -> pathlib.Path:
  copy.deepcopy(model).to(dtype).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
  return path

def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
  """The inverse of HF's convert_llama_weights_to_hf permute: back to Meta's (and llama.cpp's) rotary layout."""
  out_dim, in_dim = w.shape
  return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

def meta_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
  c, sd = model.config, model.state_dict()
  out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
         "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
  for i in range(c.num_hidden_layers):
    p = f"model.layers.{i}."
    out.update({f"layers.{i}.attention.wq.weight": half_split_to_interleaved(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
                f"layers.{i}.attention.wk.weight": half_split_to_interleaved(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
                f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"], f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
                f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"], f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
                f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
                f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"], f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]})
  return out

def meta_split_axis(name: str, style: str) -> int | None:
  """How Meta's model-parallel layers split each weight (fairscale Column/RowParallelLinear, the embeddings)."""
  if name.endswith(("norm.weight",)): return None
  if name == "tok_embeddings.weight": return 1 if style == "llama2" else 0  # ParallelEmbedding vs VocabParallelEmbedding
  if name.endswith(("wo.weight", "w2.weight")): return 1                     # RowParallelLinear
  return 0                                                                   # ColumnParallelLinear: wq wk wv w1 w3 output

def write_meta(model: LlamaForCausalLM, path: pathlib.Path, n_shards: int = 2, style: str = "llama3", dtype=torch.float32) -> pathlib.Path:
  """params.json + consolidated.NN.pth as Meta ships them. The params are chosen so Meta's ffn formula gives
  the tiny model's intermediate_size (4*64 -> 170 -> multiple_of 32 -> 192)."""
  c = model.config
  path.mkdir(parents=True, exist_ok=True)
  sd = meta_state_dict(model)
  for rank in range(n_shards):
    shard = {}
    for name, w in sd.items():
      axis = meta_split_axis(name, style)
      shard[name] = (w if axis is None else w.chunk(n_shards, dim=axis)[rank]).to(dtype).clone()
    if style == "llama2": shard["rope.freqs"] = torch.zeros(c.hidden_size // c.num_attention_heads // 2)  # Llama 1/2 checkpoints carry it
    torch.save(shard, path / f"consolidated.{rank:02d}.pth")
  params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads, "multiple_of": 32,
            "norm_eps": c.rms_norm_eps, "vocab_size": -1 if style == "llama2" else c.vocab_size}
  if c.num_key_value_heads != c.num_attention_heads: params["n_kv_heads"] = c.num_key_value_heads
  if style == "llama3":
    params["rope_theta"] = c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
  (path / "params.json").write_text(json.dumps(params))
  return path

def write_gguf(model: LlamaForCausalLM, path: pathlib.Path, qtype: str | Callable[[str], str] = "F32") -> pathlib.Path:
  """A GGUF as llama.cpp's convert_hf_to_gguf.py writes it: q/k permuted back to interleaved, weights of 2 or 3 dims in
  `qtype` (or qtype(GGUF name): a file mixing types), but a router's, kept F32 as llama.cpp does."""
  import gguf
  c, sd = model.config, {k: v.float().numpy() for k, v in model.state_dict().items()}
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.num_hidden_layers); w.add_context_length(c.max_position_embeddings); w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size); w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
  w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads); w.add_vocab_size(c.vocab_size)
  w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default")
  w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)]); w.add_token_types([1] * c.vocab_size); w.add_token_merges([])
  w.add_bos_token_id(1); w.add_eos_token_id(2)
  if experts := getattr(c, "num_local_experts", 0): w.add_expert_count(experts); w.add_expert_used_count(c.num_experts_per_tok)
  def add(name, arr):
    arr, q = np.ascontiguousarray(arr), gguf.GGMLQuantizationType[qtype(name) if callable(qtype) else qtype]
    if arr.ndim >= 2 and q != gguf.GGMLQuantizationType.F32 and not name.endswith("ffn_gate_inp.weight"):
      w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), q) if q != gguf.GGMLQuantizationType.F16 else arr.astype(np.float16),
                   raw_dtype=q if q != gguf.GGMLQuantizationType.F16 else None)
    else: w.add_tensor(name, arr.astype(np.float32))
  if (rope := _rope_scaling(c)) is not None: add("rope_freqs.weight", llama_cpp_rope_factors(c, rope))
  add("token_embd.weight", sd["model.embed_tokens.weight"])
  add("output_norm.weight", sd["model.norm.weight"])
  if not c.tie_word_embeddings: add("output.weight", sd["lm_head.weight"])
  for i in range(c.num_hidden_layers):
    p = f"model.layers.{i}."
    add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
    add(f"blk.{i}.attn_q.weight", half_split_to_interleaved(torch.from_numpy(sd[p + "self_attn.q_proj.weight"]), c.num_attention_heads).numpy())
    add(f"blk.{i}.attn_k.weight", half_split_to_interleaved(torch.from_numpy(sd[p + "self_attn.k_proj.weight"]), c.num_key_value_heads).numpy())
    add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]); add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
    add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    if experts:  # transformers 5 holds each layer's experts stacked: gate_up_proj (E, 2H, D) = [w1; w3], down_proj (E, D, H)
      H = c.intermediate_size
      add(f"blk.{i}.ffn_gate_inp.weight", sd[p + "mlp.gate.weight"]); add(f"blk.{i}.ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"])
      add(f"blk.{i}.ffn_gate_exps.weight", sd[p + "mlp.experts.gate_up_proj"][:, :H]); add(f"blk.{i}.ffn_up_exps.weight", sd[p + "mlp.experts.gate_up_proj"][:, H:])
      continue
    add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]); add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
    add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return path

def _rope_scaling(c) -> dict | None:
  rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
  return rope if rope.get("rope_type") == "llama3" else None

def llama_cpp_rope_factors(c, rope: dict) -> np.ndarray:
  """The rope_freqs tensor as llama.cpp's convert_hf_to_gguf.py computes it for Llama 3.1 (per-frequency divisors)."""
  dim, base = c.hidden_size // c.num_attention_heads, rope["rope_theta"]
  low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
  high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
  out = []
  for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
    wavelen = 2 * np.pi / freq
    if wavelen < high_wavelen: out.append(1.0)
    elif wavelen > low_wavelen: out.append(rope["factor"])
    else:
      smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
      out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
  return np.array(out, dtype=np.float32)

def gguf_reference(path: pathlib.Path) -> LlamaForCausalLM:
  """transformers' own reading of a GGUF file (it dequantizes with the gguf package): the oracle for GGUF."""
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

def gguf_roundtrip(qtype: str, w: np.ndarray) -> np.ndarray:
  """w (rows, K) as a `qtype` GGUF block of it decodes, by gguf-py."""
  import gguf
  q = gguf.GGMLQuantizationType[qtype]
  return w if qtype == "F32" else gguf.quants.dequantize(gguf.quants.quantize(w, q), q)

def dequantized_copy(model, roundtrip: Callable[[str, np.ndarray], np.ndarray], keep: tuple[str, ...] = ("mlp.gate.weight",)):
  """A copy of `model` with every matrix but the norms and those named `keep` (name suffixes; default the router, which
  llama.cpp keeps float) replaced by roundtrip(name, w) of its (rows, K) view: rows are quantized independently, so
  llama.cpp's q/k row order does not matter."""
  out = copy.deepcopy(model)
  with torch.no_grad():
    for name, p in out.named_parameters():
      if p.ndim >= 2 and not name.endswith(keep):
        w = p.float().numpy()
        p.copy_(torch.from_numpy(roundtrip(name, w.reshape(-1, w.shape[-1])).reshape(w.shape)))
  return out
