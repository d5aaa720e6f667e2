"""The engine (tg_llama/engine/): several sequences at once give, token for token, what each gives alone and what
transformers gives; batched decode's logits are transformers' logits; prefix reuse prefills only the new tokens; a
cancelled request frees its slot for the next one; the loop thread serves requests from other threads; bad requests
are refused before they reach the model."""
import threading
import numpy as np
import pytest
import tg_llama
from tinygrad import Context
from tg_llama.engine.engine import ROW_PREFILL, ROW_TAIL, Engine, Request
from tg_llama.engine.runner import buckets
from tg_llama.errors import ContextLengthError, EngineBusyError
from tg_llama.sampling import SamplingParams
from tiny_models import PROMPT, VOCAB, hf_model, reference_greedy, reference_logits, write_hf

# five prompts for four slots (one waits for a free slot), of different lengths; the last takes two prefill chunks
PROMPTS = [PROMPT, PROMPT[:5] + [9, 10, 11], [1, 2, 3], PROMPT[::-1], [1] + [300, 301] * 35]

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  hf = hf_model("gqa_tied")
  return hf, write_hf(hf, tmp_path_factory.mktemp("engine") / "hf")

@pytest.fixture(scope="module")
def model(tiny): return tg_llama.load(tiny[1], max_context=160, slots=4, graph_cache=False)

def run_together(engine: Engine, requests: list[Request]) -> list[list[int]]:
  """Submit every request, then read their outputs in turns: each read steps the engine for every running sequence."""
  streams = [iter(engine.submit(r)) for r in requests]
  tokens, live = [[] for _ in requests], set(range(len(requests)))
  while live:
    for i in sorted(live):
      out = next(streams[i])
      if out.token is not None: tokens[i].append(out.token)
      if out.finish_reason is not None: live.discard(i)
  return tokens

def test_buckets():
  assert buckets(1) == (1,) and buckets(4) == (1, 2, 4) and buckets(6) == (1, 2, 4, 6) and buckets(8) == (1, 2, 4, 8)

def test_together_equals_alone_equals_transformers(tiny, model):
  hf, _ = tiny
  expect = [reference_greedy(hf, p, 10) for p in PROMPTS]
  assert [list(model.generate(p, 10)) for p in PROMPTS] == expect
  assert run_together(model.engine, [Request(tuple(p), 10) for p in PROMPTS]) == expect
  assert model.engine.stats()["free_slots"] == 4

def test_batched_decode_logits_are_transformers_logits(tiny, model):
  hf, _ = tiny
  runner, forced = model.runner, [5, 77, 200]
  prompts = PROMPTS[:3]
  for slot, p in zip((2, 0, 3), prompts): runner.prefill(slot, p, 0)  # slots in another order than the rows
  for step, token in enumerate(forced):
    rows = [(slot, len(p) + step, token + i) for i, (slot, p) in enumerate(zip((2, 0, 3), prompts))]
    logits = runner.decode(rows).numpy()
    assert logits.shape == (4, VOCAB)  # three rows padded to the bucket of four
    for i, p in enumerate(prompts):
      ref = reference_logits(hf, p + [t + i for t in forced[:step + 1]])[-1]
      np.testing.assert_allclose(logits[i], ref, atol=1e-4, rtol=0)
  for slot in runner.cache.slots: slot.tokens = []  # written behind the engine's back: nothing in them is reusable

def test_tinygrads_jit_off_runs_every_call_eagerly(tiny):
  # JIT=0 (tinygrad's debugging mode) captures nothing: the runner's graphs must still run, call by call
  hf, path = tiny
  with Context(JIT=0):
    m = tg_llama.load(path, max_context=160, slots=2, graph_cache=False)
    assert list(m.generate(PROMPTS[1], 6)) == reference_greedy(hf, PROMPTS[1], 6)
    assert all(j.captured is None for j in m.runner.jits().values())

def test_sampled_together_equals_alone(model):
  requests = [Request(tuple(p), 8, SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.1, seed=10 + i)) for i, p in enumerate(PROMPTS)]
  alone = [list(model.generate(r.prompt, r.max_tokens, r.sampling)) for r in requests]
  assert run_together(model.engine, requests) == alone
  assert len({tuple(t) for t in alone}) == len(alone)  # the seeds differ: so do the draws

def test_mixed_greedy_and_sampled_batch(tiny, model):
  hf, _ = tiny
  requests = [Request(tuple(PROMPTS[0]), 8), Request(tuple(PROMPTS[1]), 8, SamplingParams(temperature=0.9, seed=1))]
  greedy, sampled = run_together(model.engine, requests)
  assert greedy == reference_greedy(hf, PROMPTS[0], 8)
  assert sampled == list(model.generate(requests[1].prompt, 8, requests[1].sampling))

