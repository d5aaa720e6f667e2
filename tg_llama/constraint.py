"""Constrained decoding: a JSON schema, a grammar, a regular expression or a choice of strings, compiled into a grammar
whose matcher gives, at each step, the bitmask of the tokens allowed next (the engine sets the others' logits to -inf
on the device, tg_llama/engine/runner.py) and advances with the token sampled.

The grammar side is llguidance (the Rust library behind Guidance; no torch, a lazy Earley parser over the token bytes):
measured on the default model's 49,152-token vocabulary, 2 cores of an Intel Xeon, a nested JSON schema compiles in
0.8 ms and a mask takes 3 us (median) to 0.23 ms; outlines-core takes 30 ms to build that schema's index and 0.7 ms a
step, and xgrammar needs torch. End of sequence (the tokenizer's stop tokens) is allowed only where the grammar can
end; a grammar that is complete allows nothing more, and the engine ends the request there.

Grammars are Lark in llguidance's dialect (which embeds JSON schemas as `%json {...}`; a Lark grammar starts at
`start:`), or llama.cpp's GBNF (which starts at `root ::=`). JSON is generated without free whitespace (", " and ": " between items): a small model given
free whitespace may write newlines forever; an object schema that lists its properties allows no others unless it
says so (`closed`). Not here: logit bias, token healing, speculative fast-forward tokens."""
from __future__ import annotations
import json, threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable
import numpy as np
from tg_llama.errors import InvalidArgumentError
if TYPE_CHECKING: from tg_llama.tokenizer import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_BYTES = 1 << 20  # a schema or grammar from a request: bounded before the parser sees it

def words(vocab: int) -> int:
  """int32 words of a bitmask over `vocab` tokens."""
  return (vocab + 31) // 32

@dataclass(frozen=True)
class Grammar:
  """A compiled constraint for one tokenizer: `matcher()` starts a fresh one for each request, a copy of a matcher made
  at compile time (a copy is cheap; building one takes up to a second for a big grammar, which compile() pays once, off
  the server's event loop)."""
  start: Any  # llguidance.LLMatcher at the grammar's start, never advanced

  def matcher(self) -> Matcher: return Matcher(self.start.deep_copy())

class Matcher:
  """One request's place in its grammar."""
  def __init__(self, m):
    self.m = m

  def fill(self, row: np.ndarray):
    """Write the bitmask of the tokens allowed next into `row` (int32, words(vocab)): bit t % 32 of word t // 32."""
    assert row.dtype == np.int32 and row.flags["C_CONTIGUOUS"]
    self.m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

  def consume(self, token: int) -> bool:
    """Advance by the token sampled; False when the grammar does not allow it (then the matcher is in error)."""
    return self.m.consume_token(token)

  @property
  def done(self) -> bool:
    """The grammar is complete and allows no further token."""
    return self.m.is_stopped()

  @property
  def error(self) -> str | None: return self.m.get_error() if self.m.is_error() else None

