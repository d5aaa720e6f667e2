"""The CPU's own replay of captured graphs (tg_llama/cpu/graph.py), its kernel choices (tg_llama/cpu/opts.py) and its
layout (tg_llama/cpu/__init__.py's LAYOUT): replaying from C on several threads gives exactly what tinygrad's replay gives,
graphs it cannot take fall back to tinygrad's, and the one-token products and decode attention it tunes compute the
right numbers in the CPU's layout and in the plain one (checked against numpy, an independent implementation)."""
from __future__ import annotations
import os, pickle
import numpy as np
import pytest
from tinygrad import Tensor, UOp
from tinygrad.engine.jit import CapturedJit
from tinygrad.helpers import NUM_CPU_THREADS
import tg_llama
from tg_llama import cpu
from tg_llama.backend import KernelLayout
from tg_llama.cpu import graph as cpu_graph, opts as cpu_opts, tune
from tg_llama.engine.runner import Jit
from tg_llama.linear import lanes_matvec
from tg_llama.models.blocks import decode_attention, prefill_attention
from tg_llama.quantize import Int4Linear
from tiny_models import PROMPT, hf_model, write_hf

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
  return write_hf(hf_model("gqa_tied"), tmp_path_factory.mktemp("tiny") / "hf")

def run(path, monkeypatch, graph: bool) -> tuple[np.ndarray, list[int], object]:
  """Prefill logits, 12 greedy tokens (decode steps), and the decode JIT's captured graph."""
  monkeypatch.setenv("TG_LLAMA_CPU_GRAPH", "1" if graph else "0")
  model = tg_llama.load(path, max_context=96, graph_cache=False)
  logits = model.logits(PROMPT + [5] * 70)  # two prefill chunks
  tokens = list(model.generate(PROMPT, 12))
  tokens = list(model.generate(PROMPT, 12))  # again: replays the captured graphs
  return logits, tokens, model.runner.decode_jits[1].captured

def test_replay_from_c_equals_tinygrads(tiny_path, monkeypatch):
  ours, theirs = run(tiny_path, monkeypatch, graph=True), run(tiny_path, monkeypatch, graph=False)
  assert isinstance(ours[2], cpu_graph.ThreadedJit) and type(theirs[2]) is CapturedJit
  np.testing.assert_array_equal(ours[0], theirs[0])
  assert ours[1] == theirs[1]

def test_written_buffers_are_tinygrads(tiny_path, monkeypatch):
  model = tg_llama.load(tiny_path, max_context=96, graph_cache=False)
  model.logits(PROMPT + [5] * 70)
  list(model.generate(PROMPT, 4))
  graphs = {name: jit.captured for name, jit in model.runner.jits().items() if isinstance(jit.captured, cpu_graph.ThreadedJit)}
  assert {"prefill", "decode1", "greedy1"} <= set(graphs)
  for c in graphs.values():  # tinygrad's own set, found through its symbolic contiguous_view, on a plain CapturedJit of the same graph
    theirs = CapturedJit(c.ret, c._linear, c.expected_names, c.expected_input_info)._written_uops
    assert theirs and c._written_uops == theirs == cpu_graph.written_buffers(c.linear)

def test_every_buffer_a_graph_hands_its_kernels_starts_on_a_64_byte_boundary(tiny_path):
  # tg_llama/cpu/vectors.py's loads of 8 or 16 floats are typedef'd aligned(32) / aligned(64), and clang moves them with
  # aligned instructions (vmovaps), which fault on an address off that boundary: tinygrad maps each buffer by the page and
  # plans a graph's intermediates in an arena of 256-byte blocks. Checked on the addresses the replays passed, inputs too
  from tg_llama.sampling import SamplingParams
  model = tg_llama.load(tiny_path, max_context=96, graph_cache=False)
  for first in (1, 2): model.logits([first] + PROMPT + [5] * 70)  # another first token: no prefix reused, the chunk replays
  for sampling in (None, SamplingParams(temperature=0.7, top_p=0.9, seed=1)):
    for _ in range(2): list(model.generate(PROMPT, 6, sampling))
  graphs = {name: jit.captured for name, jit in model.runner.jits().items() if name in ("prefill", "decode1", "greedy1", "sample1")}
  assert len(graphs) == 4 and all(isinstance(c, cpu_graph.ThreadedJit) for c in graphs.values())  # each replayed: its inputs in its table
  for name, c in graphs.items():
    for row, call in enumerate(c.linear.src):
      addresses = c.graph.table[row, 3:3 + len(call.src[0].arg.globals)]
      assert all(int(a) != 0 and int(a) % 64 == 0 for a in addresses), (name, row, [hex(int(a)) for a in addresses])

