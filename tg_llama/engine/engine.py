"""The engine: requests in, tokens out, many sequences at once (continuous batching).

Each request is a sequence with an explicit state: waiting (no slot yet), prefilling (its prompt goes into its slot a
chunk at a time), generating, or finished. Every step rebuilds the batch from the sequences: one chunk of one long
prompt, then one batched step of rows: a row for every generating sequence, and up to a bucket of rows of prompts whose
rest is short (a chat's next turn, a chunk's remainder), so that they cost their own tokens, not a padded chunk. A
request joins and leaves between steps. A new request takes the free slot that holds the longest prefix of its prompt,
and prefills only the rest. On a pipeline of stages (tg_llama/cluster/), the running sequences go in a group per stage,
each group's next step sent as soon as its tokens are back: every stage computes a step of its own.

Requests come from any thread (`submit`); the model runs in one thread only: a loop thread (`start`, for a server),
or the thread that iterates a handle when there is no loop (the Python API, the terminal chat). Results go back a
token at a time through each request's queue, or a callback.

Not here: HTTP and text (tg_llama/serve/), the model's kernels (tg_llama/engine/runner.py), preemption (a request keeps
its slot until it finishes or is cancelled)."""
from __future__ import annotations
import collections, itertools, math, queue, threading
from dataclasses import dataclass, field
from typing import Callable, Iterator
import numpy as np
from tg_llama.constraint import Grammar, Matcher, words
from tg_llama.engine.kv_cache import Slot
from tg_llama.engine.runner import ModelRunner
from tg_llama.errors import ContextLengthError, EngineBusyError, InvalidArgumentError, TgLlamaError
from tg_llama.jit_cache import GraphCache
from tg_llama.sampling import SamplingParams

@dataclass(frozen=True)
class Request:
  prompt: tuple[int, ...]
  max_tokens: int
  sampling: SamplingParams = SamplingParams()
  stop_ids: frozenset[int] = frozenset()  # a stop token is emitted (finish_reason "stop") and ends the request
  logprobs: int | None = None              # None: none; k: the chosen token's log-probability and the k most likely
  logits: bool = False                     # the first output carries the prompt's next-token logits (numpy, (vocab,))
  constraint: Grammar | None = None        # only tokens this grammar allows; the request stops where it is complete

@dataclass(frozen=True)
class Output:
  token: int | None                        # None only for an output that carries logits or an error
  finish_reason: str | None = None         # "stop", "length", "cancelled", "error", or None (more to come)
  logprob: float | None = None
  top_logprobs: tuple[tuple[int, float], ...] = ()
  logits: np.ndarray | None = None
  error: TgLlamaError | None = None

@dataclass(eq=False)
class Sequence:
  id: int
  request: Request
  notify: Callable[[Output], None]
  slot: Slot | None = None
  prefilled: int = 0                       # prompt tokens whose keys and values are in the slot
  cached: int = 0                          # of those, how many were already there (prefix reuse)
  generated: list[int] = field(default_factory=list)
  matcher: Matcher | None = None           # the request's constraint, advanced with each token generated
  cancelled: bool = False
  done: bool = False
  in_flight: int = 0                       # steps sent to the model whose tokens have not come back yet (a pipeline's)

class Handle:
  """A submitted request: iterate it for its outputs (the last one has a finish_reason); cancel() ends it at the next step."""
  def __init__(self, engine: Engine, seq: Sequence, outputs: queue.Queue | None):
    self.engine, self.seq, self._outputs = engine, seq, outputs

  @property
  def cached_tokens(self) -> int: return self.seq.cached

  def cancel(self): self.engine.cancel(self)

  def __del__(self):
    # dropped unread (a generate() never iterated): the request must not run on at the next step. A request that reports
    # through a callback runs on without its handle
    if self._outputs is not None: self.seq.cancelled = True

  def __iter__(self) -> Iterator[Output]:
    assert self._outputs is not None, "a request submitted with a callback reports through it"
    try:
      while True:
        if self.engine.threaded: out = self._outputs.get()
        else:
          while self._outputs.empty():
            if not self.engine.step(): raise RuntimeError("the engine has nothing to run, yet this request has no output")
          out = self._outputs.get_nowait()
        if out.error is not None: raise out.error
        yield out
        if out.finish_reason is not None: return
    finally: self.cancel()  # a consumer that stops early (or Ctrl-C) frees the slot; nothing if it finished

