"""A block's graph reused by the next blocks (tg_llama/models/layer_graph.py): what it gives is the graph that building the
block gives (the same kernels and numbers), a decode step builds only the blocks it cannot reuse for, and a block that
differs, or a graph that reads a buffer of its own, is built as before."""
import numpy as np
import pytest
from tinygrad import Tensor, UOp
import tg_llama
from tg_llama.models import llama as llama_module
from tg_llama.models.layer_graph import LayerGraph, buffers
from tiny_models import PROMPT, hf_model, reference_greedy, write_hf

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  hf = hf_model("gqa_rope_llama3")
  return hf, write_hf(hf, tmp_path_factory.mktemp("layer_graph") / "hf")

@pytest.fixture(scope="module")
def model(tiny): return tg_llama.load(tiny[1], max_context=64, slots=2, graph_cache=False)

def step_args(model, rows):
  llama, cache = model.llama, model.runner.cache
  x = Tensor.randn(len(rows), 1, model.config.dim).realize()
  cos = Tensor.stack(*[llama.cos[p:p+1] for _, p in rows]).unsqueeze(1)
  sin = Tensor.stack(*[llama.sin[p:p+1] for _, p in rows]).unsqueeze(1)
  return x, cache, cos, sin

def test_the_reused_graph_is_the_built_one(model):
  rows = [(UOp.variable("s0", 0, 1).bind(1), UOp.variable("p0", 0, 63).bind(7)), (UOp.variable("s1", 0, 1).bind(0), UOp.variable("p1", 0, 63).bind(3))]
  x, cache, cos, sin = step_args(model, rows)
  first, second = model.llama.layers[1], model.llama.layers[2]
  like = LayerGraph.of(first(x, cache.layers[1], rows, cos, sin), x, first, cache.layers[1], (cos, sin))
  assert like is not None
  reused, built = like.apply(x, second, cache.layers[2]), second(x, cache.layers[2], rows, cos, sin)
  assert buffers(reused) == buffers(built) and not buffers(reused) & set(u.uop for u in like.tensors)
  np.testing.assert_array_equal(reused.numpy(), built.numpy())

def test_a_decode_step_builds_two_of_three_blocks(tiny, model, monkeypatch):
  built = []
  block_call = llama_module.Block.__call__
  monkeypatch.setattr(llama_module.Block, "__call__", lambda self, *a: built.append(self) or block_call(self, *a))
  model.runner.prefill(0, PROMPT, 0)
  assert len(built) == 3  # a prefill chunk's blocks realize their weights' panels while they are built: no reuse
  built.clear()
  model.runner.decode([(0, len(PROMPT), 5)])
  assert built == [model.llama.layers[0], model.llama.layers[1]]  # the first reads the embedding, the second is reused
  model.runner.cache.slots[0].tokens = []
  assert list(model.generate(PROMPT, 8)) == reference_greedy(tiny[0], PROMPT, 8)

def test_a_block_that_differs_is_not_given_the_graph(model):
  rows = [(0, 5)]
  x, cache, cos, sin = step_args(model, rows)
  cos, sin = model.llama.cos[5:6], model.llama.sin[5:6]
  first, second = model.llama.layers[1], model.llama.layers[2]
  like = LayerGraph.of(first(x, cache.layers[1], rows, cos, sin), x, first, cache.layers[1], (cos, sin))
  assert like is not None and like.apply(x, second, cache.layers[2]) is not None
  for value in ("another value", Tensor.gelu, str.upper):  # a plain value, a function, a method the first has none of
    second.self_attn.note = value
    try: assert like.apply(x, second, cache.layers[2]) is None
    finally: del second.self_attn.note
  first.mlp.act = second.mlp.act = Tensor.silu  # the same attribute: the same function, then another one
  try:
    like = LayerGraph.of(first(x, cache.layers[1], rows, cos, sin), x, first, cache.layers[1], (cos, sin))
    assert like is not None and like.apply(x, second, cache.layers[2]) is not None
    second.mlp.act = Tensor.gelu
    assert like.apply(x, second, cache.layers[2]) is None
  finally: del first.mlp.act, second.mlp.act
  norm = second.input_layernorm.weight
  second.input_layernorm.weight = norm.half()
  try: assert like.apply(x, second, cache.layers[2]) is None
  finally: second.input_layernorm.weight = norm
  assert like.apply(x[:, :, :-1].contiguous().realize(), second, cache.layers[2]) is None  # an input of another shape

def test_a_graph_that_reads_other_buffers_is_not_reused(model):
  rows = [(0, 5)]
  x, cache, _, _ = step_args(model, rows)
  cos, sin = model.llama.cos[5:6], model.llama.sin[5:6]
  first = model.llama.layers[1]
  out = first(x, cache.layers[1], rows, cos, sin)
  assert LayerGraph.of(out, x, first, cache.layers[1], (cos, sin)) is not None
  assert LayerGraph.of(out + Tensor.ones(out.shape).contiguous().realize(), x, first, cache.layers[1], (cos, sin)) is None
  assert LayerGraph.of(out, (x + 1).contiguous(), first, cache.layers[1], (cos, sin)) is None  # an input not realized
