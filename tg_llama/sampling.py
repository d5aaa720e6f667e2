"""Token sampling on the device, written so that a TinyJit-captured decode step can include it.

The order of the steps and their meaning follow transformers' generate (v5.23 `_get_logits_processor`): repetition penalty,
then temperature, top-k, top-p, min-p, each filter seeing the survivors of the one before. Greedy (temperature 0) is the
argmax of the penalized logits. The draw is an exponential race (Gumbel-max in another form): argmax(p / -log(u)).

Nothing is sorted (tinygrad's bitonic sort builds a (V, V) mask for the indices): top-k and top-p find their cut-off by
a search over the 32 bits of the float32 values (`_order_key`, `_largest`), so the cut-off is exact and the graph has a
fixed shape. Every knob is a Tensor (`pack`), so one captured
graph serves any settings and a batch may mix them; only the batch size and the vocabulary size are baked in.

Non-goals: typical/epsilon/eta sampling, logit bias, and HF's `min_tokens_to_keep`
(always 1 here). Where several tokens tie at the top-p cut-off, we keep all of them, where HF keeps the ones that
torch.sort happens to put last."""
from __future__ import annotations
import math, numbers, secrets
from dataclasses import dataclass
from typing import Sequence
import numpy as np
from tinygrad import Tensor, dtypes
from tg_llama.backend import kernel_layout
from tg_llama.errors import InvalidArgumentError
from tg_llama.linear import lanes
from tg_llama.transfer import full, read, to_device, write

