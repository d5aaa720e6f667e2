"""The sampler against transformers' logits processors (v5.23) and numpy; never against its own numbers."""
import dataclasses
import numpy as np
import pytest
from tinygrad import Tensor, TinyJit, dtypes
import tinygrad.device
from tg_llama.sampling import SamplingParams, Sampler, pack, candidate_mask, apply_penalty, mark_seen, sample

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

def hf_kept(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
  # the warpers in the order and with the conditions of transformers' generate (_get_logits_processor)
  s = torch.tensor(logits[None])
  if p.temperature != 1.0: s = lp.TemperatureLogitsWarper(p.temperature)(None, s)
  if p.top_k != 0: s = lp.TopKLogitsWarper(p.top_k)(None, s)
  if p.top_p < 1.0: s = lp.TopPLogitsWarper(p.top_p)(None, s)
  if p.min_p != 0.0: s = lp.MinPLogitsWarper(p.min_p)(None, s)
  return (s[0] > -float("inf")).numpy()

def our_kept(rows: list[np.ndarray], params: list[SamplingParams], top_k: bool = True) -> np.ndarray:
  return candidate_mask(Tensor(np.stack(rows)), pack(params), top_k=top_k).numpy()

CONFIGS = [SamplingParams(1.0, top_k=k) for k in (1, 5, 50, 999, 1000, 5000)] + \
  [SamplingParams(1.0, top_p=p) for p in (1e-6, 0.1, 0.5, 0.9, 0.99)] + \
  [SamplingParams(1.0, min_p=m) for m in (0.001, 0.05, 0.3, 0.9)] + \
  [SamplingParams(0.7, top_k=40, top_p=0.9, min_p=0.05), SamplingParams(1.5, top_k=100, top_p=0.95, min_p=0.02),
   SamplingParams(0.3, top_p=0.8), SamplingParams(2.0, top_k=20, top_p=0.5, min_p=0.1), SamplingParams(1.2, top_k=3, top_p=0.99)]

def test_filters_match_transformers():
  rng, V = np.random.default_rng(0), 1000
  vectors = [rng.standard_normal(V).astype(np.float32) * s for s in (0.5, 2, 6)] + [rng.standard_t(2, V).astype(np.float32) * 3]
  masked = rng.standard_normal(V).astype(np.float32) * 2
  masked[rng.choice(V, 300, replace=False)] = -np.inf  # a vocabulary with banned tokens
  vectors.append(masked)
  rows, params = [v for v in vectors for _ in CONFIGS], [c for _ in vectors for c in CONFIGS]
  ours = our_kept(rows, params)
  for i, (v, p) in enumerate(zip(rows, params)):
    np.testing.assert_array_equal(ours[i], hf_kept(v, p), err_msg=f"row {i}: {p}")
  n = ours.sum(1)
  assert ((1 < n) & (n < 700)).mean() > 0.5  # most rows do filter, and keep more than one
  # the filters without the top-k search, for rows that do not use it
  plain = [i for i, p in enumerate(params) if p.top_k == 0]
  without = our_kept([rows[i] for i in plain], [params[i] for i in plain], top_k=False)
  for j, i in enumerate(plain): np.testing.assert_array_equal(without[j], hf_kept(rows[i], params[i]), err_msg=f"row {i}: {params[i]}")

def test_filters_match_transformers_at_a_real_vocabulary_size():
  # SmolLM2's 49,152 tokens, 4 rows: the searches' sums in 64 lanes of partial sums (on the CPU, opts.py's "batch sums" kernels)
  rng, V = np.random.default_rng(2), 49152
  params = [SamplingParams(0.2, top_p=0.9), SamplingParams(1.0, top_k=40, top_p=0.5), SamplingParams(0.7, top_p=0.95, min_p=0.05),
            SamplingParams(1.0, top_k=1000)]
  rows = [rng.standard_normal(V).astype(np.float32) * s for s in (3, 1, 2, 4)]
  ours = our_kept(rows, params)
  for i, (v, p) in enumerate(zip(rows, params)): np.testing.assert_array_equal(ours[i], hf_kept(v, p), err_msg=f"row {i}: {p}")
  assert all(1 < n < V // 2 for n in ours.sum(1))

def test_ties():
  # logits on a grid of 0.5, so the cut-off of top-k and top-p falls inside a group of equal values
  rng, V = np.random.default_rng(1), 1000
  v = (np.round(rng.standard_normal(V) * 4) / 2).astype(np.float32)
  topk_minp = [SamplingParams(1.0, top_k=k) for k in (3, 20, 100, 400)] + [SamplingParams(1.0, min_p=m) for m in (0.05, 0.3)]
  topp = [SamplingParams(1.0, top_p=p) for p in (0.3, 0.6, 0.9)]
  ours = our_kept([v] * len(topk_minp + topp), topk_minp + topp)
  for i, p in enumerate(topk_minp): np.testing.assert_array_equal(ours[i], hf_kept(v, p), err_msg=str(p))  # HF keeps all ties of the k-th
  # HF's top-p keeps whichever members of the cut group torch.sort puts last; we keep the whole group
  for i, p in enumerate(topp, len(topk_minp)):
    hf = hf_kept(v, p)
    np.testing.assert_array_equal(ours[i], v >= v[hf].min(), err_msg=str(p))
  # ties at the top: every copy of the max survives, and greedy takes the first
  t = np.zeros(V, np.float32); t[[7, 300, 999]] = 5.0
  np.testing.assert_array_equal(np.flatnonzero(our_kept([t], [SamplingParams(1.0, top_p=1e-6, min_p=0.99)])[0]), [7, 300, 999])
  got = sample(Tensor(t[None]), pack([SamplingParams()]), Tensor([[0]], dtype=dtypes.uint64), Tensor([[0]], dtype=dtypes.uint32))
  assert got.item() == 7

def test_greedy_is_argmax():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((6, 5000)).astype(np.float32) * 3
  params = [SamplingParams(0.0, top_k=k, top_p=0.5, min_p=0.2, seed=i) for i, k in enumerate((0, 1, 5, 50, 0, 0))]
  s = Sampler(6, 5000)
  s.reset(params)
  for _ in range(3):  # the other knobs are ignored and the noise is not added
    np.testing.assert_array_equal(s(Tensor(logits)).numpy()[:, 0], logits.argmax(1))
  assert s(Tensor(logits)).dtype == dtypes.int32

def draws(seed: int, n: int = 12, V: int = 5000) -> list[int]:
  s = Sampler(1, V)
  s.reset([SamplingParams(1.0, seed=seed)])
  step, logits = TinyJit(lambda x: s(x)), Tensor.zeros(1, V).contiguous().realize()  # uniform: any index can come
  return [step(logits).item() for _ in range(n)]

def test_seeds():
  a = draws(7)
  assert a == draws(7)
  assert a != draws(8)
  assert len(set(a)) > 6
  # seed None is a fresh seed each time
  s = Sampler(1, 5000)
  got = []
  for _ in range(2):
    s.reset([SamplingParams(1.0)])
    got.append([s(Tensor.zeros(1, 5000).contiguous()).item() for _ in range(6)])
  assert got[0] != got[1]

@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.5), SamplingParams(1.0, top_k=3), SamplingParams(0.8, top_p=0.7)])
def test_frequencies(params):
  # 20000 draws as 2500 rows x 8 steps, against softmax(logits/T) over the survivors of transformers' warpers
  logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2], np.float32)
  B, steps = 2500, 8
  s = Sampler(B, len(logits))
  s.reset([dataclasses.replace(params, seed=1000 + i) for i in range(B)])
  x = Tensor(np.tile(logits, (B, 1)))
  toks = np.concatenate([s(x, top_k=params.top_k > 0).numpy()[:, 0] for _ in range(steps)])  # the search only where it is used
  kept = hf_kept(logits, params)
  want = np.where(kept, np.exp(logits / params.temperature - (logits / params.temperature).max()), 0)
  want /= want.sum()
  freq = np.bincount(toks, minlength=len(logits)) / len(toks)
  assert np.abs(freq - want).max() < 0.015, (freq, want)
  assert freq[~kept].sum() == 0