# How a prompt's rest runs, by what each costs (SmolLM2, DEV=CPU, 2 cores): a 64-token chunk 221 ms, a 32-token one 126 ms, a
# step of 8 rows 50 ms (of 1 row 18 ms). Rests of at most ROW_PREFILL tokens run as rows of steps (alongside any sequences
# that are generating, as many a step as a ready graph takes: the runner's step_rows); a longer one in the smallest chunk
# that leaves at most ROW_TAIL tokens for rows, else
# in whole chunks: 24 tokens in 126 ms (rows: 150 ms), 40 in 176 ms (a whole chunk: 221 ms)
ROW_PREFILL = 16
ROW_TAIL = 8

class Engine:
  def __init__(self, runner: ModelRunner, max_waiting: int = 64):
    self.runner, self.max_waiting = runner, max_waiting
    self.max_context, self.vocab = runner.max_context, runner.config.vocab_size
    self.waiting: list[Sequence] = []
    self.running: list[Sequence] = []   # holding a slot: prefilling or generating
    self._lock = threading.Condition()
    self._ids = itertools.count()
    self._thread: threading.Thread | None = None
    self._closing = False
    self.prefilled_tokens = 0            # prompt tokens run through the model (prefix reuse skips the rest)
    self.graphs: GraphCache | None = None  # captured graphs on disk: loaded before the first step, saved once captured
    # steps sent whose tokens are not back yet: up to the runner's depth (one process runs a step at a time; a pipeline
    # of stages, tg_llama/cluster/, keeps each busy with a step of its own)
    self.in_flight: collections.deque[tuple[list, list, object]] = collections.deque()  # sent steps, oldest first

  @property
  def threaded(self) -> bool: return self._thread is not None

  def submit(self, request: Request, notify: Callable[[Output], None] | None = None) -> Handle:
    """Queue a request (from any thread). Raises ContextLengthError when it cannot fit in the context, EngineBusyError
    when the queue is full or the engine is closing, InvalidArgumentError for token ids outside the vocabulary."""
    n = len(request.prompt)
    if n == 0: raise InvalidArgumentError("an empty prompt: give at least one token")
    if bad := [t for t in request.prompt if not (isinstance(t, (int, np.integer)) and 0 <= t < self.vocab)]:
      raise InvalidArgumentError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab})")
    if request.max_tokens < 0: raise InvalidArgumentError(f"max_tokens must be >= 0, got {request.max_tokens}")
    if n + max(request.max_tokens - 1, 0) > self.max_context:
      raise ContextLengthError(f"{n} prompt tokens + {request.max_tokens} to generate do not fit in the context of {self.max_context} tokens")
    matcher = request.constraint.matcher() if request.constraint is not None else None
    outputs = None if notify is not None else queue.Queue()
    seq = Sequence(next(self._ids), request, notify or outputs.put, matcher=matcher)
    with self._lock:
      if self._closing: raise EngineBusyError("the engine is shutting down")
      if len(self.waiting) >= self.max_waiting: raise EngineBusyError(f"{len(self.waiting)} requests are already waiting")
      self.waiting.append(seq)
      self._lock.notify()
    return Handle(self, seq, outputs)

  def cancel(self, handle: Handle):
    with self._lock: handle.seq.cancelled = True

  # *** one step ***

  def step(self) -> bool:
    """Admit what fits, run a prefill chunk and one batched step of rows; whether there was anything to do."""
    with self._lock:
      for seq in [s for s in self.waiting if s.cancelled]: self._finish(seq, Output(None, "cancelled"))
      for seq in [s for s in self.running if s.cancelled]: self._finish(seq, Output(None, "cancelled"))
      while self.waiting and (got := self.runner.cache.acquire(list(self.waiting[0].request.prompt))) is not None:
        seq = self.waiting.pop(0)
        seq.slot, seq.prefilled = got
        seq.cached = seq.prefilled
        self.running.append(seq)
      prefilling = [s for s in self.running if s.prefilled < len(s.request.prompt) and not s.in_flight]
      generating = [s for s in self.running if s.prefilled == len(s.request.prompt) and s.generated and not s.in_flight]
    if not prefilling and not generating and not self.in_flight: return False
    chunked = next((s for s in prefilling if len(s.request.prompt) - s.prefilled > ROW_PREFILL), None)
    try:
      if self.graphs is not None: self.graphs.load()  # once, at the first step: a model changed after load finds its own
      if chunked is not None: self._prefill(chunked)
      # a row per generating sequence, then the tokens of short prompt rests, up to a bucket of them a step
      rows, cap = [(s, None) for s in generating], self.runner.step_rows(len(generating))
      for seq in prefilling:
        rest = len(seq.request.prompt) - seq.prefilled
        if 0 < rest <= ROW_PREFILL and not seq.done:
          take = min(rest, cap + len(generating) - len(rows))
          rows += [(seq, seq.prefilled + i) for i in range(take)]
      # a pipeline's groups: the running sequences shared evenly among its stages (those in flight count)
      depth = self.runner.depth
      per = cap if depth == 1 else max(1, min(cap, math.ceil((len(rows) + sum(len(r) for r, _, _ in self.in_flight)) / depth)))
      for i in range(0, len(rows), per):
        self.in_flight.append(self._send(rows[i:i + per]))
        if len(self.in_flight) >= depth: self._receive_oldest()
      if self.in_flight and not rows: self._receive_oldest()  # nothing new to send: wait for the oldest
      if self.graphs is not None: self.graphs.save_new()  # writes only when a graph was captured that the file lacks
    except Exception as e:  # the model failed: every sequence it was running fails with it, the engine goes on
      error = e if isinstance(e, TgLlamaError) else TgLlamaError(f"the model failed: {type(e).__name__}: {e}")
      sent = [s for sent_rows, _, _ in self.in_flight for s, _ in sent_rows]
      self.in_flight.clear()
      with self._lock:
        for seq in [s for s in (*prefilling, *generating, *sent) if not s.done]: self._finish(seq, Output(None, "error", error=error))
    return True

  def _prefill(self, seq: Sequence):
    """Chunks of the prompt: one between steps when others run, else every chunk until the rest is short enough for rows."""
    prompt, slot = seq.request.prompt, seq.slot
    while True:
      rest = len(prompt) - seq.prefilled
      end = seq.prefilled + min(rest, next((c for c in self.runner.chunks if rest <= c + ROW_TAIL), self.runner.chunks[-1]))
      logits = self.runner.prefill(slot.index, prompt[seq.prefilled:end], seq.prefilled)
      self.prefilled_tokens += end - seq.prefilled
      slot.tokens = list(prompt[:end])
      seq.prefilled = end
      if end == len(prompt): return self._emit([(seq, 0)], logits)
      if len(self.running) > 1 or len(prompt) - end <= ROW_PREFILL: return

  def _send(self, rows: list[tuple[Sequence, int | None]]) -> tuple[list, list, object]:
    """One batched step, sent: each row is a generating sequence's last token (None) or the prompt token at that index.
    Its rows, the rows that emit a token, and its logits (a pipeline's may still be computing); _receive_oldest emits them."""
    batch = [(s.slot.index, len(s.slot.tokens), s.generated[-1]) if i is None else (s.slot.index, i, s.request.prompt[i]) for s, i in rows]
    logits = self.runner.decode(batch, pad_to_ready=any(i is not None for _, i in rows))  # a prompt's rows pad to a ready step
    emitting = []
    for r, ((seq, i), (_, _, token)) in enumerate(zip(rows, batch)):
      seq.in_flight += 1
      seq.slot.tokens.append(token)
      if i is None: emitting.append((seq, r))
      else:
        seq.prefilled += 1
        self.prefilled_tokens += 1
        if seq.prefilled == len(seq.request.prompt): emitting.append((seq, r))  # the prompt's last token: its first output
    return rows, emitting, logits

  def _receive_oldest(self):
    rows, emitting, logits = self.in_flight[0]
    for seq, _ in rows: seq.in_flight -= 1
    self._emit(emitting, logits)
    self.in_flight.popleft()

  def _emit(self, rows: list[tuple[Sequence, int]], logits):
    """The next token of each sequence from its row of `logits`; a sequence whose prompt just ended starts its sampling."""
    if not rows: return
    starting = [s for s, _ in rows if not s.generated]
    if starting: self.runner.sampler.reset([s.request.sampling for s in starting], [s.request.prompt for s in starting], [s.slot.index for s in starting])
    host = logits.numpy() if any(s.request.logits or s.request.logprobs is not None for s, _ in rows) else None
    with self._lock:
      for seq, r in rows:
        if seq in starting and seq.request.logits: seq.notify(Output(None, None, logits=host[r]))
        if seq in starting and seq.request.max_tokens == 0 and not seq.done: self._finish(seq, Output(None, "length"))
    if not (live := [(s, r) for s, r in rows if not s.done]): return
    slots: list[int | None] = [None] * logits.shape[0]
    for seq, r in live: slots[r] = seq.slot.index
    mask = None
    if any(s.matcher is not None for s, _ in live):  # constrained rows get their grammar's tokens, the others every token
      mask = np.full((logits.shape[0], words(self.vocab)), -1, dtype=np.int32)
      for seq, r in live:
        if seq.matcher is not None: seq.matcher.fill(mask[r])
    tokens = self.runner.sample(logits, slots, all(s.request.sampling.is_greedy for s, _ in live), mask)
    with self._lock:
      for seq, r in live:
        if seq.done: continue
        token = int(tokens[r])
        seq.generated.append(token)
        if seq.matcher is not None and not seq.matcher.consume(token) and token not in seq.request.stop_ids:
          self._finish(seq, Output(None, "error", error=TgLlamaError(f"the constraint refused token {token}: {seq.matcher.error}")))
          continue
        complete = seq.matcher is not None and seq.matcher.done  # nothing may follow: the request ends here
        reason = "stop" if token in seq.request.stop_ids or complete else "length" if len(seq.generated) >= seq.request.max_tokens else None
        lp, top = None, ()
        if (k := seq.request.logprobs) is not None:
          row = _log_softmax(host[r])
          lp, top = float(row[token]), tuple((int(t), float(row[t])) for t in np.argsort(-row, kind="stable")[:k])
        out = Output(token, reason, lp, top)
        if reason is None: seq.notify(out)
        else: self._finish(seq, out)

  def _finish(self, seq: Sequence, last: Output):
    # with the lock held
    seq.done = True
    if seq in self.waiting: self.waiting.remove(seq)
    if seq in self.running: self.running.remove(seq)
    if seq.slot is not None: self.runner.cache.release(seq.slot)
    seq.notify(last)

  # *** the loop thread ***

  def start(self) -> Engine:
    """Run steps in a thread of their own from now on (for a server); handles then only wait for their outputs."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="tg-llama-engine", daemon=True)
      self._thread.start()
    return self

  def _loop(self):
    while True:
      with self._lock:
        while not (self.waiting or self.running or self._closing): self._lock.wait()
        if self._closing and not (self.waiting or self.running): return
      self.step()

  def close(self, error: TgLlamaError | None = None):
    """Stop admitting requests; end the open ones with `error` (or let them finish when None), and stop the loop."""
    with self._lock:
      self._closing = True
      if error is not None:
        for seq in [*self.waiting, *self.running]: self._finish(seq, Output(None, "error", error=error))
      self._lock.notify()
    if self._thread is not None and self._thread is not threading.current_thread(): self._thread.join()

  def stats(self) -> dict:
    with self._lock:
      return {"slots": self.runner.slots, "free_slots": self.runner.cache.free_slots(), "running": len(self.running),
              "waiting": len(self.waiting), "prefilled_tokens": self.prefilled_tokens}

def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
