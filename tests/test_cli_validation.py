"""The CLI and the API refuse bad options with one line, before any weights are read: in-process, reading a tensor
fails the test; through a subprocess, the error comes back fast and nothing says "loaded"."""
import math, subprocess, sys, time
import numpy as np
import pytest
import tg_llama
from tg_llama import api, cli
from tg_llama.errors import InvalidArgumentError, TgLlamaError, UnsupportedModelError
from tg_llama.sampling import SamplingParams

@pytest.fixture
def no_weights(monkeypatch, restore_backend_state):
  """Reading any weight fails the test: whatever is refused must be refused before that."""
  def read(*args, **kwargs): pytest.fail("weights were read")
  monkeypatch.setattr(api, "load_weights", read)

BAD = {
  ("--temperature", "-1"): "--temperature must be >= 0, but is -1.0",
  ("--temperature", "nan"): "--temperature must be a finite number, but is nan",
  ("--temperature", "inf"): "--temperature must be a finite number, but is inf",
  ("--top-p", "0"): r"--top-p must be in \(0, 1\], but is 0.0",
  ("--top-p", "1.5"): r"--top-p must be in \(0, 1\], but is 1.5",
  ("--min-p", "1"): r"--min-p must be in \[0, 1\), but is 1.0",
  ("--min-p", "-0.1"): r"--min-p must be in \[0, 1\), but is -0.1",
  ("--top-k", "-1"): "--top-k must be an int >= 0, but is -1",
  ("--repetition-penalty", "0"): "--repetition-penalty must be > 0, but is 0.0",
  ("--repetition-penalty", "-2"): "--repetition-penalty must be > 0, but is -2.0",
  ("--seed", "-1"): r"--seed must be None or an int in \[0, 2\*\*64\), but is -1",
  ("--max-new-tokens", "-1"): "--max-new-tokens must be >= 1, but is -1",
  ("--max-new-tokens", "0"): "--max-new-tokens must be >= 1, but is 0",
  ("--max-context", "0"): "--max-context must be >= 1, but is 0",
  ("--max-context", "-5"): "--max-context must be >= 1, but is -5",
  ("--devices", "0"): "--devices must be >= 1, but is 0",
  ("--stage-backends", "cpu,cpu"): "--stage-backends places or sets up stages: give --stages or --layers too",
  ("--stage-dtypes", "float32"): "--stage-dtypes places or sets up stages: give --stages or --layers too",
}

@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option", BAD, ids=" ".join)
def test_cli_refuses_before_loading(no_weights, capsys, smollm2_gguf, command, option):
  argv = [command, "--model", str(smollm2_gguf), *option] + (["--prompt", "hi"] if command == "generate" else [])
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ")
  assert __import__("re").fullmatch(f"error: {BAD[option]}\n", err), err

def test_cli_max_context_the_machine_cannot_hold(no_weights, capsys, smollm2_gguf):
  assert cli.main(["generate", "--model", str(smollm2_gguf), "--backend", "cpu", "--max-context", "1000000000", "--prompt", "hi"]) == 1
  err = capsys.readouterr().err
  # SmolLM2-135M: 30 layers x 3 kv heads x 64, float32: 46 kB a token
  assert err.startswith("error: max_context=1000000000 needs a 4.61e+04 GB KV cache and about 0.") and err.count("\n") == 1
  assert "more than the" in err and "of memory available on this machine" in err

def test_cli_bfloat16_where_the_compiler_lacks_it(no_weights, capsys, smollm2_gguf):
  from tinygrad import Tensor, dtypes
  try:  # the reference: does a bfloat16 kernel build on this machine's CPU backend at all?
    (Tensor([1.5], dtype=dtypes.bfloat16, device="CPU") * 3).float().realize()
    pytest.skip("this machine's clang compiles bfloat16")
  except Exception: pass
  assert cli.main(["generate", "--model", str(smollm2_gguf), "--backend", "cpu", "--dtype", "bfloat16", "--prompt", "hi"]) == 1
  assert capsys.readouterr().err == ("error: dtype bfloat16 does not compile on the cpu backend here (CalledProcessError); "
                                     "use --dtype float32 (its default)\n")

def test_cli_subprocess_one_line_fast(smollm2_gguf):
  start = time.monotonic()
  r = subprocess.run([sys.executable, "-m", "tg_llama.cli", "generate", "--model", str(smollm2_gguf), "--top-p", "2", "--prompt", "hi"],
                     capture_output=True, text=True, timeout=120)
  assert (r.returncode, r.stdout, r.stderr) == (1, "", "error: --top-p must be in (0, 1], but is 2.0\n")
  assert time.monotonic() - start < 30 and "loaded" not in r.stderr

# *** the API ***

@pytest.mark.parametrize("max_context", [0, -1, 1.5, True])
def test_api_refuses_bad_max_context(no_weights, smollm2_gguf, max_context):
  with pytest.raises(InvalidArgumentError, match="max_context must be an int >= 1"): tg_llama.load(smollm2_gguf, max_context=max_context)

def test_api_refuses_a_context_the_machine_cannot_hold(no_weights, smollm2_gguf):
  with pytest.raises(InvalidArgumentError, match="of memory available on this machine"): tg_llama.load(smollm2_gguf, backend="cpu", max_context=10**9)

@pytest.mark.parametrize("kw", [dict(temperature=-0.5), dict(temperature=math.nan), dict(top_p=math.nan), dict(min_p=1.0), dict(top_k=1.5),
                                dict(repetition_penalty=0.0), dict(temperature="1"), dict(seed=True)])
def test_sampling_params_are_one_line_errors(kw):
  with pytest.raises(InvalidArgumentError) as e: SamplingParams(**kw)
  assert isinstance(e.value, TgLlamaError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from tiny_models import hf_model, write_hf
  return tg_llama.load(write_hf(hf_model("mha"), tmp_path_factory.mktemp("tiny") / "hf"), max_context=64)

@pytest.mark.parametrize("ids", [[1, -1], [1, 384], [1, 10**12], [1, 2.0], [1, "2"], [True], [], [1, None]])
def test_api_refuses_token_ids_outside_the_vocabulary(tiny, ids):
  for call in (lambda: tiny.logits(ids), lambda: tiny.generate(ids, 2), lambda: tiny.stream(ids, 2)):
    with pytest.raises(InvalidArgumentError, match="not in the vocabulary \\[0, 384\\)|empty prompt"): call()  # at the call, not at next()

def test_api_accepts_numpy_ids_and_refuses_bad_counts(tiny):
  assert tiny.logits(np.array([1, 17, 250])).shape == (384,)
  assert list(tiny.generate(np.array([1, 17]), 0)) == []
  with pytest.raises(InvalidArgumentError, match="max_new_tokens must be an int >= 0, but is -1"): tiny.generate([1], -1)
  with pytest.raises(InvalidArgumentError, match="sampling must be a SamplingParams"): tiny.generate([1], 2, {"temperature": 1})