def test_repetition_penalty():
  rng, V = np.random.default_rng(3), 1000
  logits = rng.standard_normal((2, V)).astype(np.float32) * 3
  prompts = [[5, 17, 17, 999, 0], list(rng.choice(V, 50, replace=False))]
  s = Sampler(2, V)
  s.reset([SamplingParams(0.0, repetition_penalty=1.3), SamplingParams(0.0, repetition_penalty=0.7)], prompts)
  for row, pen in enumerate((1.3, 0.7)):
    want = lp.RepetitionPenaltyLogitsProcessor(pen)(torch.tensor([prompts[row]]), torch.tensor(logits[row:row+1])).numpy()
    got = apply_penalty(Tensor(logits[row:row+1]), s.seen[row:row+1], Tensor([[pen]])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # greedy decoding sees the penalty, and each sampled token becomes seen
  logits[0, 5] = logits[0].max() + 0.1
  tok = s(Tensor(logits)).numpy()[:, 0]
  want = lp.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompts[0]]), torch.tensor(logits[:1])).numpy().argmax()
  assert tok[0] == want != 5
  seen = s.seen.numpy()
  assert seen[0, tok[0]] and seen[1, tok[1]] and seen.sum() == len(set(prompts[0]) | {tok[0]}) + len(set(prompts[1]) | {tok[1]})
  np.testing.assert_array_equal(mark_seen(Tensor.zeros(1, 4, dtype=dtypes.bool), Tensor([[2]])).numpy(), [[False, False, True, False]])

