"""One stage of a pipeline: a layer shard in a process of its own (a Ray actor), with its own backend, KV cache slots and
captured graphs (saved to and loaded from its node's graph cache, as one process does).

The driver (tg_llama/cluster/pipeline.py) calls it with token ids for the first stage; each stage's hidden states go to
the next as float32 bytes, the dtype of every stage's input whatever it computes in (a float16 stage's own would not
fit the next stage's input; and a small numpy array costs a Ray call about 0.07 ms more than bytes or a list). The
last stage keeps its logits and samples from them when asked, so only token ids come back.
Ray runs one actor's calls in the order a caller made them, so a stage needs no locks and no step numbers: its latest
logits are those of the step the driver samples next.

The last stage also holds the other stages' handles: when the driver asks it to, it starts the next decode step on them
with the tokens it just sampled (`sample`'s `then`), before its answer reaches the driver, which then sends only the
last stage's part of that step. A token's step then goes last stage -> first -> ... -> last, not through the driver
between stages (a ring, as exo's nodes pass a token on)."""
from __future__ import annotations
import atexit, collections, multiprocessing.util, os, time
import numpy as np
from tinygrad import Device
from tg_llama.engine.runner import ModelRunner
from tg_llama.transfer import read

class AheadLost(Exception):
  """A step the driver says was started here is not: this stage is a new process (Ray restarted it), the step's
  hidden states went with the old one."""