def test_threaded_jit_pickles_as_tinygrads(tiny_path, monkeypatch):
  captured = run(tiny_path, monkeypatch, graph=True)[2]
  assert type(pickle.loads(pickle.dumps(captured))) is CapturedJit  # graph files hold nothing of ours

IDLE = """
import sys, time, tg_llama
from tg_llama.cpu import graph
model = tg_llama.load(sys.argv[1], max_context=64, graph_cache=False)
for _ in range(2): list(model.generate([1, 2, 3], 8))  # the graph replayed by the runner's threads
assert graph.runner_available()
time.sleep(1.0)  # the threads spin a little after a replay and nap a while, then sleep
start = time.process_time()
time.sleep(1.0)
print(time.process_time() - start)
"""

@pytest.mark.skipif(NUM_CPU_THREADS.value < 2, reason="threads need two cores")
def test_an_idle_process_takes_no_core(tiny_path):
  # a chat waiting for its user, a server between requests: the runner's threads must not keep waking up
  import subprocess, sys
  out = subprocess.run([sys.executable, "-c", IDLE, str(tiny_path)], capture_output=True, text=True, timeout=300, env={**os.environ, "TG_LLAMA_CPU_GRAPH": "1"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert float(out.stdout.split()[-1]) < 0.02  # CPU seconds in a second of idling

def test_graph_over_two_devices_falls_back():
  w = Tensor.randn(8, 16).shard(("CPU:0", "CPU:1"), axis=0).realize()
  jit = Jit(lambda x: (w @ x).realize())
  x = Tensor.randn(16).shard(("CPU:0", "CPU:1")).realize()
  for _ in range(3): out = jit(x)
  assert type(jit.captured) is CapturedJit  # tinygrad's replay: copies and several devices are not ours
  np.testing.assert_allclose(out.numpy(), w.numpy() @ x.numpy(), atol=1e-5)

@pytest.mark.parametrize("layout", [cpu.LAYOUT, KernelLayout()], ids=["cpu", "plain"])
def test_decode_attention_matches_numpy(layout):
  B, H, KvH, hd, ctx = 1, 6, 2, 16, 64  # an odd group (3 query heads a KV head): padded in the CPU's layout
  rng = np.random.default_rng(0)
  cache = Tensor(rng.standard_normal((2, B, KvH, ctx, hd)).astype(np.float32)).realize()
  v_pos = UOp.variable("start_pos", 0, ctx - 1)
  jit = Jit(lambda q, pos: decode_attention(q, cache[0, :, :, 0:pos + 1], cache[1, :, :, 0:pos + 1], layout).realize())
  for pos in (0, 1, 9, 40, 63, 5):
    q = rng.standard_normal((B, H, 1, hd)).astype(np.float32)
    got = jit(Tensor(q).realize(), v_pos.bind(pos)).numpy()
    k, v = cache.numpy()[0, :, :, :pos + 1], cache.numpy()[1, :, :, :pos + 1]
    k, v = np.repeat(k, H // KvH, axis=1), np.repeat(v, H // KvH, axis=1)  # each KV head serves H/KvH query heads
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (p / p.sum(-1, keepdims=True)) @ v, atol=1e-5, rtol=1e-5)

def attention_numpy(q, k, v, start):
  """Causal attention of q (B, H, T, hd), its queries at positions start..start+T-1, over k and v (B, KvH, P, hd), each KV
  head serving H/KvH query heads."""
  H, T, P = q.shape[1], q.shape[2], k.shape[2]
  k, v = np.repeat(k, H // k.shape[1], axis=1), np.repeat(v, H // v.shape[1], axis=1)
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  s = np.where(np.arange(P)[None, :] > start + np.arange(T)[:, None], -np.inf, s)
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v

def test_prefill_attention_matches_numpy():
  cpu_opts.install()
  B, H, KvH, T, hd, ctx = 1, 6, 2, 64, 64, 192  # a chunk of 64 queries, 3 a KV head: the CPU's rules take these kernels
  rng = np.random.default_rng(3)
  cache = Tensor(rng.standard_normal((2, B, KvH, ctx, hd)).astype(np.float32)).realize()
  v_start = UOp.variable("start_pos", 0, ctx - T)
  attend = lambda q, start: prefill_attention(q, cache[0, :, :, 0:start + T], cache[1, :, :, 0:start + T]).realize()
  kernels = tune.record(lambda: attend(Tensor.empty(B, H, T, hd).realize(), v_start.bind(5)))
  assert {k.kind for k in kernels} == {"prefill scores", "prefill values"}
  # the weights x values product (its last output axis hd), not the softmax's reductions over the cache length (G*T = 192)
  assert [k.shape[-2] for k in kernels if k.kind == "prefill values"] == [hd]
  jit = Jit(attend)
  for start in (0, 7, 64, 96, 3, 128):
    q = rng.standard_normal((B, H, T, hd)).astype(np.float32)
    got = jit(Tensor(q).realize(), v_start.bind(start)).numpy()
    k, v = cache.numpy()[0, :, :, :start + T], cache.numpy()[1, :, :, :start + T]
    np.testing.assert_allclose(got, attention_numpy(q, k, v, start), atol=1e-5, rtol=1e-5)
  # every kernel over the cache length, the softmax's too (tinygrad leaves a symbolic size on one core), on every core
  over_cache = [c.src[0].arg for c in jit.captured.linear.src if "start_pos" in c.src[0].arg.name]
  assert len(over_cache) >= 4 and all(p.global_size[0] == NUM_CPU_THREADS.value for p in over_cache), [(p.name, p.global_size) for p in over_cache]

@pytest.mark.parametrize("n_lanes", [None, 1, 16])  # the CPU's layout (64 lanes here), the plain product, and 16 lanes
def test_one_token_product_matches_numpy(n_lanes):
  rng = np.random.default_rng(2)
  w, x = rng.standard_normal((96, 128)).astype(np.float32), rng.standard_normal((1, 1, 128)).astype(np.float32)
  got = lanes_matvec(Tensor(x), Tensor(w), n_lanes).numpy()
  np.testing.assert_allclose(got.reshape(-1), w @ x.reshape(-1), atol=1e-4, rtol=1e-5)

@pytest.mark.skipif(NUM_CPU_THREADS.value < 2, reason="threads need two cores")
def test_one_token_products_are_threaded_and_right():
  cpu_opts.install()
  rng = np.random.default_rng(1)
  w = rng.standard_normal((576, 576)).astype(np.float32)
  layer = Int4Linear(576, 576)
  for name, t in Int4Linear.quantize(Tensor(w)).items(): setattr(layer, name, t.contiguous().realize())
  jit = Jit(lambda x: layer(x).realize())
  x = rng.standard_normal((1, 1, 576)).astype(np.float32)
  for _ in range(3): got = jit(Tensor(x).realize()).numpy()
  lo, hi = layer.weight.numpy() & 15, layer.weight.numpy() >> 4
  dequant = (np.concatenate([lo, hi], -1) * layer.scale.numpy()[..., None] + layer.min.numpy()[..., None]).reshape(576, 576)
  np.testing.assert_allclose(got.reshape(-1), dequant @ x.reshape(-1), atol=1e-3, rtol=1e-4)
  # the product, the input's block sums (18 x 32 values: one core) and the minimums times them (quantize.py's Int4Linear):
  # tinygrad's own heuristic would leave both products on one core (it threads above 128K operations per core only)
  T = NUM_CPU_THREADS.value
  assert [c.src[0].arg.global_size[0] for c in jit.captured.linear.src] == [T, 1, T]