def test_a_top_k_row_runs_the_graph_with_the_top_k_search(tiny, model):
  hf, _ = tiny
  # top_k=1 at temperature 1 is greedy decoding only where the top-k search runs; the other row, without top-k, draws
  # what it draws alone (from the graph without the search)
  requests = [Request(tuple(PROMPTS[0]), 8, SamplingParams(temperature=1.0, top_k=1, seed=3)),
              Request(tuple(PROMPTS[1]), 8, SamplingParams(temperature=0.9, seed=1))]
  top_k, plain = run_together(model.engine, requests)
  assert top_k == reference_greedy(hf, PROMPTS[0], 8) == list(model.generate(requests[0].prompt, 8, requests[0].sampling))
  assert plain == list(model.generate(requests[1].prompt, 8, requests[1].sampling))
  assert model.runner.top_k_sample_jits[2].captured is not None and model.runner.sample_jits[1].captured is not None

def test_prefix_reuse_prefills_only_the_new_tokens(tiny, model):
  hf, _ = tiny
  engine, first = model.engine, [7, 250, 33, 99, 5, 300, 41]  # no other prompt of these tests starts with 7
  before = engine.prefilled_tokens
  answer = list(model.generate(first, 6))
  assert engine.prefilled_tokens - before == len(first)
  # the next turn: the history, the answer and a new message; the answer's last token never went into the cache
  second = first + answer + [17, 18, 19]
  before = engine.prefilled_tokens
  handle = engine.submit(Request(tuple(second), 6))
  tokens = [out.token for out in handle if out.token is not None]
  assert handle.cached_tokens == len(first) + len(answer) - 1
  assert engine.prefilled_tokens - before == 1 + 3
  assert tokens == reference_greedy(hf, second, 6)
  # the same prompt again: everything but its last token is reused
  before = engine.prefilled_tokens
  assert list(model.generate(second, 6)) == tokens and engine.prefilled_tokens - before == 1

def test_short_prompt_rests_run_as_rows(tiny, model, monkeypatch):
  """A prompt rest of at most ROW_PREFILL tokens runs as rows of batched steps, never as a padded prefill chunk; a longer
  one in the smallest chunk that leaves at most ROW_TAIL tokens for rows (the runner's chunks: 64 and 32 tokens here).
  Either way the tokens are transformers'."""
  hf, _ = tiny
  chunks, run_chunk = [], model.runner.run_chunk
  monkeypatch.setattr(model.runner, "run_chunk", lambda slot, x, start: chunks.append((len(x), model.runner.chunk_in[next(
    c for c in model.runner.chunks if c >= len(x))].shape[1])) or run_chunk(slot, x, start))
  assert model.runner.chunks == (32, 64) and (ROW_PREFILL, ROW_TAIL) == (16, 8)
  # new prefixes of 71, 11, 36 and 24 tokens
  prompts = [[2] + [310, 311] * 35, [3] + list(range(140, 150)), [4] + list(range(150, 185)), [5] + list(range(190, 213))]
  for prompt in prompts:
    assert list(model.generate(prompt, 5)) == reference_greedy(hf, prompt, 5)
  # (tokens, chunk size): 71 = a whole chunk + 7 rows; 11 rows; 36 = a half chunk + 4 rows; 24 in a half chunk, padded
  assert chunks == [(64, 64), (32, 32), (24, 32)]

def test_a_prompts_rows_capture_no_graph_of_their_own(tiny):
  """A prompt's rows run in steps as large as the largest ready graph (captured or loaded), or as the generating rows
  need, and in the smallest ready one that holds them: never in a graph of their own (from nothing cached, a 7-token prompt
  captured a step of 8 rows before its first token, 14.5 s on 2 cores, against 4.8 s for the step of 1 row that its
  answer runs next; mid-conversation, a later turn's last 2 rows captured a step of 2 rows). Transformers' tokens."""
  hf, path = tiny
  model = tg_llama.load(path, max_context=96, graph_cache=False)  # one slot: steps of 1, 2, 4 and 8 rows
  runner, eight, three = model.runner, [7] + list(range(20, 27)), [8, 30, 31]  # prompts of 8 and 3 rows
  ready = lambda: [b for b, jit in runner.decode_jits.items() if jit.captured is not None]
  steps, decode = [], runner.decode
  runner.decode = lambda rows, pad_to_ready=False: steps.append(len(rows)) or decode(rows, pad_to_ready)
  assert list(model.generate(eight, 4)) == reference_greedy(hf, eight, 4)
  assert steps == [1] * 11 and ready() == [1]  # 8 prompt rows, then 3 steps of the answer
  decode([(0, i, t) for i, t in enumerate(eight)]).numpy()  # a step of 8 rows made ready (the slot's keys and values again)
  steps.clear()
  assert list(model.generate(three, 4)) == reference_greedy(hf, three, 4)
  assert steps == [3, 1, 1, 1] and ready() == [1, 8]
  assert runner.bucket(3, ready=True) == 8 and runner.bucket(3) == 4
  # with none ready, the smallest that holds them
  assert tg_llama.load(path, max_context=96, graph_cache=False).runner.bucket(3, ready=True) == 4