class Stage:
  def __init__(self, source: str | None, start_layer: int, end_layer: int, backend: str | None, dtype: str | None,
               max_context: int, slots: int, quantize: str | None, graph_cache: bool = True, shares_node: bool = False):
    started = time.perf_counter()
    # when the driver goes, Ray ends this process; its exit must not wait on tinygrad's compile pool, whose shutdown can
    # hang there for good (a stage left running, its threads polling). atexit runs the last registered first: after
    # multiprocessing's own (registered when multiprocessing.util is first imported), so before it
    atexit.register(os._exit, 0)
    from tg_llama.api import DTYPES, build
    from tg_llama.assets import resolve_model
    from tg_llama.backend import on_cpu, resolve_backend
    from tg_llama.convert import open_checkpoint
    from tg_llama.jit_cache import GraphCache, graphs_enabled
    self.backend = resolve_backend(backend)
    self.dtype = DTYPES[dtype] if dtype else self.backend.dtype
    self.checkpoint = open_checkpoint(resolve_model(source))
    self.config, self.devices = self.checkpoint.config, ()
    self.llama, self.quantization = build(self.checkpoint, self.backend.device, self.dtype, start_layer, end_layer, quantize=quantize)
    self.runner = ModelRunner(self.llama, self.backend.device, self.dtype, max_context, slots)
    if shares_node and on_cpu(self.backend.device):
      from tg_llama.cpu import graph
      graph.nap_between_replays()  # the other stages here compute while this one waits: leave them the cores
    self.graphs = GraphCache.for_model(self) if graphs_enabled(graph_cache) else None
    if self.graphs is not None: self.graphs.load()
    self.logits = None
    self.earlier: list = []  # the stages before this one (the last stage's, from connect()): it starts steps on them
    self.ahead: dict[int, object] = {}  # key -> the earlier stages' output (a ref) of a step started here
    self.busy_s, self.steps = 0.0, 0  # time inside rows(): the bench's stage compute, next to the pipeline's per-token time
    self.spans: collections.deque[tuple[float, float]] = collections.deque(maxlen=512)  # the latest steps' (start, end), monotonic
    # a new value each time the actor starts: the driver tells a restarted stage (its KV cache empty) by it
    self.incarnation = os.urandom(8).hex()
    self.load_s = time.perf_counter() - started

  def connect(self, earlier: list):
    """The handles of the stages before this one (the driver gives them to the last stage, again when it restarts)."""
    self.earlier = earlier

  def info(self) -> dict:
    import ray
    return {"incarnation": self.incarnation, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
            "device": self.backend.device, "dtype": self.dtype.name, "layers": (self.llama.start_layer, self.llama.end_layer),
            "quantize": self.quantization["mode"], "load_s": self.load_s, "graphs_loaded": list(self.graphs.loaded) if self.graphs else [],
            "busy_s": self.busy_s, "steps": self.steps, "spans": list(self.spans)}

  def chunk(self, slot: int, x: np.ndarray | bytes, start: int) -> bytes | None:
    """A prefill chunk (tg_llama/engine/runner.py's run_chunk) of n token ids, or of the previous stage's hidden states:
    the hidden states of its n tokens (n, dim) for the next stage, or None on the last stage (its logits kept)."""
    x = self._hidden(x, (-1, self.config.dim)) if isinstance(x, bytes) else x
    return self._out(self.runner.run_chunk(slot, x, start), lambda h: h[0, :len(x)])

  def rows(self, rows: list[tuple[int, int]], x: list[int] | bytes) -> bytes | None:
    """A step of rows (run_rows) on a token id each, or on the previous stage's hidden states: theirs (n, 1, dim) for the
    next stage, or None on the last stage."""
    start = time.monotonic()
    x = self._hidden(x, (len(rows), 1, self.config.dim)) if isinstance(x, bytes) else np.array(x, dtype=np.int32).reshape(-1, 1)
    out = self._out(self.runner.run_rows(rows, x), lambda h: h[:len(rows)])
    if self.llama.is_last: Device[self.backend.device].synchronize()  # a GPU's graph may still run: its time is the stage's
    end = time.monotonic()
    self.busy_s, self.steps = self.busy_s + end - start, self.steps + 1
    self.spans.append((start, end))
    return out

  def _out(self, out, rows):
    if self.graphs is not None: self.graphs.save_new()  # writes only when a graph was captured that the file lacks
    if self.llama.is_last:
      self.logits = out
      return None
    return np.ascontiguousarray(rows(read(out)), dtype=np.float32).tobytes()

  def _hidden(self, x: bytes, shape: tuple) -> np.ndarray: return np.frombuffer(x, dtype=np.float32).reshape(shape)

  def run(self, step: tuple, x, *after) -> bytes | None:
    """A step the driver describes as ("rows", rows) or ("chunk", slot, start), on its input x: the previous stage's
    output, or ("ahead", key) for that of a step started here. `after`: refs of the step's earlier calls here (a long
    prompt's chunks), so that their errors are this call's."""
    if isinstance(x, tuple):
      import ray
      if x[1] not in self.ahead: raise AheadLost(f"step {x[1]} was started by an earlier incarnation of this stage")
      x = ray.get(self.ahead.pop(x[1]))
    return self.rows(step[1], x) if step[0] == "rows" else self.chunk(step[1], x, step[2])

  def sample(self, slots: list[int | None], greedy_only: bool, mask: np.ndarray | None, step: tuple = (), x=None, *after,
             then: tuple | None = None) -> list[int]:
    """Token ids from the latest logits (runner.sample); with `step` and its input `x` (as run() takes them), from that
    step's logits, run first: a step and its sampling in one call, a hop less a token. `after`: the ref of the step that
    made the logits when it ran apart, so that a failed step fails this call too. `then`: (key, [(row, slot, position)]):
    start the next step of those rows, each with the token sampled for its row, on the earlier stages (kept as `key`)."""
    if step: self.run(step, x)
    tokens = self.runner.sample(self.logits, slots, greedy_only, mask)
    if then is not None and self.earlier:  # (a restarted last stage has no handles until the driver's recovery)
      key, rows = then
      x = [int(tokens[r]) for r, _, _ in rows]
      for stage in self.earlier: x = stage.rows.remote([(s, p) for _, s, p in rows], x)
      self.ahead[key] = x
    if self.graphs is not None: self.graphs.save_new()
    return tokens.tolist()

  def settle(self, keys: list[int] | None):
    """Forget the steps started here as `keys` (None: all), once they have run: the driver will not use them, and sends
    the earlier stages other work for their slots only after this answers, so that none of them writes a slot after it."""
    import ray
    refs = [self.ahead.pop(k) for k in (list(self.ahead) if keys is None else keys) if k in self.ahead]
    if refs: ray.wait(refs, num_returns=len(refs))

  def host_logits(self, *after) -> np.ndarray: return self.logits.numpy()

  def reset_sampler(self, params: list, prompts: list[list[int]], slots: list[int]):
    self.runner.sampler.reset(params, prompts, slots)