@dataclass(frozen=True)
class SamplingParams:
  temperature: float = 0.0         # 0 means greedy; the other knobs then only matter through the repetition penalty
  top_k: int = 0                   # 0 means off
  top_p: float = 1.0               # 1 means off
  min_p: float = 0.0               # 0 means off
  repetition_penalty: float = 1.0  # 1 means off
  presence_penalty: float = 0.0    # OpenAI's: subtracted from the logit of every token generated so far; 0 means off
  frequency_penalty: float = 0.0   # OpenAI's: subtracted once per time the token was generated so far; 0 means off
  seed: int|None = None            # None means a fresh random seed at each Sampler.reset
  def __post_init__(self):
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
      if isinstance(v := getattr(self, name), bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise InvalidArgumentError(f"{name} must be a finite number, but is {v!r}")
    if not self.temperature >= 0: raise InvalidArgumentError(f"temperature must be >= 0, but is {self.temperature}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise InvalidArgumentError(f"top_k must be an int >= 0, but is {self.top_k!r}")
    if not 0 < self.top_p <= 1: raise InvalidArgumentError(f"top_p must be in (0, 1], but is {self.top_p}")
    if not 0 <= self.min_p < 1: raise InvalidArgumentError(f"min_p must be in [0, 1), but is {self.min_p}")
    if not self.repetition_penalty > 0: raise InvalidArgumentError(f"repetition_penalty must be > 0, but is {self.repetition_penalty}")
    if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**64):
      raise InvalidArgumentError(f"seed must be None or an int in [0, 2**64), but is {self.seed!r}")
    for name in ("presence_penalty", "frequency_penalty"):
      if not -2 <= getattr(self, name) <= 2: raise InvalidArgumentError(f"{name} must be in [-2, 2], but is {getattr(self, name)}")

  @property
  def is_greedy(self) -> bool:
    """The argmax of the raw logits: no temperature and no penalty."""
    return self.temperature == 0 and self.repetition_penalty == 1 and self.presence_penalty == 0 and self.frequency_penalty == 0

# the columns of the knobs tensor, in order
KNOBS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")

def pack(params: Sequence[SamplingParams], device: str|None = None) -> Tensor:
  """One row of knobs per sequence: (B, len(KNOBS)) float32. top_k stays exact as a float up to 2**24."""
  return to_device(knob_rows(params), device)

def knob_rows(params: Sequence[SamplingParams]) -> np.ndarray: return np.array([[float(getattr(p, k)) for k in KNOBS] for p in params], np.float32)

def _knob(knobs: Tensor, name: str) -> Tensor: return knobs[:, KNOBS.index(name)].unsqueeze(1)  # (B, 1)

def mark_seen(seen: Tensor, tokens: Tensor) -> Tensor:
  """seen (B, V) bool with tokens (B, 1) int marked; the caller assigns it back."""
  return seen | Tensor.arange(seen.shape[1]).reshape(1, -1).eq(tokens)

def apply_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
  """HF's RepetitionPenaltyLogitsProcessor on the tokens marked in seen (B, V); penalty (B, 1)."""
  return seen.where((logits < 0).where(logits * penalty, logits / penalty), logits)

def _order_key(x: Tensor) -> Tensor:
  # uint32 whose integer order is the float order: flip every bit of negatives, set the sign bit of positives.
  # -0.0 is made +0.0 first, so that equal floats get equal keys
  b = x.eq(0).where(0.0, x).bitcast(dtypes.uint32)
  return (b >> 31).eq(1).where(b ^ 0xffffffff, b | 0x80000000)

def _largest(pred, rows: int, device, bits: int = 2) -> Tensor:
  # the largest uint32 t (rows, 1) with pred(t), found `bits` bits at a time from the top. pred maps candidates (rows, C)
  # to bools and must be monotone (true up to t, false above), so the count of true candidates is the next digit.
  # 2 bits (3 candidates a pass, 16 passes) measured fastest on CPU at V=49152: 1 bit needs twice the kernels, 4 bits
  # ties at B=1 and is 2x slower at B=8
  t = Tensor.zeros(rows, 1, dtype=dtypes.uint32, device=device)
  digits = Tensor.arange(1, 2**bits, dtype=dtypes.uint32).reshape(1, -1)
  for shift in range(32-bits, -1, -bits):
    # the candidates in a kernel of their own: the passes' sums over the vocabulary, alike but for the pass's shift, are then
    # one kernel to compile instead of 16 (a cold start compiled a step's sampling graph of 8 rows 5.1 -> 3.4 s, AMD EPYC)
    t = t | (pred((t | (digits << shift)).contiguous()).cast(dtypes.uint32).sum(1, keepdim=True) << shift)
  return t

def apply_openai_penalties(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
  """OpenAI's presence and frequency penalties (as vLLM applies them, after the repetition penalty): counts (B, V) is how
  often each token was generated so far; presence and frequency (B, 1)."""
  return logits - (counts > 0).where(presence, 0.0) - counts.float() * frequency

def filter_logits(logits: Tensor, knobs: Tensor, seen: Tensor|None = None, counts: Tensor|None = None, top_k: bool = True) -> Tensor:
  """Penalized logits (B, V) divided by the temperature, with the tokens that top-k, top-p and min-p remove set to -inf.
  Rows with temperature 0 are divided by 1 instead (sample() takes the argmax for them). The largest logit always stays.
  top_k=False leaves out the top-k search, for rows whose top_k knob is 0 (it would keep every token)."""
  x, keep, _ = _filter(logits, knobs, seen, counts, top_k)
  return keep.where(x, -float("inf"))

def _filter(logits: Tensor, knobs: Tensor, seen: Tensor|None, counts: Tensor|None, top_k: bool) -> tuple[Tensor, Tensor, Tensor]:
  """filter_logits' x (penalized, over the temperature), keep (the survivors) and e = exp(x - max x)."""
  B, V = logits.shape
  x = logits.float() if seen is None else apply_penalty(logits.float(), seen, _knob(knobs, "repetition_penalty"))
  if counts is not None: x = apply_openai_penalties(x, counts, _knob(knobs, "presence_penalty"), _knob(knobs, "frequency_penalty"))
  temp = _knob(knobs, "temperature")
  x = (x / temp.eq(0).where(1.0, temp)).contiguous()
  key = _order_key(x).contiguous()
  # each search's sums over the vocabulary: (B, V) as rows of W lanes against the candidates (B, 1, C, 1), the W partial sums
  # of each candidate summed last. On the CPU (W > 1) they are independent vector accumulators over contiguous lanes (opts.py's
  # "batch sums"); tinygrad's own split of a (B, V, C) sum made partial sums of 192 contiguous tokens, their vectors built
  # across pieces of memory: 45 -> 28 us a pass for one row, 293 -> 133 us for 8 (on one core, AMD EPYC)
  W = lanes(V, 1, kernel_layout(x.device).matvec_lanes)
  as_lanes = lambda t: t.reshape(B, V // W, 1, W)
  total = (lambda t: t.sum(1).contiguous().sum(-1)) if W > 1 else (lambda t: t.sum((1, 3)))
  candidates = lambda t: t.reshape(B, 1, -1, 1)
  # top-k: the k-th largest key is the largest t with at least k keys >= t. Like HF, this keeps every tie of the k-th
  if top_k:
    k = _knob(knobs, "top_k").minimum(V).cast(dtypes.int32)
    k = k.eq(0).where(V, k)
    keep = key >= _largest(lambda t: total(as_lanes(key) >= candidates(t)) >= k, B, x.device)
  else: keep = Tensor.full((B, V), True, device=x.device)
  # top-p: HF sorts ascending and drops the tokens whose cumulative probability is <= 1-top_p, so we drop the keys <= the
  # largest t with mass(keys <= t) <= 1-top_p, in the distribution renormalized over the top-k survivors
  e = (x - x.max(1, keepdim=True)).exp().contiguous()  # once: an exp costs 4-5 ns a token on the CPU
  p = as_lanes((keep.where(e, 0.0) / keep.where(e, 0.0).sum(1, keepdim=True)).contiguous())
  # top_p == 1 is off, as in HF (which then skips the warper): 1-top_p = 0 would still drop the tokens whose p underflows
  top_p = _knob(knobs, "top_p")
  low = (top_p >= 1).where(-1.0, 1 - top_p)
  cut = _largest(lambda t: total((as_lanes(key) <= candidates(t)).where(p, 0.0)) <= low, B, x.device)
  # min-p: p >= min_p * max(p) is e >= min_p, whatever the renormalization. e == 1 keeps the largest (HF keeps one)
  keep = keep & ((key > cut) | e.eq(1)) & (e >= _knob(knobs, "min_p"))
  return x, keep, e

def mask_logits(logits: Tensor, mask: Tensor) -> Tensor:
  """logits (B, V) with the tokens a constraint forbids set to -inf: mask (B, ceil(V/32)) int32, bit t % 32 of word t // 32
  set for each allowed token t (llguidance's layout, tg_llama/constraint.py); a row of -1 allows everything."""
  bits = (mask.bitcast(dtypes.uint32).unsqueeze(-1) >> Tensor.arange(32, dtype=dtypes.uint32).to(mask.device)) & 1
  return bits.reshape(mask.shape[0], -1)[:, :logits.shape[1]].eq(1).where(logits, -float("inf"))

def candidate_mask(logits: Tensor, knobs: Tensor, seen: Tensor|None = None, top_k: bool = True) -> Tensor:
  """Which tokens (B, V) bool survive the filters."""
  return filter_logits(logits, knobs, seen, top_k=top_k) > -float("inf")

def uniform(key: Tensor, counter: Tensor, n: int) -> Tensor:
  """(B, n) floats in (0, 1) from threefry2x32, keyed per row by key (B, 1) uint64 at step counter (B, 1) uint32."""
  half = (n + 1) // 2
  x = (counter.cast(dtypes.uint64) << 32) | Tensor.arange(half, dtype=dtypes.uint64).reshape(1, -1)
  bits = x.threefry(key)
  bits = bits.cast(dtypes.uint32).cat((bits >> 32).cast(dtypes.uint32), dim=1)[:, :n]
  # the top 23 bits, centred in their bucket: never 0 or 1, so -log(u) is always positive and finite
  return ((bits >> 9).cast(dtypes.float32) + 0.5) * (2.0 ** -23)

def sample(logits: Tensor, knobs: Tensor, key: Tensor, counter: Tensor, seen: Tensor|None = None, counts: Tensor|None = None,
           top_k: bool = True) -> Tensor:
  """Token ids (B, 1) int32 from logits (B, V), knobs (B, len(KNOBS)) from pack(), rng key (B, 1) uint64 and step
  counter (B, 1) uint32, and optionally the (B, V) bool mask of the tokens the repetition penalty applies to.
  Pure and lazy: the same key and counter give the same draw, so advance the counter between steps (Sampler does).
  top_k=False: no row uses top-k (see filter_logits)."""
  x, keep, e = _filter(logits, knobs, seen, counts, top_k)
  # an exponential race: token i with probability e_i / sum(e) is the argmax of e_i / E_i, E_i = -log(u_i) ~ Exp(1) (Gumbel-max,
  # argmax x_i - log(E_i), without its second log and its exp). Temperature 0: the argmax of x, the largest logit surviving
  # every filter (first index of ties)
  race = keep.where(e, 0.0) / -uniform(key, counter, x.shape[1]).log()
  return _knob(knobs, "temperature").eq(0).where(keep.where(x, -float("inf")), race).argmax(1, keepdim=True).cast(dtypes.int32)

class Sampler:
  """The device state for sampling up to S sequences (slots) over a vocabulary of V: knobs, the seen mask, the rng key
  and counter, a row per slot. A batch's rows may be any of the slots, in any order (`slots`, ints or bound
  variables): a captured graph serves every assignment of sequences to slots.
  Calling it inside a TinyJit is fine: the state lives in fixed buffers that reset() overwrites in place."""
  def __init__(self, slots: int, vocab: int, device: str|None = None):
    if slots < 1 or vocab < 1: raise InvalidArgumentError(f"slots and vocab must be >= 1, but are {slots} and {vocab}")
    self.slots, self.vocab = slots, vocab
    self.knobs = pack([SamplingParams()] * slots, device)
    self.seen = full((slots, vocab), 0, dtypes.bool, device)
    self.counts = full((slots, vocab), 0, dtypes.int32, device)  # generated tokens
    self.key = full((slots, 1), 0, dtypes.uint64, device)
    self.counter = full((slots, 1), 0, dtypes.uint32, device)
    self.top_k_slots: set[int] = set()  # the slots whose sequence uses top-k, known on the host

  def uses_top_k(self, slots: Sequence[int]) -> bool: return not self.top_k_slots.isdisjoint(slots)

  def reset(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]]|None = None, slots: Sequence[int]|None = None) -> None:
    """Start new sequences in `slots` (default: the first len(params)): one SamplingParams each (the same seed draws the
    same numbers), and each one's prompt token ids, which the repetition penalty counts as seen."""
    slots = list(range(len(params)) if slots is None else slots)
    if len(params) != len(slots) or not all(0 <= s < self.slots for s in slots):
      raise InvalidArgumentError(f"need one SamplingParams per slot in [0, {self.slots}), but got {len(params)} for slots {slots}")
    if prompts is not None and len(prompts) != len(slots): raise InvalidArgumentError(f"need {len(slots)} prompts, but got {len(prompts)}")
    state = (self.seen, self.knobs, self.key, self.counter, self.counts)
    seen, knobs, keys, counter, counts = (read(t) for t in state)  # and written back below, without a kernel (a new request's ttft)
    for row, (slot, p) in enumerate(zip(slots, params)):
      ids = list(prompts[row]) if prompts is not None else []
      if len(bad := [i for i in ids if not 0 <= i < self.vocab]): raise InvalidArgumentError(f"prompt {row} has token ids {bad[:5]} outside [0, {self.vocab})")
      seen[slot] = False
      seen[slot, ids] = True
      knobs[slot] = knob_rows([p])[0]
      keys[slot], counter[slot] = secrets.randbits(64) if p.seed is None else p.seed, 0
      if p.top_k: self.top_k_slots.add(slot)
      else: self.top_k_slots.discard(slot)
    counts[slots] = 0
    for t, a in zip(state, (seen, knobs, keys, counter, counts)): write(t, a)

  def __call__(self, logits: Tensor, slots: Sequence|None = None, top_k: bool = True) -> Tensor:
    """Draws the next tokens (B, 1) int32 from logits (B, V), row b for the sequence in slots[b] (default: row b's
    own slot), marks them seen and advances that slot's rng. Realizes, so call it last in the step: under a TinyJit,
    the state updates must run inside the captured graph, not after it. No two rows may name the same slot: both would
    read the state before either writes it back, in no set order (unless the slot is a scratch one whose state means
    nothing: tg_llama/engine/runner.py points rows that sample for no sequence at one). top_k=False where no row's
    sequence uses top-k (uses_top_k)."""
    B = logits.shape[0]
    if (slots is None and B > self.slots) or logits.shape[1] != self.vocab or (slots is not None and len(slots) != B):
      raise InvalidArgumentError(f"logits must be (rows, {self.vocab}) with a slot per row (at most {self.slots} rows without slots), "
                                 f"but are {logits.shape} for {'no' if slots is None else len(slots)} slots")
    # rows 0..B-1 being slots 0..B-1, the state is read and written in one piece; else a row at a time
    views = (lambda t: [t[0:B]]) if slots is None else (lambda t: [t[s:s+1] for s in slots])
    rows = lambda t: Tensor.cat(*v) if len(v := views(t)) > 1 else v[0]
    seen, counts, counter = rows(self.seen), rows(self.counts), rows(self.counter)
    # realized before the state is written: else the writes may run first, and the token be drawn again from the new state
    tok = sample(logits, rows(self.knobs), rows(self.key), counter, seen, counts, top_k).realize()
    updates = ((self.seen, mark_seen(seen, tok)), (self.counts, counts + Tensor.arange(self.vocab).reshape(1, -1).eq(tok)), (self.counter, counter + 1))
    width = B if slots is None else 1
    Tensor.realize(*[v.assign(new[i * width:(i + 1) * width]) for state, new in updates for i, v in enumerate(views(state))])
    return tok
