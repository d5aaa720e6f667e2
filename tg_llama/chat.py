"""A multi-turn chat in the terminal: the model's own template, streaming, history kept inside the context.

Reads lines from stdin (a terminal or a pipe). `/reset` clears the history, `/exit` (or end of input) quits,
Ctrl-C stops the current answer and returns to the prompt.

Not here: multi-line input editing, saving conversations, tool calls."""
from __future__ import annotations
import sys, time
from typing import Callable, TextIO
from tg_llama.api import Model
from tg_llama.chat_template import encode_chat
from tg_llama.errors import ContextLengthError
from tg_llama.sampling import SamplingParams

class ChatSession:
  """The conversation so far, and how to fit it into the model's context for the next answer."""
  def __init__(self, model: Model, system: str | None = None, sampling: SamplingParams | None = None, max_new_tokens: int = 512):
    self.model, self.system, self.sampling, self.max_new_tokens = model, system, sampling or SamplingParams(), max_new_tokens
    self.turns: list[dict] = []  # user and assistant messages, in order, without the system prompt

  def reset(self): self.turns = []

  def _prompt(self, turns: list[dict]) -> list[int]:
    messages = ([{"role": "system", "content": self.system}] if self.system else []) + turns
    return encode_chat(self.model.tokenizer, messages)

  def fit(self) -> tuple[list[int], int]:
    """The prompt ids and how many old turns were dropped so that it plus a reply fits in the context."""
    reply_room = min(self.max_new_tokens, self.model.max_context // 2)
    dropped = 0
    while True:
      ids = self._prompt(self.turns)
      if len(ids) + reply_room <= self.model.max_context: return ids, dropped
      if len(self.turns) <= 1:
        raise ContextLengthError(f"the message is {len(ids)} tokens; with room for a reply ({reply_room}) it does not fit "
                                 f"in the context of {self.model.max_context} tokens")
      self.turns = self.turns[2:]  # the oldest user message and its answer
      dropped += 2

  def reply(self, user_text: str, out: TextIO) -> tuple[int, float]:
    """Stream the answer to `out`; returns (tokens generated, seconds). Ctrl-C keeps what was said so far."""
    self.turns.append({"role": "user", "content": user_text})
    try: ids, dropped = self.fit()
    except (ContextLengthError, KeyboardInterrupt):  # no answer: the question goes too
      self.turns.pop()
      raise
    if dropped: print(f"[dropped the {dropped} oldest messages to stay inside the context of {self.model.max_context} tokens]", file=sys.stderr)
    budget = min(self.max_new_tokens, self.model.max_context - len(ids))
    text, n, start = [], 0, time.perf_counter()
    try:
      for chunk in self.model.stream(ids, budget, self.sampling):
        n += 1
        text.append(chunk.text)
        out.write(chunk.text)
        out.flush()
    except KeyboardInterrupt:
      out.write(" [stopped]")
    finally:
      out.write("\n")
      out.flush()
      self.turns.append({"role": "assistant", "content": "".join(text).strip()})
    return n, time.perf_counter() - start

def run_chat(model: Model, session: ChatSession, show_stats: bool = False, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
             ready: Callable[[], None] | None = None) -> int:
  """The chat loop. `ready`, called before each answer: waits for what must run first (tg_llama/cli.py's warm-up, running
  while the first message is typed)."""
  interactive = inp.isatty()
  if interactive: print("Type a message; /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops an answer.", file=sys.stderr)
  while True:
    try:
      if interactive: out.write(">>> ")
      out.flush()
      line = inp.readline()
    except KeyboardInterrupt:
      out.write("\n")
      continue
    if not line: break  # end of input
    line = line.strip()
    if not line: continue
    if line in ("/exit", "/quit"): break
    if line == "/reset":
      session.reset()
      print("[history cleared]", file=sys.stderr)
      continue
    try:
      if ready is not None: ready()
      n, seconds = session.reply(line, out)
    except ContextLengthError as e:
      print(f"error: {e}", file=sys.stderr)
      continue
    except KeyboardInterrupt:  # before the answer began streaming
      out.write(" [stopped]\n")
      continue
    if show_stats and seconds > 0: print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s]", file=sys.stderr)
  if interactive: out.write("\n")
  return 0
