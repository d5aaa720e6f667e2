"""tg-llama's logits equal transformers' (float32, within 1e-4) for tiny random models written as HF
(fp32, bf16, sharded), Meta (several .pth shards, Llama 2 and Llama 3 layouts) and GGUF (F32 .. Q4_1):
for the whole prompt, then token by token through the KV cache, then for greedy generation."""
import numpy as np
import pytest
import torch
from tinygrad import Tensor, dtypes
import tg_llama
from tiny_models import PROMPT, VARIANTS, gguf_reference, hf_model, reference_greedy, reference_logits, write_gguf, write_hf, write_meta

TOL = 1e-4

@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
  model = hf_model(request.param)
  return request.param, model, tmp_path_factory.mktemp(request.param)

def assert_matches(model: tg_llama.Model, ref: np.ndarray):
  """Prompt logits at every position, then the same positions again through the KV cache one token at a time."""
  runner = model.runner
  full = model.llama(Tensor([PROMPT], device=model.backend.device), runner.cache, [(0, 0)], last_only=False).numpy()[0]
  np.testing.assert_allclose(full, ref, atol=TOL, rtol=0)
  split = 5
  np.testing.assert_allclose(runner.prefill(0, PROMPT[:split], 0).numpy()[0], ref[split - 1], atol=TOL, rtol=0)
  for i in range(split, len(PROMPT)):
    np.testing.assert_allclose(runner.decode([(0, i, PROMPT[i])]).numpy()[0], ref[i], atol=TOL, rtol=0)

def test_hf(variant):
  name, model, tmp = variant
  ours = tg_llama.load(write_hf(model, tmp / "hf"))
  assert ours.config.tie_embeddings == model.config.tie_word_embeddings
  assert_matches(ours, reference_logits(model, PROMPT))
  assert list(ours.generate(PROMPT, 12)) == reference_greedy(model, PROMPT, 12)

def test_hf_bf16_sharded(variant):
  name, model, tmp = variant
  path = write_hf(model, tmp / "hf_bf16", dtype=torch.bfloat16, max_shard_size="40KB")
  assert (path / "model.safetensors.index.json").is_file()
  from transformers import LlamaForCausalLM
  reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # the same bf16-rounded weights, in float32
  assert_matches(tg_llama.load(path), reference_logits(reference, PROMPT))

@pytest.mark.parametrize("style,n_shards", [("llama3", 2), ("llama2", 2), ("llama3", 4)])
def test_meta(variant, style, n_shards):
  name, model, tmp = variant
  if name == "gqa_rope_llama3": pytest.skip("Meta's use_scaled_rope has fixed constants; covered in test_config")
  if n_shards > model.config.num_key_value_heads: pytest.skip("Meta never splits kv heads across more ranks than there are heads")
  path = write_meta(model, tmp / f"meta_{style}_{n_shards}", n_shards=n_shards, style=style)
  assert_matches(tg_llama.load(path), reference_logits(model, PROMPT))

@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf(variant, qtype):
  name, model, tmp = variant
  path = write_gguf(model, tmp / f"model_{qtype}.gguf", qtype)
  # llama.cpp keeps Llama 3.1 RoPE scaling as a rope_freqs tensor, which transformers' GGUF reader ignores:
  # there the reference is the original model (F32 only, where the weights are exact)
  if name == "gqa_rope_llama3":
    if qtype != "F32": pytest.skip("one rope-scaled GGUF is enough")
    reference = model
  else: reference = gguf_reference(path)
  assert_matches(tg_llama.load(path), reference_logits(reference, PROMPT))
