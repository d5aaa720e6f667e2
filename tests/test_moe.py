"""Mixtral-style sparse MoE (tg_llama/models/mixtral.py). Tiny random Mixtrals written by transformers (HF) and by gguf-py
(a GGUF whose layers hold float32, Q8_0 and Q4_0 experts) give transformers' logits (float32, within 1e-4; a quantized
file against transformers run on the weights gguf-py decodes it to) for the prompt and token by token through the
engine's KV cache, and its greedy tokens. int8/int4 quantize the experts; a decode step reads only the routed experts;
layer shards and devices split the model. tinygrad schedules each new call shape for seconds, so each model here is
loaded once and run through few shapes. Last, a one-layer Mixtral GGUF that carries a SentencePiece vocabulary goes
through `tg-llama bench`, `generate` and `chat` in subprocesses; the text they print is transformers' greedy tokens as
the sentencepiece library decodes them."""
import json, os, pathlib, subprocess, sys
import numpy as np
import pytest
import torch
from tinygrad import GlobalCounters, Tensor, dtypes
from transformers import MixtralForCausalLM
import tg_llama
from tg_llama.config import LlamaConfig
from tg_llama.convert import canonical_shapes, convert_checkpoint, open_checkpoint
from tg_llama.engine.kv_cache import KVCache
from tg_llama.errors import CheckpointError
from tg_llama.parallel import place_input
from tg_llama.quantize import Int4Experts, Int8Experts, build_layer
from test_quantize import np_int4, np_int4_dequant, np_int8
from test_sentencepiece_gguf import add_vocab, meta_chat_ids, sp  # noqa: F401 (sp: the trained SentencePiece model, a fixture)
from tiny_models import (MIXTRAL, PROMPT, dequantized_copy, gguf_roundtrip, mixtral_model, reference_greedy, reference_logits,
                         write_gguf, write_hf)

TOL = 1e-4
E, K = MIXTRAL["num_local_experts"], MIXTRAL["num_experts_per_tok"]
EXPERT_TYPES = ("F32", "Q8_0", "Q4_0")  # the GGUF's experts, by layer; every other matrix Q8_0 (the router F32, as llama.cpp writes it)

@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
  model = mixtral_model()
  return model, write_hf(model, tmp_path_factory.mktemp("mixtral") / "hf")

@pytest.fixture(scope="module")
def hf_loaded(mixtral):
  return tg_llama.load(mixtral[1], max_context=64)

@pytest.fixture(scope="module")
def gguf_loaded(mixtral, tmp_path_factory):
  model, _ = mixtral
  path = write_gguf(model, tmp_path_factory.mktemp("mixtral_gguf") / "m.gguf",
                    lambda name: EXPERT_TYPES[int(name.split(".")[1])] if "_exps." in name else "Q8_0")
  reference = dequantized_copy(model, lambda name, w: gguf_roundtrip(EXPERT_TYPES[int(name.split(".")[2])] if ".experts." in name else "Q8_0", w))
  return tg_llama.load(path, max_context=64), reference

def assert_matches(ours: tg_llama.Model, reference: MixtralForCausalLM):
  """The whole prompt in one call (every expert over its rows), its logits at every position; then through the engine,
  each position again from a request that continues the slot's cached prefix by one token (a decode row: the routed
  experts gathered); then greedy generation."""
  ref, c, device = reference_logits(reference, PROMPT), ours.config, ours.backend.device
  cache = KVCache(c, range(c.n_layers), 1, 64, dtypes.float32, device)
  np.testing.assert_allclose(ours.llama(Tensor([PROMPT], device=device), cache, [(0, 0)], last_only=False).numpy()[0], ref, atol=TOL, rtol=0)
  for t in range(1, len(PROMPT) + 1): np.testing.assert_allclose(ours.logits(PROMPT[:t]), ref[t - 1], atol=TOL, rtol=0, err_msg=f"{t} tokens")
  assert list(ours.generate(PROMPT, 6)) == reference_greedy(reference, PROMPT, 6)

