"""A block's graph reused by the next blocks (tg_llama/models/layer_graph.py): what it gives is what building the block
gives (the same buffers and numbers), a decode step and a prefill chunk build only the blocks they cannot reuse for,
and a block that differs, or a graph that reads a buffer it did not realize itself, is built as before."""
import numpy as np
import pytest
from tinygrad import Tensor, UOp
import tg_llama
from tg_llama.models import llama as llama_module
from tg_llama.models.layer_graph import LayerGraph, buffers
from tiny_models import PROMPT, hf_model, reference_greedy, reference_logits, write_hf

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  hf = hf_model("gqa_rope_llama3")
  return hf, write_hf(hf, tmp_path_factory.mktemp("layer_graph") / "hf")

@pytest.fixture(scope="module")
def model(tiny): return tg_llama.load(tiny[1], max_context=64, slots=2, graph_cache=False)

def block_args(model, rows, T=1):
  llama = model.llama
  x = Tensor.randn(len(rows), T, model.config.dim).realize()
  cos = Tensor.stack(*[llama.cos[p:p+T] for _, p in rows]).unsqueeze(1)
  sin = Tensor.stack(*[llama.sin[p:p+T] for _, p in rows]).unsqueeze(1)
  return x, model.runner.cache, (rows, cos, sin)

@pytest.mark.parametrize("T", [1, 16])  # a decode step of two rows; a prefill chunk, whose products realize as it is built
def test_the_reused_graph_is_the_built_one(model, T):
  rows = [(UOp.variable("s0", 0, 1).bind(1), UOp.variable("p0", 0, 40).bind(7))]
  if T == 1: rows.append((UOp.variable("s1", 0, 1).bind(0), UOp.variable("p1", 0, 40).bind(3)))
  x, cache, args = block_args(model, rows, T)
  first, second = model.llama.layers[1], model.llama.layers[2]
  _, like = LayerGraph.build(first, x, cache.layers[1], *args, shared=args[1:])
  assert like is not None and (len(like.steps) > 0) == (T > 1)
  reused, built = like.apply(x, second, cache.layers[2]), second(x, cache.layers[2], *args)
  assert not buffers(reused.uop) & buffers(*[t.uop for t in like.tensors])
  np.testing.assert_array_equal(reused.numpy(), built.numpy())

def test_steps_and_chunks_build_two_of_three_blocks(tiny, model, monkeypatch):
  built = []
  block_call = llama_module.Block.__call__
  monkeypatch.setattr(llama_module.Block, "__call__", lambda self, *a: built.append(self) or block_call(self, *a))
  logits = model.runner.prefill(0, PROMPT, 0).numpy()
  assert built == [model.llama.layers[0], model.llama.layers[1]]  # the first reads the embedding, the second is reused
  np.testing.assert_allclose(logits[0], reference_logits(tiny[0], PROMPT)[-1], atol=1e-4, rtol=0)
  built.clear()
  model.runner.decode([(0, len(PROMPT), 5)])
  assert built == [model.llama.layers[0], model.llama.layers[1]]
  model.runner.cache.slots[0].tokens = []
  assert list(model.generate(PROMPT, 8)) == reference_greedy(tiny[0], PROMPT, 8)

def test_a_block_that_differs_is_not_given_the_graph(model):
  x, cache, args = block_args(model, [(0, 5)])
  first, second = model.llama.layers[1], model.llama.layers[2]
  _, like = LayerGraph.build(first, x, cache.layers[1], *args, shared=args[1:])
  assert like is not None and like.apply(x, second, cache.layers[2]) is not None
  for value in ("another value", Tensor.gelu, str.upper):  # a plain value, a function, a method the first has none of
    second.self_attn.note = value
    try: assert like.apply(x, second, cache.layers[2]) is None
    finally: del second.self_attn.note
  first.mlp.act = second.mlp.act = Tensor.silu  # the same attribute: the same function, then another one
  try:
    _, like = LayerGraph.build(first, x, cache.layers[1], *args, shared=args[1:])
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
  x, cache, args = block_args(model, [(0, 5)])
  first = model.llama.layers[1]
  foreign = Tensor.ones(x.shape).contiguous().realize()
  assert LayerGraph.build(first, x, cache.layers[1], *args, shared=args[1:])[1] is not None
  assert LayerGraph.build(lambda *a: first(*a) + foreign, x, cache.layers[1], *args, shared=args[1:])[1] is None
  assert LayerGraph.build(first, (x + 1).contiguous(), cache.layers[1], *args, shared=args[1:])[1] is None  # an input not realized
