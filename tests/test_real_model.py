"""The real default model, SmolLM2-135M-Instruct (GGUF Q4_1 + Q8_0), against transformers reading the same file."""
import numpy as np
import pytest
import torch
import tg_llama

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time, in a small village,"]

@pytest.fixture(scope="module")
def reference(smollm2_gguf):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  kw = dict(gguf_file=smollm2_gguf.name)
  tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw)
  model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32, **kw).eval()
  return tok, model

@pytest.fixture(scope="module")
def ours(): return tg_llama.load(max_context=512)  # no source: the default model

def test_config(ours, smollm2_gguf):
  assert ours.checkpoint.path == smollm2_gguf
  c = ours.config
  assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size, c.tie_embeddings) == (30, 576, 9, 3, 49152, True)

@pytest.mark.parametrize("prompt", PROMPTS)
def test_top5(reference, ours, prompt):
  tok, model = reference
  ids = tok.encode(prompt)
  with torch.no_grad(): ref = model(torch.tensor([ids])).logits[0, -1].numpy()
  out = ours.logits(ids)
  assert list(np.argsort(-out)[:5]) == list(np.argsort(-ref)[:5])
  assert np.abs(out - ref).max() < 1e-3

def test_greedy_32(reference, ours):
  tok, model = reference
  ids = tok.encode(PROMPTS[2])
  with torch.no_grad():
    seq = list(ids)
    for _ in range(32): seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
  assert list(ours.generate(ids, 32)) == seq[len(ids):]
