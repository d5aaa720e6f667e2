"""A model run as a pipeline of layer shards on a Ray cluster, behind the engine like one process's model runner.

The engine (tg_llama/engine/engine.py) drives a PipelineRunner as it drives a ModelRunner: prefill, decode, sample, and
the slots' bookkeeping (which tokens each KV cache slot holds) stay in the driver; each stage (tg_llama/cluster/stage.py)
holds its layers' keys and values for every slot. A step's inputs go to the first stage, each stage's hidden states go to
the next as a Ray object (the driver never waits between stages: Ray passes a call's result to the call that takes it),
and the last stage runs the step and samples from its logits in one call, when the engine samples: one step costs the
stages' compute plus one call per stage.

When the first and the last stage run on different devices, a decode step is started by the last stage instead, as it
samples: it runs the next step of the rows it sampled (each at its next position, with its new token) on the earlier
stages (`ahead`), and when the engine's next step is that one, the driver sends only its last part. A token then goes
last stage -> first -> ... -> last (a ring, as in exo) rather than through the driver between stages, and the driver's
exchange with the last stage overlaps the first stage's compute: 2 stages on a core each, 15.2-16.3 -> 13.7-15.6 ms a
token (the driver beside either). Stages that share one CPU's cores do not: the driver's work then slows the first
stage's compute as much as it saves (1 stream the same, 4 streams 5% slower). When the engine's next step differs (a
request ended or joined), the step started ahead is dropped once it ran: the driver waits for it (the last stage's
`settle`) before it sends the earlier stages anything for those slots, since Ray orders only one caller's calls. What
it wrote at a slot's next position is never read: the slot's next step there writes it again first.

Several steps are in flight at once: the engine (its `depth`, the number of devices the stages run on) splits the
running sequences into as many groups and sends a group's next step as soon as its tokens are back, so that stage 1
runs one group while stage 2 runs another (pipeline parallelism). Each stage runs the calls in the order the driver sent
them (Ray's order for one caller), and the last stage's part of each step is sent in the order the steps were made.

Faults: a stage actor is restarted by Ray (`max_restarts`) and loads its shard again. The driver sees the step fail,
waits for every stage to answer, and when one came back as a new process (its KV cache empty) runs every busy slot's
tokens through the pipeline again, restores the last stage's sampling state, and runs the step again: a greedy request
finishes with the tokens it would have had. A stage that does not answer within `restart_timeout` seconds, or that Ray
will not restart, fails the step with an error naming it; the engine fails the step's requests with it.

Not here: moving a stage to another node when its node is gone (Ray restarts it where the plan put it)."""
from __future__ import annotations
import collections, itertools, time
from typing import Callable, Sequence
import numpy as np
from tinygrad import dtypes
from tg_llama.config import LlamaConfig
from tg_llama.engine.kv_cache import KVCache
from tg_llama.engine.runner import MIN_ROWS, buckets, chunk_sizes
from tg_llama.errors import TgLlamaError
from tg_llama.cluster.plan import StagePlan
from tg_llama.cluster.stage import AheadLost

class StageError(TgLlamaError): pass

class RemoteLogits:
  """A step's logits, on the last stage: (bucket, vocab) as a local runner's would be. The last stage's part of the step
  waits for what reads them: sample() sends it with the sampling as one call, numpy() runs it apart and fetches them;
  a step nobody reads (a prompt's rows that end no prompt) is sent before the next step's last part, in order.
  `x`: the last stage's input (the previous stage's hidden states, a ref, or ("ahead", key)); `last`: ("rows", rows) or
  ("chunk", slot, start); `after`: refs of the step's earlier calls on the last stage (a long prompt's chunks), whose
  errors are this step's. `redo` runs the step again; `slot_starts`: where the step writes in each slot (a recovery
  refills up to there); `positions`: each row's (slot, position)."""
  def __init__(self, pipeline: PipelineRunner, rows: int, x, last: tuple, after: list, redo: Callable, slot_starts: dict[int, int],
               positions: list[tuple[int, int]]):
    self.pipeline, self.shape, self.redo, self.slot_starts = pipeline, (rows, pipeline.config.vocab_size), redo, slot_starts
    self.positions = positions
    self.x, self.last, self.after, self.ran = x, last, after, None  # ran: the last stage's call, once sent
    self.order = next(pipeline.steps)

  def run_last(self, send: Callable | None = None):
    """Send the last stage's part of the step (`send`: a call that runs it, else one that only runs it), after the parts
    of the steps before it that are still unsent: the last stage runs every step in the order the engine made them."""
    if self.ran is None:
      unsent = self.pipeline.unsent
      while unsent and unsent[0].order < self.order: unsent.popleft().run_last()
      if unsent and unsent[0] is self: unsent.popleft()
      self.ran = send() if send is not None else self.pipeline.stages[-1].run.remote(self.last, self.x, *self.after)
    return self.ran

  def numpy(self) -> np.ndarray: return self.pipeline._call(lambda: self.pipeline._get(self.pipeline.stages[-1].host_logits.remote(self.run_last())), self)