@pytest.mark.parametrize("kw, bad", [({"temperature": -0.1}, "-0.1"), ({"top_k": -1}, "-1"), ({"top_k": 2.5}, "2.5"),
  ({"top_p": 0.0}, "0.0"), ({"top_p": 1.5}, "1.5"), ({"min_p": 1.0}, "1.0"), ({"min_p": -0.2}, "-0.2"),
  ({"repetition_penalty": 0.0}, "0.0"), ({"seed": -3}, "-3"), ({"temperature": float("nan")}, "nan")])
def test_invalid_params(kw, bad):
  with pytest.raises(ValueError, match=bad): SamplingParams(**kw)

def test_invalid_sampler_use():
  s = Sampler(2, 10)
  with pytest.raises(ValueError, match=r"got 1 for slots \[0, 1\]"): s.reset([SamplingParams()], slots=[0, 1])
  with pytest.raises(ValueError, match=r"slot in \[0, 2\)"): s.reset([SamplingParams()], slots=[2])
  with pytest.raises(ValueError, match=r"\[10\]"): s.reset([SamplingParams()] * 2, [[1], [10]])
  with pytest.raises(ValueError, match=r"\(3, 10\)"): s(Tensor.zeros(3, 10))
  with pytest.raises(ValueError, match=r"\(2, 10\) for 1 slots"): s(Tensor.zeros(2, 10), slots=[0])

def test_under_tinyjit(monkeypatch):
  V = 3000
  s = Sampler(2, V)
  step = TinyJit(lambda logits: s(logits))
  x = Tensor.zeros(2, V).contiguous().realize()
  params = [SamplingParams(1.0, top_k=2000, seed=11), SamplingParams(0.9, top_p=0.99, seed=12)]
  s.reset(params)
  first = [step(x).numpy()[:, 0].tolist() for _ in range(3)]
  compiles = []
  real = tinygrad.device.Compiler.compile_cached
  monkeypatch.setattr(tinygrad.device.Compiler, "compile_cached", lambda self, src: compiles.append(src) or real(self, src))
  got = first + [step(x).numpy()[:, 0].tolist() for _ in range(7)]
  assert compiles == []  # the captured graph runs; nothing is lowered again
  assert len({tuple(g) for g in got}) > 5  # the rng state advances inside the graph, not a captured draw
  # the draws are the pure function's at counters 0, 1, 2, ...
  key, knobs = Tensor([[11], [12]], dtype=dtypes.uint64), pack(params)
  for c in (0, 4, 9):
    assert sample(x, knobs, key, Tensor([[c], [c]], dtype=dtypes.uint32)).numpy()[:, 0].tolist() == got[c]
  # reset() rewrites the captured buffers: the same seeds replay, new knobs take effect without a new capture
  s.reset(params)
  assert [step(x).numpy()[:, 0].tolist() for _ in range(10)] == got
  s.reset([SamplingParams(0.0)] * 2)
  assert step(Tensor(np.eye(2, V, 1500, dtype=np.float32))).numpy()[:, 0].tolist() == [1500, 1501]

def test_the_threshold_searchs_passes_share_their_kernel_over_the_vocabulary():
  # top-p's search is 16 passes, each a sum over the whole vocabulary against 3 candidates: one kernel for every pass to
  # compile (a new process compiles a sampling graph before its first token), not 16 that differ in a constant
  from tinygrad.uop.ops import Ops
  from tg_llama.sampling import filter_logits, knob_rows
  V = 49152
  logits = Tensor(np.random.default_rng(0).standard_normal((1, V)).astype(np.float32)).realize()
  knobs = Tensor(knob_rows([SamplingParams(temperature=0.7, top_p=0.9)])).realize()
  linear = filter_logits(logits, knobs, top_k=False).schedule_linear()
  wide = {c.src[0] for c in linear.src if c.op is Ops.CALL and any(u.op is Ops.BUFFER and u.buffer.size >= V for u in c.src[1:])}
  assert len(wide) < 16
