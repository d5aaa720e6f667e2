"""Stop strings over streamed text (tg_llama/serve/text.py), with the default model's real tokenizer."""
import pytest
from tg_llama.serve.text import TextStream
from tg_llama.tokenizer import load_tokenizer

@pytest.fixture(scope="module")
def tok(smollm2_gguf): return load_tokenizer(smollm2_gguf)

def run(tok, text: str, stops: tuple[str, ...]) -> tuple[list[str], bool]:
  ts = TextStream(tok, stops)
  pieces = [ts.add(t) for t in tok.encode(text)]
  return pieces + [ts.finish()], ts.stopped

def test_no_stops_is_the_text(tok):
  text = "Hello, wörld! 日本語 and emoji 🙂 too."
  pieces, stopped = run(tok, text, ())
  assert "".join(pieces) == text and not stopped

@pytest.mark.parametrize("stop", ["lo, wö", "ld! 日", "本語 and", "🙂", " too."])
def test_stop_across_tokens_is_never_emitted(tok, stop):
  text = "Hello, wörld! 日本語 and emoji 🙂 too. After the stop."
  pieces, stopped = run(tok, text, (stop,))
  assert stopped and "".join(pieces) == text[:text.index(stop)]
  assert len(tok.encode(stop)) > 1 or stop == "🙂"  # the interesting cases span tokens

def test_partial_match_is_held_then_released(tok):
  ts = TextStream(tok, ("Paris, France",))
  out = "".join(ts.add(t) for t in tok.encode("I love Paris"))
  assert out == "I love " and ts.held == "Paris"  # could still become the stop string
  assert out + ts.finish() == "I love Paris" and not ts.stopped

def test_the_earliest_stop_wins(tok):
  pieces, _ = run(tok, "one two three four", ("four", "two", "three"))
  assert "".join(pieces) == "one "
