"""`tg-llama bench` runs end to end on a tiny random model and reports every field (no timing assertions:
speeds on a shared machine say nothing about correctness)."""
import importlib.util, json
import pytest
import tg_llama
from tg_llama.bench import main, table
from tiny_models import hf_model, write_hf

FAST = ["--prompt-tokens", "8", "--gen-tokens", "3", "--runs", "1"]
FIELDS = {"load_s", "ttft_cold_s", "ttft_warm_s", "prefill_tok_s", "decode_tok_s", "decode_tok_s_runs"}

@pytest.fixture(scope="module")
def tiny(tmp_path_factory): return write_hf(hf_model("gqa_tied"), tmp_path_factory.mktemp("bench") / "hf")

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
  assert out["machine_copy_gb_s"] > 0 and len(ours["decode_tok_s_runs"]) == 1
  # weights (fp32, the tied head counted once) and the KV cache at the mean position: a lower bound to check the count
  c = tg_llama.load(tiny).config
  assert ours["bytes_per_token"] > 4 * c.n_layers * (2 * c.dim * c.dim + 3 * c.dim * c.hidden_dim) + 4 * c.vocab_size * c.dim
  peers = {p["name"]: p for p in out["compare"]}
  assert FIELDS <= set(peers["transformers"])
  if importlib.util.find_spec("llama_cpp") is None: assert "pip install llama-cpp-python" in peers["llama.cpp"]["skipped"]
  else: assert "directory" in peers["llama.cpp"]["skipped"]  # llama.cpp runs GGUF files only

def test_constrained_decode_on_the_default_model(capsys):
  out = run_json(capsys, FAST)  # the bundled model: the JSON schema's grammar needs its tokenizer
  assert out["ours"]["constrained_decode_tok_s"] > 0 and out["ours"]["matcher_us_per_token"] > 0
  assert "under a JSON schema" in table(out)

def test_table(tiny, capsys):
  assert main(["--model", str(tiny), *FAST]) == 0
  out = capsys.readouterr().out
  assert "decode tok/s" in out and "tg-llama" in out and "numpy copy" in out

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
