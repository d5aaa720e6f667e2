"""Prefill and decode under TinyJit, over one model's KV cache.

One captured graph serves every position: the start position is a symbolic variable bound per call.
Prefill runs in fixed-size chunks of `prefill_chunk` tokens, the last one padded: fixed shapes compile to
kernels about 3x faster than a symbolic chunk length on the CPU, and the padding's keys and values land in
slack slots past the context (or are overwritten later) where no real query ever looks. Decode feeds the
sampled token (still on the device) straight back in. Generation is a plain generator of
token ids; text streaming lives with the tokenizer, sampling in tg_llama/sampling.py.

Not here: batching several requests (batch is 1), speculative decoding."""
from __future__ import annotations
from typing import Callable, Iterator
import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.dtype import DType
from tg_llama.cpu_graph import Jit
from tg_llama.errors import ContextLengthError
from tg_llama.model import Llama
from tg_llama.parallel import place_input, shard_model

class Generator:
  def __init__(self, model: Llama, device: str, dtype: DType, max_context: int, prefill_chunk: int = 64,
               devices: tuple[str, ...] = ()):
    if not (model.is_first and model.is_last): raise ValueError("Generator runs a whole model; chain layer shards by hand")
    self.model, self.device, self.max_context = model, device, max_context
    self.prefill_chunk = min(prefill_chunk, max_context)
    model.setup_cache(1, max_context + self.prefill_chunk, dtype, device)  # slack for the last chunk's padding
    if len(devices) > 1: shard_model(model, devices)  # after setup_cache: the new cache is split too
    self.devices = devices
    self.v_pos = UOp.variable("start_pos", 0, max_context - 1)
    self.v_last = UOp.variable("last_index", 0, self.prefill_chunk - 1)
    self.prefill_jit = Jit(self._forward)
    self.decode_jit = Jit(self._forward)
    self.cached: list[int] = []  # the tokens whose keys and values are in the cache, in order

  def _forward(self, tokens: Tensor, start_pos: UOp, last_index: UOp | None = None) -> Tensor:
    # a model split over devices takes its input on every device and gives logits back on this one
    return self.model(place_input(tokens, self.devices), start_pos, last_index=last_index).to(self.device).realize()

  def _check_fits(self, n: int):
    if n > self.max_context:
      raise ContextLengthError(f"{n} tokens do not fit in the context of {self.max_context} tokens")

  def prefill(self, tokens: list[int]) -> Tensor:
    """Run the prompt through the model (reusing the cached common prefix); the last position's logits (1, vocab)."""
    if not tokens: raise ValueError("an empty prompt: give at least one token")
    self._check_fits(len(tokens))
    # keep what the cache already holds for a common prefix; always recompute at least the last token
    start = 0
    while start < min(len(self.cached), len(tokens) - 1) and self.cached[start] == tokens[start]: start += 1
    logits = None
    for pos in range(start, len(tokens), self.prefill_chunk):
      chunk = tokens[pos:pos + self.prefill_chunk]
      padded = Tensor(np.array([chunk + [0] * (self.prefill_chunk - len(chunk))], dtype=np.int32), device=self.device).realize()
      logits = self.prefill_jit(padded, self.v_pos.bind(pos), self.v_last.bind(len(chunk) - 1))
    self.cached = list(tokens)
    return logits

  def decode(self, token: Tensor, token_id: int) -> Tensor:
    """One step at the next position: `token` is `token_id` as a (1, 1) int32 tensor, already on the device
    when it was sampled there; logits (1, vocab)."""
    self._check_fits(len(self.cached) + 1)
    logits = self.decode_jit(token, self.v_pos.bind(len(self.cached)))
    self.cached.append(token_id)
    return logits

  def generate(self, tokens: list[int], max_new_tokens: int, sample: Callable[[Tensor], Tensor],
               stop_ids: frozenset[int] = frozenset()) -> Iterator[int]:
    """Yield up to max_new_tokens token ids after `tokens`, stopping after a stop id."""
    self._check_fits(len(tokens) + max_new_tokens - 1)
    if max_new_tokens <= 0: return
    logits = self.prefill(tokens)
    for i in range(max_new_tokens):
      token = sample(logits)                   # (1, 1) int32, on the device
      token_id = int(token.item())
      yield token_id
      if token_id in stop_ids or i == max_new_tokens - 1: return
      logits = self.decode(token, token_id)

def greedy(logits: Tensor) -> Tensor: return logits.argmax(-1, keepdim=True).cast(dtypes.int32).realize()
