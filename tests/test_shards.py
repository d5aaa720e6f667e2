"""Layer shards: a chain of shards gives the full model's logits, and a shard reads only its own tensors."""
import numpy as np
import pytest
from tinygrad import Tensor
import tg_llama
from tg_llama.config import LlamaConfig
from tg_llama.convert import canonical_shapes, open_checkpoint
from tg_llama.api import load_weights
from tg_llama.models.llama import Llama
from tiny_models import PROMPT, hf_model, reference_logits, write_hf

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  model = hf_model("gqa_tied")
  return write_hf(model, tmp_path_factory.mktemp("shards") / "hf"), reference_logits(model, PROMPT)

@pytest.mark.parametrize("n_parts", [2, 3])
def test_chain_equals_full(checkpoint, n_parts):
  path, ref = checkpoint
  config = open_checkpoint(path).config
  shards = [tg_llama.load_shard(path, a, b) for a, b in config.shard_plan(n_parts)]
  assert [len(s.layers) for s in shards] == [len(range(a, b)) for a, b in config.shard_plan(n_parts)]
  x = Tensor([PROMPT])
  for shard in shards: x = shard(x, 0, last_only=False)
  np.testing.assert_allclose(x.numpy()[0], ref, atol=1e-4, rtol=0)
  # and one more token through every shard's KV cache
  full = tg_llama.load(path)
  expect = full.logits(PROMPT + [7])
  x = Tensor([[7]])
  for shard in shards: x = shard(x, len(PROMPT))
  np.testing.assert_allclose(x.numpy()[0], expect, atol=1e-4, rtol=0)

def test_middle_shard_holds_only_its_layers(checkpoint):
  path, _ = checkpoint
  ckpt = open_checkpoint(path)
  read = []
  ckpt.tensors = {name: (lambda dev, name=name, f=f: read.append(name) or f(dev)) for name, f in ckpt.tensors.items()}
  shard = Llama(ckpt.config, 1, 2)
  load_weights(shard, ckpt, "CPU", tg_llama.api.DTYPES["float32"])
  assert sorted(read) == sorted(canonical_shapes(ckpt.config, 1, 2)) == sorted(shard.weights())
  assert all(name.startswith("model.layers.1.") for name in read)
  assert not (shard.is_first or shard.is_last)

def test_presets_plan_shards_by_name():
  assert LlamaConfig.preset("llama-3-8b").n_layers == 32 and LlamaConfig.preset("llama-3-70b").n_layers == 80
  plan = LlamaConfig.preset("llama-3-70b").shard_plan(4)
  assert plan == [(0, 20), (20, 40), (40, 60), (60, 80)]
  shapes = canonical_shapes(LlamaConfig.preset("llama-3-70b"), 20, 40)
  assert len(shapes) == 20 * 9 and "lm_head.weight" not in shapes and "model.embed_tokens.weight" not in shapes
  assert shapes["model.layers.20.self_attn.k_proj.weight"] == (8 * 128, 8192)

def test_bad_shard_range(checkpoint):
  with pytest.raises(ValueError, match="bad layer shard"): tg_llama.load_shard(checkpoint[0], 2, 9)
