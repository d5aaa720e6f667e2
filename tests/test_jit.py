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

def _two_realizes(scale: float):
  """A function of two realizes, its kernels new to this process (`scale` a constant no other test uses), and its numpy twin."""
  import numpy as np
  w = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
  wt = Tensor(w).realize()
  def f(x: Tensor) -> Tensor:
    h = ((x @ wt) * scale).relu().realize()
    return (h.exp2() + scale).sum(1).realize()
  return f, lambda x: (np.exp2(np.maximum(x @ w * scale, 0)) + scale).sum(1)

def test_a_captures_kernels_compile_while_it_is_still_being_captured(monkeypatch):
  # tinygrad compiles a capture's kernels once its function has returned (jit_lower); ours go to the compile pool as each
  # realize is captured, so that compiling overlaps the scheduling of the rest, and jit_lower finds every one compiled and
  # in place; the capture's own run of its graph is the CPU runner's, not tinygrad's replay
  import numpy as np
  from tinygrad import Context
  from tinygrad.engine import jit as tinygrad_jit, realize
  from tinygrad.uop.ops import Ops
  from tg_llama.cpu.graph import ThreadedJit
  from tg_llama.engine.runner import Jit
  compiled_late, to_compile, lower = [], [], realize.lower_and_compile
  def counting(linear):
    before = len(realize.to_program_cache)
    to_compile.append(sum(1 for c in linear.toposort() if c.op is Ops.CALL and realize._get_call_to_compile(c) is not None))
    out = lower(linear)
    compiled_late.append(len(realize.to_program_cache) - before)
    return out
  replays, replay = [], tinygrad_jit.CapturedJit.__call__
  monkeypatch.setattr(tinygrad_jit.CapturedJit, "__call__", lambda *a: replays.append(1) or replay(*a))
  f, reference = _two_realizes(0.4321)
  sent_while_capturing = []
  def noting(x):
    out = f(x)
    sent_while_capturing.append(len(jit.early.pending))  # the function has not returned yet
    return out
  jit = Jit(noting)
  x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
  with Context(PARALLEL=1):
    monkeypatch.setattr(realize, "lower_and_compile", counting)
    out = jit(Tensor(x).realize()).numpy()
  assert jit.captured is not None and sent_while_capturing[0] >= 2  # both realizes' kernels
  assert sum(compiled_late) == 0 and sum(to_compile) == 0 and not jit.early.pending
  assert isinstance(jit.captured, ThreadedJit) and not replays
  np.testing.assert_allclose(out, reference(x), rtol=1e-5)
  again = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)
  np.testing.assert_allclose(jit(Tensor(again).realize()).numpy(), reference(again), rtol=1e-5)  # the graph replays

def test_without_a_pool_or_tinygrads_internals_a_capture_compiles_as_tinygrad_does(monkeypatch):
  import numpy as np
  from tinygrad import Context
  from tg_llama.engine import early_compile
  from tg_llama.engine.runner import Jit
  x = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
  for n, (scale, parallel) in enumerate(((0.5678, 0), (0.6789, 1))):
    if n == 1: monkeypatch.setattr(early_compile, "NEEDS", early_compile.NEEDS + ("internal_of_another_version",))
    f, reference = _two_realizes(scale)
    jit = Jit(f)
    with Context(PARALLEL=parallel):
      np.testing.assert_allclose(jit(Tensor(x).realize()).numpy(), reference(x), rtol=1e-5)
    assert jit.captured is not None and not jit.early.pending