def compile(tokenizer: Tokenizer, json_schema: dict | str | bool | None = None, grammar: str | None = None, regex: str | None = None,
            choice: list[str] | None = None) -> Grammar:
  """One constraint (exactly one of the arguments) for `tokenizer`. `json_schema` True means any JSON object.
  Raises InvalidArgumentError naming what the compiler refused."""
  import llguidance
  given = [name for name, v in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex), ("choice", choice)) if v is not None]
  if len(given) != 1: raise InvalidArgumentError(f"give exactly one constraint, not {len(given)} ({', '.join(given) or 'none'})")
  if json_schema is not None:
    if json_schema is True: json_schema = {"type": "object"}
    if isinstance(json_schema, str):
      try: json_schema = json.loads(json_schema)
      except json.JSONDecodeError as e: raise InvalidArgumentError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(json_schema, (dict, bool)): raise InvalidArgumentError(f"a JSON schema must be an object, not {type(json_schema).__name__}")
    _check_size(json.dumps(json_schema), "JSON schema")
    try: llg = llguidance.LLMatcher.grammar_from_json_schema(closed(json_schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e: raise InvalidArgumentError(f"the JSON schema is not supported: {e}") from None
  elif grammar is not None:
    _check_str(grammar, "grammar")
    from llguidance.gbnf_to_lark import any_to_lark
    try: lark = any_to_lark(grammar)
    except Exception as e: raise InvalidArgumentError(f"the GBNF grammar does not parse: {_first_line(e)}") from None
    llg = llguidance.LLMatcher.grammar_from_lark(lark)
  elif regex is not None:
    _check_str(regex, "regex")
    llg = llguidance.LLMatcher.grammar_from_regex(regex)
  else:
    if not isinstance(choice, list) or not choice or not all(isinstance(c, str) and c for c in choice):
      raise InvalidArgumentError(f"a choice must be a list of non-empty strings, not {str(choice)[:60]}")
    _check_size(json.dumps(choice), "choice")
    llg = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
  start = llguidance.LLMatcher(lltokenizer(tokenizer), llg, log_level=0)
  if start.is_error(): raise InvalidArgumentError(f"the {given[0].replace('_', ' ')} is not supported: {_first_line(start.get_error())}")
  return Grammar(start)

def closed(schema):
  """The schema with every object that lists its `properties` and says nothing of others closed to others
  (`additionalProperties: false`), as xgrammar's strict mode and OpenAI's strict schemas do: a small model otherwise
  invents properties. What it generates still validates against the schema as given. Members of `allOf` stay open
  (each would forbid the properties of the others)."""
  if isinstance(schema, list): return [closed(s) for s in schema]
  if not isinstance(schema, dict): return schema
  out = {k: (v if k in ("allOf", "const", "enum", "default", "examples") else closed(v) if k not in ("properties", "$defs", "definitions", "patternProperties") else
             {name: closed(sub) for name, sub in v.items()} if isinstance(v, dict) else v) for k, v in schema.items()}
  if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out: out["additionalProperties"] = False
  return out

def _check_str(s, what: str):
  if not isinstance(s, str) or not s: raise InvalidArgumentError(f"a {what} must be a non-empty string")
  _check_size(s, what)

def _check_size(s: str, what: str):
  if len(s.encode()) > MAX_GRAMMAR_BYTES: raise InvalidArgumentError(f"the {what} is over {MAX_GRAMMAR_BYTES} bytes")

def _first_line(e) -> str: return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

_lock = threading.Lock()

def lltokenizer(tokenizer: Tokenizer):
  """llguidance's view of our tokenizer (the token bytes, special tokens, stop tokens as end of sequence), built once
  per tokenizer (about 0.1 s for 49k tokens)."""
  with _lock:
    if (tok := getattr(tokenizer, "_lltokenizer", None)) is None:
      tok = tokenizer._lltokenizer = _build(tokenizer)
    return tok

def _build(tokenizer: Tokenizer):
  import llguidance
  if not tokenizer.stop_ids: raise InvalidArgumentError("constrained decoding needs a tokenizer with an end-of-sequence token")
  class View:  # what llguidance.TokenizerWrapper reads
    eos_token_id, bos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.stop_ids), tokenizer.bos_id
    tokens = tokenizer.pieces
    special_token_ids = sorted({*tokenizer.special_tokens.values(), *tokenizer.added_tokens.values()})
    def __call__(self, s: str | bytes) -> list[int]: return encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)
  encode = _encode_inside(tokenizer)
  return llguidance.LLTokenizer(llguidance.TokenizerWrapper(View()), eos_token=sorted(tokenizer.stop_ids))

def _encode_inside(tokenizer: Tokenizer) -> Callable[[str], list[int]]:
  """How llguidance must tokenize text: as the middle of an answer (the bytes a grammar forces), so without
  sentencepiece's dummy prefix, which puts a space in front ('[' as ' ', '['; llguidance sets its own tokenizers'
  Metaspace prepend_scheme to never). As its llama.cpp wrapper does (python_ext/src/llamatokenizer.rs at c75b0d9): put
  a sentinel in front, a control character that is a token no other token extends (nor a space and it), so that it
  merges with nothing, and drop the sentinel's tokens."""
  if not tokenizer.strip_prefix_space: return tokenizer.encode
  pieces = set(tokenizer.pieces)
  extended = {p[:n] for p in pieces for n in (1, 2) if len(p) > n}  # the first 1 and 2 bytes of each longer token
  sentinel = next((chr(b) for b in range(1, 32) if bytes([b]) in pieces - extended and b" " + bytes([b]) not in pieces | extended), None)
  if sentinel is None: raise InvalidArgumentError("constrained decoding needs a sentencepiece vocabulary with a byte token of a control character (1-31)")
  head = tokenizer.encode(sentinel)
  return lambda text: tokenizer.encode(sentinel + text)[len(head):]