def test_logprobs_are_transformers(tiny, model):
  hf, _ = tiny
  outs = list(model.engine.submit(Request(tuple(PROMPT), 3, logprobs=4)))
  ref = reference_logits(hf, PROMPT + [o.token for o in outs[:-1]]).astype(np.float64)
  ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
  for i, out in enumerate(outs):
    row = ref[len(PROMPT) - 1 + i]
    assert out.logprob == pytest.approx(row[out.token], abs=1e-4)
    assert [t for t, _ in out.top_logprobs] == list(np.argsort(-row, kind="stable")[:4])
    np.testing.assert_allclose([lp for _, lp in out.top_logprobs], np.sort(row)[::-1][:4], atol=1e-4)

def test_cancelled_request_frees_its_slot(tiny, model):
  hf, _ = tiny
  engine = model.engine
  long = [iter(engine.submit(Request((1, 40 + i, 7), 60))) for i in range(4)]  # every slot taken
  for stream in long: next(stream)
  waiting = engine.submit(Request(tuple(PROMPT), 5))
  assert engine.stats()["waiting"] == 1
  long[1].close()  # the consumer stops reading: the handle cancels its request
  assert [o.token for o in waiting if o.token is not None] == reference_greedy(hf, PROMPT, 5)
  for stream in long[:1] + long[2:]: stream.close()
  engine.step()
  assert engine.stats() | {"prefilled_tokens": 0} == {"slots": 4, "free_slots": 4, "running": 0, "waiting": 0, "prefilled_tokens": 0}

def test_loop_thread_serves_other_threads(tiny):
  hf, path = tiny
  model = tg_llama.load(path, max_context=160, slots=2, graph_cache=False)
  engine = model.engine.start()
  results, errors = {}, []
  def client(i: int):
    try: results[i] = [o.token for o in engine.submit(Request(tuple(PROMPTS[i]), 6)) if o.token is not None]
    except Exception as e: errors.append(e)
  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
  for t in threads: t.start()
  for t in threads: t.join(timeout=120)
  assert not errors and [results[i] for i in range(len(PROMPTS))] == [reference_greedy(hf, p, 6) for p in PROMPTS]
  # a callback instead of a queue, from this thread
  got, done = [], threading.Event()
  engine.submit(Request(tuple(PROMPT), 4), notify=lambda out: (got.append(out), out.finish_reason and done.set()))
  assert done.wait(60) and [o.token for o in got] == reference_greedy(hf, PROMPT, 4) and got[-1].finish_reason == "length"
  engine.close()
  with pytest.raises(EngineBusyError, match="shutting down"): engine.submit(Request(tuple(PROMPT), 4))

def test_bad_requests_are_refused(model):
  engine = model.engine
  with pytest.raises(ValueError, match="empty prompt"): engine.submit(Request((), 4))
  with pytest.raises(ValueError, match=r"\[384, -1\] are outside the vocabulary \[0, 384\)"): engine.submit(Request((1, 384, -1), 4))
  with pytest.raises(ContextLengthError, match="150 prompt tokens \\+ 12 to generate do not fit in the context of 160"):
    engine.submit(Request((1,) * 150, 12))
  busy = Engine(model.runner, max_waiting=1)
  busy.submit(Request(tuple(PROMPT), 2))
  with pytest.raises(EngineBusyError, match="1 requests are already waiting"): busy.submit(Request(tuple(PROMPT), 2))
  assert engine.stats()["waiting"] == 0

def test_stop_token_ends_the_request(tiny, model):
  hf, _ = tiny
  expect = reference_greedy(hf, PROMPT, 10)
  outs = list(model.engine.submit(Request(tuple(PROMPT), 10, stop_ids=frozenset({expect[3]}))))
  assert [o.token for o in outs] == expect[:expect.index(expect[3]) + 1] and outs[-1].finish_reason == "stop"

def test_openai_penalties_match_a_numpy_reference(tiny, model):
  hf, _ = tiny
  ids, counts, expect = list(PROMPT), np.zeros(VOCAB), []
  for _ in range(12):  # greedy on transformers' logits, penalized by OpenAI's formula
    logits = reference_logits(hf, ids)[-1].astype(np.float64) - 1.5 * (counts > 0) - 0.7 * counts
    expect.append(int(logits.argmax()))
    counts[expect[-1]] += 1
    ids.append(expect[-1])
  assert expect != reference_greedy(hf, PROMPT, 12)  # the penalties change this answer
  assert list(model.generate(PROMPT, 12, SamplingParams(presence_penalty=1.5, frequency_penalty=0.7))) == expect
