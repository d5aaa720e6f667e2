"""Decode and prefill run as captured TinyJit graphs: after warm-up, generating many more tokens (at new
positions, so only a symbolic start position can serve them) lowers and compiles no new kernel."""
from tinygrad import Tensor
from tinygrad.codegen import to_program_cache
import tg_llama
from tg_llama.sampling import SamplingParams
from tiny_models import PROMPT, hf_model, write_hf

def test_no_new_kernels_after_warm_up(tmp_path):
  model = tg_llama.load(write_hf(hf_model("gqa_tied"), tmp_path / "hf"), max_context=128)
  sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=0)
  for run in range(2):  # warm-up: every graph, twice: both prefill chunks, steps of 1, 2, 4 and 8 rows, both heads
    for n in (1, 2, 3, 7, 24, 70):  # prompts of new prefixes: 24 tokens are a half chunk, 70 a chunk and 6 rows
      list(model.generate([100 * run + n + i for i in range(n)], 4))
      list(model.generate([100 * run + n + 50 + i for i in range(n)], 4, sampling))
  kernels, decode = len(to_program_cache), model.runner.decode_jits[1].captured
  prompt = PROMPT + [5] * 70  # a longer prompt: a prefill chunk and rows, then decode far past the warm-up's positions
  greedy = list(model.generate(prompt, 40))
  sampled = list(model.generate(PROMPT[:3], 60, sampling))
  assert len(greedy) == 40 and len(sampled) == 60
  assert len(to_program_cache) == kernels
  assert model.runner.decode_jits[1].captured is decode
  # the counter does see a kernel that is new
  (Tensor([1.0, 2.0, 3.0]).exp2() * 3).realize()
  assert len(to_program_cache) > kernels

def test_a_call_with_the_same_inputs_skips_tinygrads_input_checks(monkeypatch):
  # the engine calls each graph with the same input buffers every step, only the variables' values new: those calls go
  # straight to the graph (tinygrad's preparing of the inputs cost 0.1-0.2 ms a call); new inputs are checked again
  import numpy as np
  import tinygrad.engine.jit as tinygrad_jit
  from tinygrad import UOp
  from tg_llama.engine.runner import Jit
  checks, prepare = [], tinygrad_jit._prepare_jit_inputs
  monkeypatch.setattr(tinygrad_jit, "_prepare_jit_inputs", lambda *a: checks.append(1) or prepare(*a))
  table = np.arange(32, dtype=np.float32).reshape(8, 4)
  t, row = Tensor(table).realize(), UOp.variable("row", 0, 7)
  jit = Jit(lambda x, r: (x * t[r:r + 1]).sum(1).realize())
  x, y = Tensor(np.full((1, 4), 2, np.float32)).realize(), Tensor(np.full((1, 4), 3, np.float32)).realize()
  for r in (1, 2):
    assert jit(x, row.bind(r)).item() == 2 * table[r].sum()  # captures, then tinygrad's checks
  assert len(checks) == 2 and len(jit.known) == 1
  for r in (5, 0, 7, 3):
    assert jit(x, row.bind(r)).item() == 2 * table[r].sum()
  assert len(checks) == 2
  assert jit(y, row.bind(6)).item() == 3 * table[6].sum() and len(checks) == 3  # another input: checked
  for r in (4, 1):  # both inputs known now, in turn (a head's logits from the prefill graph, then the decode step's)
    assert jit(x, row.bind(r)).item() == 2 * table[r].sum() and jit(y, row.bind(r)).item() == 3 * table[r].sum()
  assert len(checks) == 3
