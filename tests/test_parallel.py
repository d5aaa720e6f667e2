"""Tensor parallelism over two CPU devices: the split model gives the single-device logits, for a prompt and token
by token through its KV cache under TinyJit, and transformers' greedy tokens."""
import numpy as np
import pytest
from tinygrad import Tensor, TinyJit, UOp, dtypes
import tg_llama
from tg_llama.api import load_weights
from tg_llama.config import LlamaConfig
from tg_llama.convert import open_checkpoint
from tg_llama.errors import UnsupportedModelError
from tg_llama.engine.kv_cache import KVCache
from tg_llama.models.llama import Llama
from tg_llama.parallel import check_divisible, devices_for, place_input, shard_model
from tg_llama.sampling import SamplingParams
from tiny_models import PROMPT, hf_model, reference_greedy, write_hf

DEVICES = ("CPU:0", "CPU:1")
CONTEXT = 32

def load_llama(path) -> tuple[Llama, KVCache]:
  ckpt = open_checkpoint(path)
  llama = Llama(ckpt.config)
  load_weights(llama, ckpt, "CPU", dtypes.float32)
  llama.setup_rope(CONTEXT, "CPU")
  return llama, KVCache(ckpt.config, range(ckpt.config.n_layers), 1, CONTEXT, dtypes.float32, "CPU")

def prompt_logits(llama: Llama, cache: KVCache, devices: tuple[str, ...]) -> np.ndarray:
  return llama(place_input(Tensor([PROMPT], dtype=dtypes.int32), devices), cache, [(0, 0)], last_only=False).to(devices[0]).numpy()[0]

@pytest.fixture(scope="module", params=["gqa_tied", "mha"])
def split(request, tmp_path_factory):
  hf = hf_model(request.param)
  path = write_hf(hf, tmp_path_factory.mktemp(request.param))
  expect = prompt_logits(*load_llama(path), DEVICES[:1])
  llama, cache = load_llama(path)
  shard_model(llama, DEVICES)
  cache.shard(DEVICES)
  # one decode step as the engine runs it: a captured graph, the position a bound symbolic variable
  v_pos = UOp.variable("start_pos", 0, CONTEXT - 1)
  jit = TinyJit(lambda token, pos: llama(place_input(token, DEVICES), cache, [(0, pos)]).to(DEVICES[0]).realize())
  def step(token: int, pos: int) -> np.ndarray: return jit(Tensor([[token]], dtype=dtypes.int32).realize(), v_pos.bind(pos)).numpy()[0]
  return hf, (llama, cache), expect, step

def test_weights_and_cache_are_split(split):
  _, (llama, cache), _, _ = split
  block = llama.layers[0]
  assert block.self_attn.q_proj.weight.uop.axis == 0 and block.mlp.down_proj.weight.uop.axis == 1
  assert cache.layers[0].uop.axis == 2 and llama.lm_head.weight.uop.axis == 0
  assert isinstance(block.input_layernorm.weight.device, tuple) and block.input_layernorm.weight.uop.axis is None

def test_prompt_logits_equal_single_device(split):
  _, (llama, cache), expect, _ = split
  np.testing.assert_allclose(prompt_logits(llama, cache, DEVICES), expect, atol=1e-4, rtol=0)

def test_decode_through_cache_equals_single_device(split):
  _, (llama, cache), expect, step = split
  llama(place_input(Tensor([PROMPT[:4]], dtype=dtypes.int32), DEVICES), cache, [(0, 0)]).realize()
  for pos in range(4, len(PROMPT)): np.testing.assert_allclose(step(PROMPT[pos], pos), expect[pos], atol=1e-4, rtol=0)

def test_greedy_equals_transformers(split):
  hf, (llama, cache), _, step = split
  logits = llama(place_input(Tensor([PROMPT], dtype=dtypes.int32), DEVICES), cache, [(0, 0)]).to(DEVICES[0]).numpy()[0]
  tokens = [int(logits.argmax())]
  while len(tokens) < 8: tokens.append(int(step(tokens[-1], len(PROMPT) + len(tokens) - 1).argmax()))
  assert tokens == reference_greedy(hf, PROMPT, 8)

def test_heads_must_divide():
  smollm2 = LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152)
  with pytest.raises(UnsupportedModelError, match="n_heads=9 and n_kv_heads=3 cannot be split over 2 devices"): check_divisible(smollm2, 2)
  check_divisible(smollm2, 3)
  mqa = Llama(LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=1, hidden_dim=192, vocab_size=384))
  with pytest.raises(UnsupportedModelError, match="n_kv_heads=1"): shard_model(mqa, DEVICES)
  assert isinstance(mqa.layers[0].self_attn.q_proj.weight.device, str)  # nothing was moved

def test_devices_for():
  assert devices_for("CPU", 2) == ("CPU:0", "CPU:1") and devices_for("CUDA:1", 3) == ("CUDA:1", "CUDA:2", "CUDA:3")
  with pytest.raises(ValueError, match="got 0"): devices_for("CPU", 0)

def test_load_with_devices_generates_like_one_device(tmp_path):
  hf = hf_model("gqa_tied")
  path = write_hf(hf, tmp_path / "hf")
  one, two = tg_llama.load(path, max_context=CONTEXT), tg_llama.load(path, max_context=CONTEXT, devices=2)
  assert two.runner.cache.layers[0].uop.axis == 2
  np.testing.assert_allclose(two.logits(PROMPT), one.logits(PROMPT), atol=1e-4, rtol=0)
  assert list(two.generate(PROMPT, 8)) == reference_greedy(hf, PROMPT, 8)
  sampling = SamplingParams(temperature=0.8, top_k=20, seed=3)
  assert list(two.generate(PROMPT, 6, sampling)) == list(one.generate(PROMPT, 6, sampling))
