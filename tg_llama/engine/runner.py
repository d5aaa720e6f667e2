"""The model runner: a model (or a layer shard of one) on one backend, its KV cache of S slots, and the captured graphs that
run it.

Graphs (Jit: tinygrad's TinyJit, replayed from C on the CPU by tg_llama/cpu/graph.py): a prefill of a fixed-size chunk
of one sequence (two sizes: the chunk and half of it), and per batch bucket (1, 2, 4, 8, ... up to max(S, 8) rows) one
step of one token per row and its greedy and sampling heads (the sampling head with and without top-k's search). A row
is a (slot, position, token): the next token of a generating sequence, or one token of a prompt's short rest (several
rows of one slot at consecutive positions: every row's keys and values are written before any row attends). Each row's
cache slot and position are symbolic variables bound per call, so one graph serves every position and every assignment
of sequences to slots. Prefill runs in chunks of `prefill_chunk` tokens, the last one padded (in a half chunk where it
fits): fixed shapes compile to kernels about 3x faster than a symbolic chunk length on the CPU, and the padding's keys
and values land in slack positions past the context (or are overwritten later) where no real query ever looks. A batch
smaller than its bucket is padded with copies of its first row: they write the same keys and values to the same place
and draw the same logits, and their outputs are dropped. Sampling reads and advances per-sequence state, so there the
rows that sample for no sequence (padding, a prompt's inner tokens) use a scratch row of the sampler's instead (two rows
updating one sequence's state would advance it twice).

A layer shard (a stage of tg_llama/cluster/) runs the same graphs on what the stage before it gave: the first shard takes
token ids, a later one hidden states (float32 between stages, whatever each one computes in); the last one gives logits and
samples, the others give hidden states.

Not here: which sequences run when (tg_llama/engine/engine.py), speculative decoding."""
from __future__ import annotations
from typing import Sequence
import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.helpers import JIT
from tinygrad.dtype import DType
from tinygrad.engine.jit import _TinyJit, _prepare_jit_inputs
from tinygrad.nn.state import get_parameters
from tg_llama.backend import free_buffer_cache, on_cpu
from tg_llama.config import LlamaConfig
from tg_llama.engine.early_compile import EarlyCompile
from tg_llama.engine.kv_cache import KVCache
from tg_llama.models.llama import Llama
from tg_llama.parallel import place_input, shard_model
from tg_llama.constraint import words
from tg_llama.sampling import Sampler, mask_logits
from tg_llama.transfer import full, read, write

MIN_ROWS = 8  # buckets even with fewer slots: a short prompt rest runs up to 8 tokens a step (where that graph is ready), not a padded chunk

