"""`tg-llama bench` runs end to end on a tiny random model and reports every field (no timing assertions:
speeds on a shared machine say nothing about correctness)."""
import importlib.util, json, os, re, signal
from dataclasses import replace
import numpy as np
import pytest
import tg_llama
from tg_llama import api, synthetic
from tg_llama.bench import main, parse_args, run_peer, table
from tg_llama.cli import main as cli_main
from tg_llama.config import PRESETS, Llama3RopeScaling, LlamaConfig
from tg_llama.convert import source_names
from tiny_models import hf_model, write_hf

FAST = ["--prompt-tokens", "8", "--gen-tokens", "3", "--runs", "1"]
FIELDS = {"load_s", "ttft_cold_s", "ttft_warm_s", "prefill_tok_s", "decode_tok_s", "decode_tok_s_runs"}

@pytest.fixture(scope="module")
def tiny(tmp_path_factory): return write_hf(hf_model("gqa_tied"), tmp_path_factory.mktemp("bench") / "hf")

# --synthetic's models (tg_llama/synthetic.py) from a tiny preset-like config
TINY = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=1024, rope_theta=500000.0,
                   rope_scaling=Llama3RopeScaling(factor=32.0), tie_embeddings=True)

@pytest.fixture
def tiny_preset(tmp_path, monkeypatch):
  """"tiny" as a preset, and a cache folder of the test's own."""
  monkeypatch.setenv("TG_LLAMA_CACHE", str(tmp_path))
  monkeypatch.setitem(PRESETS, "tiny", TINY)
  return "tiny"

def run_json(capsys, argv: list[str]) -> dict:
  assert main(argv + ["--json"]) == 0
  return json.loads(capsys.readouterr().out)