def test_hf(mixtral, hf_loaded):
  model, _ = mixtral
  assert (hf_loaded.config.arch, hf_loaded.config.n_experts, hf_loaded.config.n_active_experts) == ("mixtral", E, K)
  assert hf_loaded.llama.layers[0].block_sparse_moe.experts.w1.weight.shape == (E, MIXTRAL["intermediate_size"], MIXTRAL["hidden_size"])
  assert_matches(hf_loaded, model)

def test_gguf(gguf_loaded):
  ours, reference = gguf_loaded
  assert (ours.config.arch, ours.config.n_experts, ours.config.n_active_experts) == ("mixtral", E, K)
  for i, qtype in enumerate(EXPERT_TYPES):  # the experts stay in the file's blocks
    assert ours.quantization["types"][f"model.layers.{i}.block_sparse_moe.experts.w2"] == qtype
    assert type(ours.llama.layers[i].block_sparse_moe.experts.w2).__name__ == {"F32": "Experts", "Q8_0": "Int8Experts", "Q4_0": "Int4Experts"}[qtype]
  assert_matches(ours, reference)

def decode_step_bytes(model: tg_llama.Model, active: int) -> int:
  """Bytes the kernels of one decode step read and write (tinygrad's count), each token routed to `active` experts."""
  c, moes = model.config, [block.block_sparse_moe for block in model.llama.layers.values()]
  cache = KVCache(c, range(c.n_layers), 1, 64, model.dtype, model.backend.device)
  try:
    for moe in moes: moe.k = active
    GlobalCounters.reset()
    model.llama(Tensor([[PROMPT[0]]], device=model.backend.device), cache, [(0, 0)]).realize()
    return GlobalCounters.global_mem
  finally:
    for moe in moes: moe.k = K

@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_decode_reads_only_routed_experts(which, hf_loaded, gguf_loaded):
  """Each expert a decode step routes to costs one expert's bytes (and its activations, and for quantized experts a copy
  of its gathered scales): the unrouted ones are not read. Measured, one step: HF float32 (3 layers) 0.74 MB with 2 of 4
  experts routed, 1.20 MB through all 4 (the dense equivalent), of 0.88 MB of experts; the GGUF (float32, Q8_0 and Q4_0
  experts) 0.36 MB with 2, 0.62 MB with all 4, of 0.43 MB of experts."""
  model = hf_loaded if which == "hf" else gguf_loaded[0]
  experts = sum(t.nbytes() for name, t in model.llama.weights().items() if ".experts." in name)
  routed, one_more = decode_step_bytes(model, K), decode_step_bytes(model, K + 1)
  assert experts / E <= one_more - routed < 1.3 * experts / E, f"{routed} bytes with {K} experts routed, {one_more} with {K + 1}; experts hold {experts}"

