"""Token ids in, text out, for a response: never half a UTF-8 character, and never any part of a `stop` string.

A stop string may span several tokens, so the tail of the text that could be the start of one is held back until the
next token settles it; the text up to the first complete stop string is released, the rest dropped.

Not here: stop token ids (the engine ends a request on those), regular expressions."""
from __future__ import annotations
from tg_llama.tokenizer import Tokenizer

class TextStream:
  def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = ()):
    self.decoder, self.stops = tokenizer.stream(), stops
    self.held = ""        # decoded, not yet released: it may begin a stop string
    self.stopped = False  # a stop string was found: nothing more comes out

  def add(self, token: int) -> str:
    """The text that is certain after this token ("" while held back)."""
    return "" if self.stopped else self._release(self.decoder.add(token), final=False)

  def finish(self) -> str:
    """The rest, at the end of the generation (a partial match that never completed is text after all)."""
    return "" if self.stopped else self._release(self.decoder.flush(), final=True)

  def _release(self, text: str, final: bool) -> str:
    self.held += text
    if hits := [i for s in self.stops if (i := self.held.find(s)) >= 0]:
      out, self.held, self.stopped = self.held[:min(hits)], "", True
      return out
    keep = 0 if final else next((k for k in range(min(len(self.held), max(map(len, self.stops), default=1) - 1), 0, -1)
                                 if any(s.startswith(self.held[-k:]) for s in self.stops)), 0)
    out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
    return out