def chunk_sizes(prefill_chunk: int) -> tuple[int, ...]:
  """The prefill chunks with a graph each: the whole chunk, and half of it for a prompt's rest that fits (half the padding)."""
  return tuple(sorted({max(prefill_chunk // 2, 1), prefill_chunk}))

def buckets(rows: int) -> tuple[int, ...]:
  """Batch sizes with a decode graph each: powers of two below `rows`, and `rows`."""
  return tuple(sorted({*(1 << i for i in range(rows.bit_length()) if 1 << i < rows), rows}))

class Jit(_TinyJit):
  """tinygrad's TinyJit. A graph it captures (or is given, tg_llama/jit_cache.py) on CPU tensors is offered to the CPU backend's
  own replay (tg_llama/cpu/graph.py, imported only then), which takes it when every kernel runs on the CPU; any other graph
  replays through tinygrad. The first call captures (TinyJit's runs its function once without capturing first): that run
  is not memory-planned, so it held every intermediate at once (Llama 3.2 1B's prefill chunk: 256 MB over the graph's),
  and it cost a whole extra run of every graph on a cold start. What the model reads is realized before its first call.
  A capture's kernels are compiled as they are captured (tg_llama/engine/early_compile.py), not all after it, and its graph
  is offered to the CPU's replay before the capture's own run of it."""
  offered = None       # the captured graph last offered: each once
  known_for = None     # the captured graph `known` is of
  MAX_KNOWN = 8        # input sets remembered a graph (a head's logits come from the prefill graphs and the decode step's)
  capture_args = None  # the arguments of the call that is capturing, while it does
  _captured = None

  def __init__(self, fxn=None, captured=None, prune=False):
    self.early = EarlyCompile()
    super().__init__(fxn if fxn is None else self._compiling_early(fxn), captured, prune)
    if fxn is not None: self.cnt = 1

  def _compiling_early(self, fxn):
    def run(*args, **kwargs):
      ret = fxn(*args, **kwargs)
      if self.capture_args is not None:  # its outputs' kernels sent too, and every kernel compiled before jit_lower looks
        if params := get_parameters(ret): Tensor.realize(*params)
        self.early.collect()
        if hasattr(self, "_linears"): self._linears = [self.early.compiled(linear) for linear in self._linears]
      return ret
    return run

  @property
  def captured(self): return self._captured

  @captured.setter
  def captured(self, graph):
    # a graph captured by this call, offered before the capture's own run of it: tinygrad's replay of that run took 0.4 s
    # longer than the CPU's runner, and finding the buffers it writes 0.25 s more (a prefill chunk, AMD EPYC)
    self._captured = graph
    if graph is not None and (args := self.capture_args) is not None:
      self.capture_args = None
      self._offer(*args)

  def add_linear(self, linear, var_vals):
    super().add_linear(linear, var_vals)
    self.early.send(linear)

  def __call__(self, *args, **kwargs):
    uops = tuple(a.uop for a in args if isinstance(a, Tensor))
    if not kwargs and self.known_for is not None and self.known_for is self.captured and (bufs := self.known.get(uops)) is not None:
      # the same realized inputs as a call tinygrad checked, only the variables' values new: its preparing of the inputs
      # (a graph rewrite of each) cost 0.1-0.2 ms a call, and a token makes two (the step and its sampling)
      self.cnt += 1
      return self.captured(bufs, {v.expr: value for v, value in (a.unbind() for a in args if isinstance(a, UOp))})
    self._offer(args, kwargs)  # a graph from the cache (tg_llama/jit_cache.py): replayed by the CPU's runner from its first call
    checked = self.cnt >= 2
    self.capture_args = (args, kwargs) if JIT and self.cnt == 1 and self.fxn is not None else None  # as TinyJit decides
    try: ret = super().__call__(*args, **kwargs)
    finally: self.capture_args = None
    if checked and not kwargs and self.captured is not None: self._remember(args, uops)  # JIT=0 captures nothing
    return ret

  def _remember(self, args, uops):
    if self.known_for is not self.captured: self.known_for, self.known = self.captured, {}
    if len(self.known) >= self.MAX_KNOWN: return  # a caller with new inputs each time: checked each time, nothing held
    bufs, var_vals, _, _ = _prepare_jit_inputs(args, {})
    # realized inputs (buffers or views of them), every variable an argument (none in an input's shape)
    if len(bufs) == len(uops) and all(b is u.base for u, b in zip(uops, bufs)) and \
       set(var_vals) == {a.unbind()[0].expr for a in args if isinstance(a, UOp)}:
      self.known[uops] = bufs

  def _offer(self, args, kwargs):
    if self.captured is None or self.captured is self.offered: return
    if any(isinstance(t, Tensor) and on_cpu(t.device) for t in (*args, *kwargs.values())):
      from tg_llama.cpu import graph
      graph.install(self)
    self.offered = self.captured
    # the buffers tinygrad keeps for reuse (of what ran before the capture: loading, uncaptured calls) serve none of the
    # graph's, which has its own
    free_buffer_cache(tuple({d for t in (*args, *kwargs.values()) if isinstance(t, Tensor) for d in devices_of(t)}))

class ModelRunner:
  depth = 1  # steps in flight that keep it busy (a pipeline's stages each run one): one process runs a step at a time
  # whether a prompt's rows may capture a step of their own (step_rows): a chat's warm-up sets it, so that its turns' last
  # rows run 8 a step where a step of 8 rows costs less than 8 of one (the Intel Xeon: 3x one)
  rows_capture = False
  def __init__(self, llama: Llama, device: str, dtype: DType, max_context: int, slots: int = 1, prefill_chunk: int = 64,
               devices: tuple[str, ...] = ()):
    self.llama, self.device, self.dtype, self.max_context, self.devices = llama, device, dtype, max_context, devices
    self.prefill_chunk = min(prefill_chunk, max_context)
    positions = max_context + self.prefill_chunk  # slack for the last chunk's padding
    llama.setup_rope(positions, device)
    self.cache = KVCache(llama.config, range(llama.start_layer, llama.end_layer), slots, positions, dtype, device)
    if len(devices) > 1:
      shard_model(llama, devices)
      self.cache.shard(devices)
    self.buckets = buckets(max(slots, MIN_ROWS))
    # the graphs' inputs, written in place before each call: a chunk's and each bucket's rows' token ids (hidden states
    # after the first shard), the token masks of constrained rows, and one mask with every bit set for the steps where no
    # row is constrained
    new = lambda *shape, fill=0, dtype=dtypes.int32: full(shape, fill, dtype, device)
    row = () if llama.is_first else (llama.config.dim,)
    kind = dtypes.int32 if llama.is_first else dtypes.float32
    self.chunks = chunk_sizes(self.prefill_chunk)
    self.chunk_in = {n: new(1, n, *row, dtype=kind) for n in self.chunks}
    self.rows_in = {b: new(b, 1, *row, dtype=kind) for b in self.buckets}
    pos = lambda name: UOp.variable(name, 0, max_context - 1)
    slot = lambda name: UOp.variable(name, 0, slots - 1)
    self.v_prefill = {n: (slot("slot"), pos("start_pos"), UOp.variable("last_index", 0, n - 1)) for n in self.chunks}
    self.v_rows = {b: [(slot(f"slot{i}"), pos(f"pos{i}")) for i in range(b)] for b in self.buckets}
    self.prefill_jits = {n: Jit(self._prefill) for n in self.chunks}
    self.decode_jits = {b: Jit(self._decode) for b in self.buckets}
    if llama.is_last:
      self.sampler = Sampler(slots + 1, llama.config.vocab_size, device)  # the last row: scratch for a bucket's padding
      self.masks = {b: new(b, words(llama.config.vocab_size)) for b in self.buckets}
      self.no_mask = {b: new(b, words(llama.config.vocab_size), fill=-1) for b in self.buckets}
      self.v_sample = {b: [UOp.variable(f"row{i}", 0, slots) for i in range(b)] for b in self.buckets}  # sampler rows: slots and scratch
      self.greedy_jits = {b: Jit(greedy) for b in self.buckets}
      self.sample_jits = {b: Jit(self._sample) for b in self.buckets}              # rows of sequences without top-k
      self.top_k_sample_jits = {b: Jit(self._top_k_sample) for b in self.buckets}  # and with: its search costs 0.4 ms

  @property
  def config(self) -> LlamaConfig: return self.llama.config

  @property
  def slots(self) -> int: return len(self.cache.slots)

  def jits(self) -> dict[str, Jit]:
    """Every captured graph by name (tg_llama/jit_cache.py saves and loads them)."""
    out = {"prefill": self.prefill_jits[self.prefill_chunk], **{f"decode{b}": self.decode_jits[b] for b in self.buckets}}
    if len(self.chunks) > 1: out["prefill_half"] = self.prefill_jits[self.chunks[0]]
    if self.llama.is_last:
      for b in self.buckets:
        out.update({f"greedy{b}": self.greedy_jits[b], f"sample{b}": self.sample_jits[b], f"top_k_sample{b}": self.top_k_sample_jits[b]})
    return out

  def state(self) -> dict:
    """Every object whose tensors outlive a call: weights, KV cache and RoPE tables, the sampler's state."""
    return {"llama": self.llama, "cache": self.cache.layers, **({"sampler": self.sampler} if self.llama.is_last else {})}

  def _prefill(self, x: Tensor, slot: UOp, start: UOp, last_index: UOp) -> Tensor:
    # a model split over devices takes its input on every device and gives its output back on this one
    return self._output(self.llama(self._input(x), self.cache, [(slot, start)], last_index=last_index))

  def _decode(self, x: Tensor, *rows: UOp) -> Tensor:
    return self._output(self.llama(self._input(x), self.cache, list(zip(rows[0::2], rows[1::2]))))

  def _input(self, x: Tensor) -> Tensor: return place_input(x if self.llama.is_first else x.cast(self.dtype), self.devices)
  def _output(self, out: Tensor) -> Tensor: return (out if self.llama.is_last else out.float()).to(self.device).realize()

  def _sample(self, logits: Tensor, mask: Tensor, *slots: UOp) -> Tensor: return self.sampler(mask_logits(logits, mask), slots, top_k=False)
  def _top_k_sample(self, logits: Tensor, mask: Tensor, *slots: UOp) -> Tensor: return self.sampler(mask_logits(logits, mask), slots)

  def prefill(self, slot: int, tokens: Sequence[int], start: int) -> Tensor:
    """Write `tokens` into `slot` from position `start` (the slot holds the keys and values of every position before);
    the logits (1, vocab) after the last one."""
    logits = None
    for pos in range(0, len(tokens), self.prefill_chunk):
      logits = self.run_chunk(slot, np.array(tokens[pos:pos + self.prefill_chunk], dtype=np.int32), start + pos)
    assert logits is not None, "nothing to prefill"
    return logits

  def run_chunk(self, slot: int, x: np.ndarray, start: int) -> Tensor:
    """One prefill chunk at positions start..start+n-1 of `slot`: x is n <= prefill_chunk token ids, or after the first
    shard their hidden states (n, dim), run in the smallest chunk that holds them. The last shard gives the logits
    (1, vocab) after the last one, the others the hidden states (1, chunk, dim), of which rows n.. are padding."""
    n = len(x)
    size = next(c for c in self.chunks if c >= n)
    padded = np.zeros(self.chunk_in[size].shape, dtype=x.dtype)
    padded[0, :n] = x
    s, p, last = self.v_prefill[size]
    return self.prefill_jits[size](write(self.chunk_in[size], padded), s.bind(slot), p.bind(start), last.bind(n - 1))

  def bucket(self, n: int, ready: bool = False) -> int:
    """The batch size a step of n rows runs at: the smallest that holds them, or with `ready` the smallest of those whose
    graph is ready (captured, or loaded from the cache) where there is one."""
    fits = [b for b in self.buckets if b >= n]
    if not ready: return fits[0]
    ready_ones = self.ready_buckets()
    return next((b for b in fits if b in ready_ones), fits[0])

  def ready_buckets(self) -> list[int]:
    """The batch sizes whose decode graph is ready: captured, or loaded from the cache."""
    return [b for b in self.buckets if self.decode_jits[b].captured is not None]

  def step_rows(self, generating: int) -> int:
    """The most rows a step takes when `generating` of them are generating sequences' (a prompt's rows fill the rest): the
    largest bucket whose graph is ready (captured, or loaded from the cache), or the one those rows need, whichever is
    larger. So a prompt's rows never capture a graph that generating does not need: from nothing cached, a 7-token prompt
    captured a step of 8 rows before its first token, 14.5 s on the AMD EPYC (2 cores, compiled kernels cached; each row's
    attention is a kernel of its own) against 4.8 s for the step of 1 row that its tokens need next. Warm, rows one a step
    cost a little more there: a 16-token prompt's first token 0.07-0.08 -> 0.10-0.11 s (16 steps of 1 row against 2 of
    8). With `rows_capture` (a chat's: its warm-up has the time), every bucket's rows."""
    if self.rows_capture: return self.buckets[-1]
    return max([self.bucket(max(generating, 1)), *self.ready_buckets()])

  def decode(self, rows: Sequence[tuple[int, int, int]], pad_to_ready: bool = False) -> Tensor:
    """One step for each (slot, position, token) row: the token goes into its slot at that position; logits (bucket, vocab),
    a row per input row first, then the padding's. `pad_to_ready`: in a larger step whose graph is ready rather than a
    new graph of its own (bucket), for rows that run once, a prompt's last tokens: a chat warmed up with steps of 1 and 8
    rows ran a later turn's last 2 rows as a new graph of 2 rows, 11 s on 2 cores, mid-conversation (a step of 8 rows
    costs 50 ms, of 2 rows 20 ms)."""
    return self.run_rows([(s, p) for s, p, _ in rows], np.array([[t] for _, _, t in rows], dtype=np.int32), self.bucket(len(rows), pad_to_ready))

  def run_rows(self, rows: Sequence[tuple[int, int]], x: np.ndarray, b: int | None = None) -> Tensor:
    """One step of rows: row i writes x[i] (a token id (1,), or after the first shard its hidden states (1, dim)) into
    slot rows[i][0] at position rows[i][1]. The output has a row per input row first, then the padding's (to `b` rows, by
    default the bucket): logits (b, vocab) on the last shard, else hidden states (b, 1, dim)."""
    b = self.bucket(len(rows)) if b is None else b
    rows, x = list(rows) + [rows[0]] * (b - len(rows)), np.concatenate([x] + [x[:1]] * (b - len(x)))
    args = [v.bind(a) for (vs, vp), (s, p) in zip(self.v_rows[b], rows) for v, a in ((vs, s), (vp, p))]
    return self.decode_jits[b](write(self.rows_in[b], x), *args)

  def sample(self, logits: Tensor, slots: Sequence[int | None], greedy_only: bool, mask: np.ndarray | None = None) -> np.ndarray:
    """Token ids (n,) for the first n = len(slots) rows of `logits` (a bucket's rows): row i samples for the sequence in
    slots[i], or for none when None (its token is meaningless). `mask` (bucket, words(vocab)) int32: the tokens each row
    may take, as tg_llama/constraint.py's matchers write them (None: any)."""
    b = logits.shape[0]
    rows = [self.slots if s is None else s for s in slots] + [self.slots] * (b - len(slots))
    allowed = self.no_mask[b] if mask is None else write(self.masks[b], mask)
    if greedy_only: tok = self.greedy_jits[b](logits, allowed)
    else:
      jits = self.top_k_sample_jits if self.sampler.uses_top_k(rows) else self.sample_jits
      tok = jits[b](logits, allowed, *[v.bind(s) for v, s in zip(self.v_sample[b], rows)])
    return read(tok)[:len(slots), 0]

def devices_of(t: Tensor) -> tuple[str, ...]: return t.device if isinstance(t.device, tuple) else (t.device,)

def greedy(logits: Tensor, mask: Tensor) -> Tensor: return mask_logits(logits, mask).argmax(-1, keepdim=True).cast(dtypes.int32).realize()