@pytest.mark.parametrize("cls", [Int8Experts, Int4Experts])
def test_quantized_experts_layer(cls):
  """Packing and in-kernel decode of stacked experts against numpy, gathered (a decode row's k experts) and all at once."""
  rng = np.random.default_rng(0)
  w, x = (rng.standard_normal((E, 48, 64)) * 0.05).astype(np.float32), rng.standard_normal((1, 1, 1, 64)).astype(np.float32)
  rows = w.reshape(-1, 64)
  deq = ((lambda q, scale: q * scale)(*np_int8(rows)) if cls is Int8Experts else np_int4_dequant(*np_int4(rows))).reshape(w.shape)
  layer = build_layer(cls, cls.quantize(Tensor(w)), w.shape)
  sel = np.array([[[3, 1]]], dtype=np.int32)
  np.testing.assert_allclose(layer(Tensor(x), Tensor(sel)).numpy()[0, 0], deq[[3, 1]] @ x[0, 0, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer(Tensor(x)).numpy()[0, 0], deq @ x[0, 0, 0], rtol=1e-5, atol=1e-5)

def test_int4_model(mixtral):
  """--quantize int4 swaps the experts too (the router and the embedding stay float): transformers on the weights that
  a numpy implementation of the scheme gives."""
  model, path = mixtral
  ours = tg_llama.load(path, max_context=64, quantize="int4")
  assert type(ours.llama.layers[0].block_sparse_moe.experts.w3) is Int4Experts
  reference = dequantized_copy(model, lambda _, w: np_int4_dequant(*np_int4(w)), keep=("mlp.gate.weight", "embed_tokens.weight"))
  cache = KVCache(ours.config, range(ours.config.n_layers), 1, 64, dtypes.float32, ours.backend.device)
  logits = ours.llama(Tensor([PROMPT], device=ours.backend.device), cache, [(0, 0)], last_only=False).numpy()[0]
  np.testing.assert_allclose(logits, reference_logits(reference, PROMPT), atol=TOL, rtol=0)

def test_shards_chain_equals_whole(mixtral):
  model, path = mixtral
  plan = open_checkpoint(path).config.shard_plan(2)
  shards = [tg_llama.load_shard(path, a, b, max_context=64) for a, b in plan]
  assert [sorted(s.layers) for s in shards] == [[0], [1, 2]]
  x = Tensor([PROMPT])
  for shard in shards: x = shard(x, 0, last_only=False)
  np.testing.assert_allclose(x.numpy()[0], reference_logits(model, PROMPT), atol=TOL, rtol=0)
  x = Tensor([[7]])
  for shard in shards: x = shard(x, len(PROMPT))
  np.testing.assert_allclose(x.numpy()[0], reference_logits(model, PROMPT + [7])[-1], atol=TOL, rtol=0)

def test_devices_split_experts(mixtral):
  """Tensor parallel over two CPU devices: each holds every expert's half of the hidden axis. One decode row (the routed
  experts gathered on each device), then the rest of the prompt (every expert)."""
  model, path = mixtral
  two = tg_llama.load(path, max_context=32, devices=2)
  assert two.llama.layers[0].block_sparse_moe.experts.w2.weight.uop.axis == 2
  c, devices = two.config, two.devices
  cache = KVCache(c, range(c.n_layers), 1, 32, dtypes.float32, devices[0])
  cache.shard(devices)
  run = lambda ids, pos: two.llama(place_input(Tensor([ids], dtype=dtypes.int32, device=devices[0]), devices), cache, [(0, pos)]).to(devices[0]).numpy()[0]
  ref = reference_logits(model, PROMPT)
  np.testing.assert_allclose(run(PROMPT[:1], 0), ref[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(run(PROMPT[1:], 1), ref[-1], atol=TOL, rtol=0)

def test_convert_to_hf_loads_in_transformers(mixtral, tmp_path):
  model, _ = mixtral
  out = convert_checkpoint(write_gguf(model, tmp_path / "m.gguf"), tmp_path / "out", dtype=dtypes.float32)
  converted = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(reference_logits(converted, PROMPT), reference_logits(model, PROMPT), atol=1e-5, rtol=0)

def test_config(mixtral):
  _, path = mixtral
  cfg = json.loads((path / "config.json").read_text())
  assert {k: LlamaConfig.from_hf(cfg).to_hf()[k] for k in ("model_type", "num_local_experts", "num_experts_per_tok")} == \
         {"model_type": "mixtral", "num_local_experts": E, "num_experts_per_tok": K}
  with pytest.raises(CheckpointError, match="missing key 'num_local_experts'"): LlamaConfig.from_hf({**cfg, "num_local_experts": None})
  with pytest.raises(CheckpointError, match="missing key 'num_experts_per_tok'"): LlamaConfig.from_hf({**cfg, "num_experts_per_tok": None})
  preset = LlamaConfig.preset("mixtral-8x7b")
  assert (preset.n_layers, preset.n_experts, preset.n_active_experts, preset.shard_plan(4)[1]) == (32, 8, 2, (8, 16))
  shapes = canonical_shapes(preset, 8, 16)
  assert len(shapes) == 8 * 10 and shapes["model.layers.8.block_sparse_moe.experts.w2.weight"] == (8, 4096, 14336)

# *** a Mixtral GGUF with a SentencePiece vocabulary, through the command line ***

@pytest.fixture(scope="module")
def spm_mixtral(sp, tmp_path_factory):
  """The tiny Mixtral cut to one layer, its vocabulary `sp`'s 800 pieces (the embedding and head resized, the new rows
  random), as a GGUF that carries `sp` as convert_hf_to_gguf.py writes it and no chat template (Llama 2's is the
  fallback). Float32 and one layer, as each command schedules its graphs anew: Q8_0 (its layers built at load,
  other kernels) costs some 40% more CPU time, and test_gguf checks the blocks."""
  import gguf
  from gguf.scripts.gguf_new_metadata import copy_with_new_metadata
  model = mixtral_model()
  model.model.layers, model.config.num_hidden_layers = model.model.layers[:1], 1
  model.resize_token_embeddings(sp.vocab_size(), mean_resizing=False)
  tmp = tmp_path_factory.mktemp("spm_mixtral")
  reader = gguf.GGUFReader(write_gguf(model, tmp / "gpt2_vocab.gguf"))
  w = gguf.GGUFWriter(str(tmp / "mixtral.gguf"), "llama")
  add_vocab(w, sp, sp.vocab_size())
  copy_with_new_metadata(reader, w, {}, [name for name in reader.fields if name.startswith("tokenizer.")])
  return model, tmp / "mixtral.gguf"

def cli(*args: str, stdin: str = "", cache: pathlib.Path) -> str:
  """`tg-llama ARGS --backend cpu` in a subprocess, its kernels and graphs cached in `cache`: its stdout, once it exited 0
  without a traceback."""
  env = {**os.environ, "TG_LLAMA_CACHE": str(cache), "XDG_CACHE_HOME": str(cache / "xdg")}
  r = subprocess.run([str(pathlib.Path(sys.executable).with_name("tg-llama")), *args, "--backend", "cpu"], input=stdin, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
  return r.stdout

def continuation(model: MixtralForCausalLM, sp, ids: list[int]) -> str:
  """transformers' greedy tokens after `ids`, up to 8 or the end-of-sequence token, decoded by the sentencepiece library:
  what the prompt's decoding grows by (the dummy prefix's space kept, as a streamed continuation keeps it)."""
  new = reference_greedy(model, ids, 8)
  if sp.eos_id() in new: new = new[:new.index(sp.eos_id())]
  return sp.decode(ids + new)[len(sp.decode(ids)):]

# The three commands share a kernel and graph cache, a context of 32 and prompts that run as steps of 5 to 8 rows, so
# that generate and chat replay the graphs bench captured (in this order; apart each compiles its own). Measured on 2
# busy cores, in CPU time: bench 54 s (compiling), generate 3 s, chat 12 s (its warm-up's 2-row graph).

@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory): return tmp_path_factory.mktemp("cli_cache")

def test_spm_gguf_bench(spm_mixtral, cli_cache):
  _, path = spm_mixtral
  out = cli("bench", "--model", str(path), "--prompt-tokens", "24", "--gen-tokens", "8", "--runs", "1", cache=cli_cache).splitlines()
  header = next(line for line in out if "prefill tok/s" in line)
  assert "decode tok/s" in header and any(line.startswith("tg-llama CPU float32 quantize=none ") for line in out), out
  assert any(line.startswith("tg-llama under a JSON schema: ") for line in out), out  # constrained decoding over this vocabulary

def test_spm_gguf_generate(spm_mixtral, sp, cli_cache):
  model, path = spm_mixtral
  prompt = "The quick brown fox jumps"
  ids = [sp.bos_id(), *sp.encode(prompt)]
  out = cli("generate", "--model", str(path), "--max-context", "32", "--prompt", prompt, "--max-new-tokens", "8", cache=cli_cache)
  assert len(ids) == 23 and out == prompt + continuation(model, sp, ids) + "\n"

def test_spm_gguf_chat(spm_mixtral, sp, cli_cache):
  """Prompted by the Llama 2 template, as Meta's code builds its ids."""
  model, path = spm_mixtral
  ids = meta_chat_ids(sp, [{"role": "user", "content": "Hello there"}])
  out = cli("chat", "--model", str(path), "--max-context", "32", "--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", "8",
            stdin="Hello there\n", cache=cli_cache)
  assert len(ids) == 23 and out == continuation(model, sp, ids) + "\n" and out.strip()
