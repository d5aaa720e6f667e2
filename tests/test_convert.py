"""`tg-llama convert` writes the canonical layout: a plain HF directory that transformers itself loads."""
import subprocess, sys
import numpy as np
import torch
from transformers import LlamaForCausalLM
import tg_llama
from tg_llama.convert import convert_checkpoint
from tg_llama.tokenizer import load_tokenizer
from tinygrad import dtypes
from tiny_models import PROMPT, hf_model, reference_logits, write_gguf, write_meta

def test_meta_to_hf_loads_in_transformers(tmp_path):
  model = hf_model("gqa_tied")
  out = convert_checkpoint(write_meta(model, tmp_path / "meta", n_shards=2), tmp_path / "out", dtype=dtypes.float32)
  converted = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(reference_logits(converted, PROMPT), reference_logits(model, PROMPT), atol=1e-5, rtol=0)

def test_gguf_cli_convert_keeps_logits_and_tokenizer(tmp_path, smollm2_gguf):
  model = hf_model("mha")
  src = write_gguf(model, tmp_path / "m.gguf", "Q8_0")
  r = subprocess.run([sys.executable, "-m", "tg_llama.cli", "convert", str(src), str(tmp_path / "out"), "--dtype", "float32"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert set(p.name for p in (tmp_path / "out").iterdir()) == {"config.json", "model.safetensors", "tokenizer.gguf"}
  np.testing.assert_allclose(tg_llama.load(tmp_path / "out").logits(PROMPT), tg_llama.load(src).logits(PROMPT), atol=1e-5, rtol=0)

def test_tokenizer_travels_with_gguf_conversion(tmp_path, smollm2_gguf):
  from tg_llama.formats.gguf import metadata_only
  (tmp_path / "tokenizer.gguf").write_bytes(metadata_only(smollm2_gguf))
  text = "Hello, world! 12345 <|im_end|>"
  assert load_tokenizer(tmp_path).encode(text, allow_special=True) == load_tokenizer(smollm2_gguf).encode(text, allow_special=True)
  assert (tmp_path / "tokenizer.gguf").stat().st_size < 5_000_000
