"""Bad input gets a typed exception from the API and a one-line error from the CLI, naming the file and the problem."""
import json, os, pathlib, subprocess, sys
import numpy as np
import pytest
import torch
import tg_llama
from tg_llama.errors import CheckpointError, ContextLengthError, UnsupportedModelError
from tiny_models import hf_model, write_gguf, write_hf, write_meta

@pytest.fixture(scope="module")
def model(): return hf_model("gqa_tied")

@pytest.fixture
def hf_dir(model, tmp_path): return write_hf(model, tmp_path / "hf")

def edit_config(path: pathlib.Path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(changes)
  (path / "config.json").write_text(json.dumps(cfg))

def test_missing_file(tmp_path):
  with pytest.raises(CheckpointError, match="no such file"): tg_llama.load(tmp_path / "nope.gguf")

def test_missing_weights_in_dir(hf_dir):
  (hf_dir / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="no model.safetensors"): tg_llama.load(hf_dir)

def test_truncated_safetensors(hf_dir):
  f = hf_dir / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-1000])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"): tg_llama.load(hf_dir)

def test_truncated_gguf(model, tmp_path):
  f = write_gguf(model, tmp_path / "m.gguf", "Q8_0")
  f.write_bytes(f.read_bytes()[:-5000])
  with pytest.raises(CheckpointError, match=r"m\.gguf: truncated"): tg_llama.load(f)

def test_gguf_header_cut(model, tmp_path):
  f = write_gguf(model, tmp_path / "m.gguf", "F32")
  f.write_bytes(f.read_bytes()[:300])
  with pytest.raises(CheckpointError, match="truncated GGUF header"): tg_llama.load(f)

def test_bad_magic(tmp_path):
  f = tmp_path / "m.gguf"
  f.write_bytes(b"GGML" + bytes(100))
  with pytest.raises(CheckpointError, match="bad magic"): tg_llama.load(f)

def test_corrupt_safetensors_header(hf_dir):
  f = hf_dir / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:8] + b"{not json" + data[17:])
  with pytest.raises(CheckpointError, match="corrupt safetensors header"): tg_llama.load(hf_dir)

def test_wrong_shape_for_config(hf_dir):
  edit_config(hf_dir, intermediate_size=256)
  with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \(192, 64\), the config expects \(256, 64\)"): tg_llama.load(hf_dir)

def test_missing_tensor(model, hf_dir):
  from safetensors.torch import save_file
  sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight" and k != "lm_head.weight"}
  save_file(sd, hf_dir / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"): tg_llama.load(hf_dir)

def test_config_contradicts_weights(hf_dir):
  edit_config(hf_dir, num_hidden_layers=2)
  with pytest.raises(CheckpointError, match="model.layers.2.* contradicts the weights"): tg_llama.load(hf_dir)

def test_unsupported_gguf_quant(model, tmp_path):
  import gguf
  f = tmp_path / "q2k.gguf"
  w = gguf.GGUFWriter(str(f), "llama")
  w.add_tensor("token_embd.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(UnsupportedModelError, match="q2k.gguf: tensor token_embd.weight has GGML type Q2_K"): tg_llama.load(f)

@pytest.mark.parametrize("model_type", ["qwen2", "gemma"])
def test_unsupported_hf_architecture(hf_dir, model_type):
  edit_config(hf_dir, model_type=model_type)
  with pytest.raises(UnsupportedModelError, match=f"unsupported architecture '{model_type}'"): tg_llama.load(hf_dir)

def test_llama_with_biases_refused(hf_dir):
  edit_config(hf_dir, attention_bias=True)
  with pytest.raises(UnsupportedModelError, match="attention_bias"): tg_llama.load(hf_dir)

def test_unsupported_gguf_architecture(tmp_path):
  import gguf
  f = tmp_path / "qwen.gguf"
  w = gguf.GGUFWriter(str(f), "qwen2")
  w.add_block_count(1)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'qwen2'"): tg_llama.load(f)

class Evil:
  def __reduce__(self): return (os.system, (f"touch {EVIL_MARK}",))
EVIL_MARK = pathlib.Path("/tmp") / f"tg_llama_evil_{os.getpid()}"

def test_malicious_pickle_is_not_run(model, tmp_path):
  path = write_meta(model, tmp_path / "meta", n_shards=1)
  sd = torch.load(path / "consolidated.00.pth")
  sd["evil"] = Evil()
  torch.save(sd, path / "consolidated.00.pth")
  with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: refused to load: the pickle names (posix|os)\.system"): tg_llama.load(path)
  assert not EVIL_MARK.exists()

def test_prompt_longer_than_context(hf_dir):
  m = tg_llama.load(hf_dir, max_context=16)
  with pytest.raises(ContextLengthError, match="17 prompt tokens \\+ 0 to generate do not fit in the context of 16 tokens"): m.logits(list(range(17)))
  with pytest.raises(ContextLengthError): list(m.generate(list(range(10)), 8))

def test_cli_prints_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "tg_llama.cli", "generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "hi"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip() == f"error: {tmp_path / 'missing.gguf'}: no such file or directory"