def test_json_fields(tiny, capsys):
  out = run_json(capsys, ["--model", str(tiny), *FAST, "--compare", "transformers", "--compare", "llama.cpp"])
  assert {"model", "prompt_tokens", "gen_tokens", "runs", "machine_copy_gb_s", "bandwidth_pct", "ours", "compare"} <= set(out)
  ours = out["ours"]
  assert FIELDS | {"peak_rss_mb", "bytes_per_token", "achieved_gb_s", "device", "dtype", "quantize", "sampled_decode_tok_s"} <= set(ours)
  assert ours["sampled_decode_tok_s"] > 0 and ours["sampling"]["temperature"] > 0
  assert ours["quantize"] == "none" and ours["dtype"] == "float32"
  assert all(ours[k] > 0 for k in ("ttft_cold_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "machine_copy_gb_s") if k in ours)
  # the memory bound: the checkpoint's files (config.json and model.safetensors here) and the KV cache, plus 25%
  assert ours["checkpoint_mb"] == pytest.approx(sum(f.stat().st_size for f in tiny.iterdir()) / 2**20) and ours["kv_cache_mb"] > 0
  assert ours["rss_bound_mb"] == pytest.approx(1.25 * (ours["checkpoint_mb"] + ours["kv_cache_mb"]))
  assert ours["rss_within_bound"] == (ours["peak_rss_mb"] <= ours["rss_bound_mb"])
  assert out["machine_copy_gb_s"] > 0 and len(ours["decode_tok_s_runs"]) == 1
  # weights (fp32, the tied head counted once) and the KV cache at the mean position: a lower bound to check the count
  c = tg_llama.load(tiny).config
  assert ours["bytes_per_token"] > 4 * c.n_layers * (2 * c.dim * c.dim + 3 * c.dim * c.hidden_dim) + 4 * c.vocab_size * c.dim
  peers = {p["name"]: p for p in out["compare"]}
  assert FIELDS | {"peak_rss_mb"} <= set(peers["transformers"])  # measured in its own process
  if importlib.util.find_spec("llama_cpp") is None: assert "pip install llama-cpp-python" in peers["llama.cpp"]["skipped"]
  else: assert "directory" in peers["llama.cpp"]["skipped"]  # llama.cpp runs GGUF files only

def dies_of_an_illegal_instruction(args, path, vocab):
  """A peer whose native code was built for another CPU: the kernel kills its process with SIGILL."""
  os.kill(os.getpid(), signal.SIGILL)

def test_a_crashing_peer_is_one_line(tiny):
  """A peer that dies (llama.cpp built for another CPU: an illegal instruction) is a line of the table, not the bench's end."""
  args = parse_args(["--model", str(tiny), *FAST])
  out = run_peer("llama.cpp", dies_of_an_illegal_instruction, args, tiny, 1024)
  assert out["name"] == "llama.cpp" and out["skipped"].startswith("crashed, killed by SIGILL (an illegal instruction")
  assert "pip install --no-binary llama-cpp-python" in out["skipped"]
  result = {"model": str(tiny), "prompt_tokens": 8, "gen_tokens": 3, "runs": 1, "machine_copy_gb_s": 1.0, "compare": [out],
            "ours": {"device": "CPU", "dtype": "float32", "quantize": "none", "prefill_tok_s": 1.0, "decode_tok_s": 1.0,
                     "ttft_cold_s": 1.0, "ttft_warm_s": 1.0, "peak_rss_mb": 1.0, "achieved_gb_s": 1.0, "kernel_choices": "defaults",
                     "load_s": 1.0, "bytes_per_token": 1, "sampling": {"temperature": 0.7}, "sampled_decode_tok_s": 1.0,
                     "rss_within_bound": True, "rss_bound_mb": 1.0, "checkpoint_mb": 1.0, "kv_cache_mb": 1.0, "runtime_rss_mb": 1.0}}
  assert "llama.cpp: crashed, killed by SIGILL" in table(result)

def test_constrained_decode_on_the_default_model(capsys):
  out = run_json(capsys, FAST)  # the bundled model: the JSON schema's grammar needs its tokenizer
  assert out["ours"]["constrained_decode_tok_s"] > 0 and out["ours"]["matcher_us_per_token"] > 0
  assert out["ours"]["constrained_peak_rss_mb"] >= out["ours"]["peak_rss_mb"]  # the model's runs' peak, taken before
  assert "under a JSON schema" in table(out)

def test_table(tiny_preset, capsys):
  """The table, on a --synthetic model (its GGUF blocks kept): peak memory next to its bound."""
  assert main(["--synthetic", tiny_preset, *FAST]) == 0
  out = capsys.readouterr().out
  assert "decode tok/s" in out and "tg-llama CPU float32 quantize=gguf" in out and "numpy copy" in out and "tiny.Q4_1.gguf" in out
  assert re.search(r"peak RSS \d+ MB (within|OVER) the bound of \d+ MB = 1.25 x \(checkpoint 0 MB \+ KV cache 0 MB\)", out)

def test_quantize_flag(tiny, capsys):
  plain, int8 = (run_json(capsys, ["--model", str(tiny), *FAST, *q])["ours"] for q in ([], ["--quantize", "int8"]))
  assert (plain["quantize"], int8["quantize"]) == ("none", "int8")
  assert int8["bytes_per_token"] < plain["bytes_per_token"]  # the int8 weights are read, not float32 ones

def test_bad_arguments():
  with pytest.raises(SystemExit): main(["--gen-tokens", "1"])
  with pytest.raises(SystemExit): main(["--quantize", "int3"])

def test_concurrency_through_the_server(capsys):
  """--concurrency: streams through a `tg-llama serve` it starts (the default model), every level and the next chat turn
  reported; the next turn reuses the history the server holds."""
  pytest.importorskip("openai"), pytest.importorskip("uvicorn")
  out = run_json(capsys, ["--concurrency", "1,2", "--prompt-tokens", "8", "--gen-tokens", "4", "--rounds", "1"])
  levels = out["levels"]
  assert [(l["concurrency"], l["requests"]) for l in levels] == [(1, 1), (2, 2)]
  assert all(0 < l["tokens"] <= 4 * l["requests"] and l["aggregate_tok_s"] > 0 and l["decode_tok_s"] > 0 and l["ttft_p50_s"] > 0 for l in levels)
  turns = out["chat_turns"]
  assert 0 < turns["reused_tokens"] < turns["history_tokens"] and turns["ttft_history_s"] > 0 and turns["ttft_alone_s"] > 0

# ---- --synthetic: a random-weight GGUF of a preset's shape ----

def test_synthetic_file_reads_back(tiny_preset):
  """The file: private, seeded (the same bytes when written again), reused; its tensors as tg_llama.load reads them are
  gguf-py's own dequantization of its blocks (the q/k rows permuted as llama.cpp stores them), its vocabulary SmolLM2's
  cut to the preset's size."""
  gguf = pytest.importorskip("gguf")
  path = synthetic.cached_file(tiny_preset)
  assert path.parent.name == "synthetic" and path.stat().st_mode & 0o777 == 0o600
  mtime = path.stat().st_mtime_ns
  assert synthetic.cached_file(tiny_preset) == path and path.stat().st_mtime_ns == mtime  # reused, not written again
  assert synthetic.write_gguf(TINY, path.with_name("again.gguf"), tiny_preset).read_bytes() == path.read_bytes()
  model = tg_llama.load(path, quantize="none")
  ours, to_canonical = model.llama.weights(), {v[0]: k for k, v in source_names(model.config, "gguf").items()}
  reader = gguf.GGUFReader(path)
  assert {to_canonical[t.name] for t in reader.tensors if t.name != "rope_freqs.weight"} | {"lm_head.weight"} == set(ours)  # tied
  for t in reader.tensors:
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
    if t.name == "rope_freqs.weight":
      np.testing.assert_allclose(model.config.rope_inv_freq(), replace(TINY, rope_scaling=None, rope_freq_factors=tuple(want)).rope_inv_freq())
      continue
    assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.Q4_1)
    name = to_canonical[t.name]
    if heads := {"q_proj": TINY.n_heads, "k_proj": TINY.n_kv_heads}.get(name.split(".")[-2]):  # llama.cpp's interleaved rotary pairs
      want = want.reshape(heads, -1, 2, want.shape[-1]).swapaxes(1, 2).reshape(want.shape)
    np.testing.assert_allclose(ours[name].numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)
  assert 0.015 < float(ours["model.layers.0.mlp.up_proj.weight"].numpy().std()) < 0.025  # as HF initializes weights
  vocab = model.tokenizer
  assert model.config.vocab_size == TINY.vocab_size and vocab.decode(vocab.encode("hello world")) == "hello world"

def test_synthetic_refusals(tiny_preset, capsys, monkeypatch):
  """One line each, nothing written: a name that is no preset, a model this machine's memory cannot hold."""
  assert cli_main(["bench", "--synthetic", "llama-9b"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "'llama-9b' is not a preset" in err and "llama-3.2-1b" in err
  monkeypatch.setattr(api, "mem_available", lambda: 10**4)
  assert cli_main(["bench", "--synthetic", tiny_preset]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "do not fit in the 1e-05 GB of memory available" in err
  assert not list(synthetic.folder().iterdir())

def test_synthetic_plans():
  """Every preset's tensors as llama.cpp names and types them: an untied head, a router kept F32, Llama 3.1's RoPE."""
  plan = lambda name: {n: (shape, typ) for n, shape, typ in synthetic.tensor_plan(PRESETS[name])}
  one_b, seven_b, mixtral = plan("llama-3.2-1b"), plan("llama-2-7b"), plan("mixtral-8x7b")
  assert "output.weight" not in one_b and one_b["rope_freqs.weight"] == ((32,), "F32") and one_b["token_embd.weight"] == ((128256, 2048), "Q4_1")
  assert seven_b["output.weight"] == ((32000, 4096), "Q4_1") and "rope_freqs.weight" not in seven_b
  assert mixtral["blk.0.ffn_gate_inp.weight"] == ((8, 4096), "F32") and mixtral["blk.0.ffn_down_exps.weight"] == ((8, 4096, 14336), "Q4_1")
  assert synthetic.file_bytes(PRESETS["llama-3.2-1b"]) == 772_612_224  # 1.24e9 weights in 20-byte blocks of 32