class RemoteSampler:
  """The last stage's sampler, as the engine resets it; what it was told is kept, to tell a restarted last stage again."""
  def __init__(self, pipeline: PipelineRunner):
    self.pipeline, self.params = pipeline, {}

  def reset(self, params: Sequence, prompts: Sequence[Sequence[int]], slots: Sequence[int]):
    for p, s in zip(params, slots): self.params[s] = p
    self.pipeline.stages[-1].reset_sampler.remote(list(params), [list(p) for p in prompts], list(slots))

class PipelineRunner:
  def __init__(self, stages: list, plan: list[StagePlan], infos: list[dict], config: LlamaConfig, max_context: int, slots: int,
               prefill_chunk: int = 64, timeout: float = 600, restart_timeout: float = 300, max_recoveries: int = 3):
    import ray
    self.ray, self.stages, self.plan, self.config, self.max_context = ray, stages, plan, config, max_context
    self.prefill_chunk = min(prefill_chunk, max_context)
    self.chunks = chunk_sizes(self.prefill_chunk)  # each stage's runner has a graph for each
    self.timeout, self.restart_timeout, self.max_recoveries = timeout, restart_timeout, max_recoveries
    self.buckets = buckets(max(slots, MIN_ROWS))
    self.cache = KVCache(config, range(0), slots, max_context + self.prefill_chunk, dtypes.float32, "CPU")  # the slots' bookkeeping
    self.sampler = RemoteSampler(self)
    self.infos = infos
    self.device = " -> ".join(f"{info['device']} [{p.layers}]" for p, info in zip(plan, infos))
    self.recoveries = 0
    # steps in flight that keep every stage busy (the engine sends that many groups): one per device, as stages on one
    # node's CPU share its cores (2 stages on 2 cores: 43-51 tokens/s for 4 streams in flight, 53-58 one step at a time)
    self.depth = len({(info["node"], info["device"]) for info in infos})
    self.start_ahead = (infos[0]["node"], infos[0]["device"]) != (infos[-1]["node"], infos[-1]["device"])  # (see above)
    self.unsent: collections.deque[RemoteLogits] = collections.deque()  # steps whose last part waits for a reader
    self.steps = itertools.count()
    self._get(stages[-1].connect.remote(stages[:-1]))
    self.ahead: dict[int, list[tuple[int, int, int]]] = {}  # decode steps the last stage started: key -> their (slot, position, token) rows
    self.keys = itertools.count()

  @property
  def slots(self) -> int: return len(self.cache.slots)

  def bucket(self, n: int) -> int: return next(b for b in self.buckets if b >= n)

  def step_rows(self, generating: int) -> int:
    """The most rows a step takes (the engine's): every bucket's. Each stage captures its own graphs, out of sight here."""
    return self.buckets[-1]

  def stage_infos(self) -> list[dict]:
    """Each stage's info now (tg_llama/cluster/stage.py Stage.info): its process, device, layers, time spent in steps."""
    return self._get([stage.info.remote() for stage in self.stages])

  def graphs_loaded(self) -> set[str]:
    """The graphs every stage that runs them loaded from its cache (the sampling heads run on the last stage only)."""
    names = set().union(*(info["graphs_loaded"] for info in self.infos))
    return {n for n in names if all(n in info["graphs_loaded"] for info in (self.infos[-1:] if n.startswith(("greedy", "sample")) else self.infos))}

  # *** what the engine calls ***

  def prefill(self, slot: int, tokens: Sequence[int], start: int) -> RemoteLogits:
    tokens = list(tokens)
    last = (len(tokens) - 1) // self.prefill_chunk * self.prefill_chunk  # where the last chunk starts
    def run():
      self._settle({slot})
      after = [self._chunks(slot, tokens[:last], start)] if last else []
      x = self._through(self.stages[:-1], slot, tokens[last:], start + last)
      return self._unsent(RemoteLogits(self, 1, x, ("chunk", slot, start + last), after, run, {slot: start}, [(slot, start + len(tokens) - 1)]))
    return self._call(run, slot_starts={slot: start})

  def decode(self, rows: Sequence[tuple[int, int, int]], pad_to_ready: bool = False) -> RemoteLogits:
    # each stage captures its own graphs: the steps run in the smallest bucket that holds them (pad_to_ready is for one process)
    rows = list(rows)
    starts: dict[int, int] = {}
    for s, p, _ in rows: starts[s] = min(p, starts.get(s, p))
    def run():
      key = next((k for k, ahead in self.ahead.items() if ahead == rows), None)  # the last stage started this step
      if key is not None: del self.ahead[key]
      self._settle({s for s, _, _ in rows})
      if key is not None: x = ("ahead", key)
      else:
        x = [t for _, _, t in rows]
        for stage in self.stages[:-1]: x = stage.rows.remote([(s, p) for s, p, _ in rows], x)
      # not waited for: the last stage runs the step with its sampling, so a step costs one call per stage; a step that
      # failed fails sample() too, whose recovery runs the step again
      positions = [(s, p) for s, p, _ in rows]
      return self._unsent(RemoteLogits(self, self.bucket(len(rows)), x, ("rows", positions), [], run, starts, positions))
    return self._call(run, slot_starts=starts)

  def sample(self, logits: RemoteLogits, slots: Sequence[int | None], greedy_only: bool, mask: np.ndarray | None = None) -> np.ndarray:
    # the next decode step of the sampled rows, each a position further with its new token, if the context has room
    rows = [(r, s, p + 1) for r, ((s, p), slot) in enumerate(zip(logits.positions, slots)) if slot is not None]
    then = (next(self.keys), rows) if self.start_ahead and rows and max(p for _, _, p in rows) < self.max_context else None
    def run():
      last = self.stages[-1]
      if logits.ran is not None: return self._get(last.sample.remote(list(slots), greedy_only, mask, (), None, logits.ran, then=then))
      return self._get(logits.run_last(lambda: last.sample.remote(list(slots), greedy_only, mask, logits.last, logits.x, *logits.after, then=then)))
    tokens = np.array(self._call(run, logits), dtype=np.int32)
    if then is not None: self.ahead[then[0]] = [(s, p, int(tokens[r])) for r, s, p in rows]
    return tokens

  # *** stages ***

  def _settle(self, slots: set[int]):
    """Drop the steps the last stage started for any of `slots`, once they have run (the engine's next step for them
    is another): the earlier stages get nothing more for those slots before."""
    keys = [k for k, rows in self.ahead.items() if any(s in slots for s, _, _ in rows)]
    for k in keys: del self.ahead[k]
    if keys: self._get(self.stages[-1].settle.remote(keys))

  def _unsent(self, logits: RemoteLogits) -> RemoteLogits:
    self.unsent.append(logits)
    return logits

  def _chunks(self, slot: int, tokens: list[int], start: int):
    """A prompt's chunks through every stage; the last stage's ref of the last chunk (its logits kept there)."""
    x = None
    for pos in range(0, len(tokens), self.prefill_chunk): x = self._through(self.stages, slot, tokens[pos:pos + self.prefill_chunk], start + pos)
    return x

  def _through(self, stages: list, slot: int, tokens: list[int], start: int):
    x = np.array(tokens, dtype=np.int32)
    for stage in stages: x = stage.chunk.remote(slot, x, start)
    return x

  def _get(self, ref, timeout: float | None = None):
    try: return self.ray.get(ref, timeout=timeout or self.timeout)
    except self.ray.exceptions.GetTimeoutError:
      raise StageError(f"a pipeline step did not finish in {timeout or self.timeout:.0f} s; stages: {self.device}") from None

  def _call(self, run: Callable, logits: RemoteLogits | None = None, slot_starts: dict[int, int] | None = None):
    """run(), and when a stage failed under it: wait for the stages, refill what a restarted one lost (each slot up to
    where the step writes), run it again. With `logits`, run() reads them: the step that made them runs again first."""
    for attempt in range(self.max_recoveries + 1):
      try:
        if attempt:
          self._recover(logits.slot_starts if logits is not None else slot_starts or {})
          if logits is not None:
            again = logits.redo()
            self.unsent.remove(again)
            logits.x, logits.after, logits.ran, logits.order = again.x, again.after, None, again.order
        return run()
      except Exception as e:
        if not self._stage_lost(e): raise self._error(e) from None
        if attempt == self.max_recoveries: raise StageError(f"a stage kept failing ({self.max_recoveries} recoveries): {_cause(e)}") from None

  def _stage_lost(self, e: Exception) -> bool:
    ex, lost = self.ray.exceptions, (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError, AheadLost)
    return isinstance(e, lost) or (isinstance(e, ex.RayTaskError) and isinstance(e.cause, lost))

  def _error(self, e: Exception) -> Exception:
    if isinstance(e, TgLlamaError): return e
    cause = e.cause if isinstance(e, self.ray.exceptions.RayTaskError) else e
    return cause if isinstance(cause, TgLlamaError) else StageError(f"a stage failed: {type(cause).__name__}: {cause}")

  def _recover(self, slot_starts: dict[int, int]):
    """Wait for every stage to answer; if one is a new process, fill its KV cache again from the slots' tokens (up to
    where the failed step writes) and tell it the sampling state."""
    deadline, infos = time.monotonic() + self.restart_timeout, []
    for i, (stage, plan) in enumerate(zip(self.stages, self.plan)):
      while True:
        try:
          infos.append(self.ray.get(stage.info.remote(), timeout=max(0.1, deadline - time.monotonic())))
          break
        except self.ray.exceptions.ActorUnavailableError as e:  # restarting: loading its shard again
          if time.monotonic() < deadline:
            time.sleep(0.1)
            continue
          error = e
        except Exception as e: error = e
        why = "died and cannot be restarted" if isinstance(error, self.ray.exceptions.ActorDiedError) else f"did not come back within {self.restart_timeout:.0f} s"
        raise StageError(f"stage {i + 1} of {len(self.stages)} (layers {plan.layers} on node {plan.node_label}) {why}: {_cause(error)}") from None
    restarted = [i for i, (old, new) in enumerate(zip(self.infos, infos)) if old["incarnation"] != new["incarnation"]]
    self.infos = infos
    self.ahead.clear()  # started on the stages before the failure: run again from the driver
    if len(self.stages) - 1 in restarted: self._get(self.stages[-1].connect.remote(self.stages[:-1]))
    self._get(self.stages[-1].settle.remote(None))
    if not restarted: return
    self.recoveries += 1
    self.unsent.clear()  # what they wrote is in the slots' tokens, filled again below; their inputs may be gone with the stage
    for slot in self.cache.slots:
      if not slot.busy: slot.tokens = []  # its prefix is gone from the restarted stage: never reused
      elif tokens := slot.tokens[:slot_starts.get(slot.index, len(slot.tokens))]: self._get(self._chunks(slot.index, tokens, 0))
    if len(self.stages) - 1 in restarted:
      busy = [s for s in self.cache.slots if s.busy and s.index in self.sampler.params]
      if busy: self.sampler.reset([self.sampler.params[s.index] for s in busy], [s.tokens for s in busy], [s.index for s in busy])

def _cause(e: Exception) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
