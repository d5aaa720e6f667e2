"""Tokenizer: text <-> token ids for Llama-family models, from a tokenizer.model, a tokenizer.json, a directory
holding them, or a GGUF file's metadata. Byte-level BPE runs on tiktoken; a sentencepiece tokenizer.model on the
optional `sentencepiece` library; a GGUF `llama` (sentencepiece BPE: Llama 1/2, TinyLlama, Mistral) vocabulary on
tg_llama/spm.py, in pure Python. Every piece of text between special tokens gets sentencepiece's dummy prefix, as in
llama.cpp and Meta's Llama 2 chat, and decode drops the one at the start.

Non-goals: WordPiece and Unigram models, normalizers (NFC, lowercasing), the lstrip/rstrip flags of added tokens,
and the rare word where rank-order BPE (tiktoken) and merge-list BPE (HF tokenizers, llama.cpp) part ways: tiktoken
merges any neighbours whose concatenation is a token.

The files are untrusted: a missing key, a value of the wrong type, nesting too deep for Python, or a token id past
the entries the file lists (so no list is sized by a claimed number) is a CheckpointError naming the file and the key.
Not defended against: a tokenizer.json split regex that is slow on some text (tiktoken's regex engine bounds its
backtracking, and a pattern it cannot compile is refused)."""
from __future__ import annotations
import base64, codecs, contextlib, functools, inspect, json, pathlib, re, reprlib
from typing import Callable, Iterable
import tiktoken
from tg_llama.errors import CheckpointError, TgLlamaError, UnsupportedModelError
from tg_llama.spm import SentencePieceBPE

# split patterns, as tiktoken (fancy-regex) reads them
LLAMA3_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp splits with a sequence of regexes (llama-vocab.cpp, llm_tokenizer_bpe); these are single-regex forms of
# its sequences: a piece of an earlier split ends at the next cut point, so whitespace just before one stays whole.
# starcoder/smollm: "\p{N}", then GPT-2's (the same as HF's Digits(individual_digits) + ByteLevel)
DIGITS_PAT = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
# default: "[\p{P}\$\+<=>\^~\|]+", GPT-2's, "\p{N}+", "[0-9][0-9][0-9]" (a run mixing ASCII and other digits differs)
_P = r"\p{P}$+<=>^~|"
DEFAULT_PAT = rf"[{_P}]+| ?\p{{L}}+|[0-9]{{1,3}}|[^\P{{N}}0-9]+| ?[^\s\p{{L}}\p{{N}}{_P}]+|\s+(?![^\s{_P}])|\s+"

# tokenizer.ggml.pre -> (pattern, ignore_merges): llama.cpp looks a whole piece up in the vocab first for llama3 only
GGUF_PRE = {"llama3": (LLAMA3_PAT, True), "llama-v3": (LLAMA3_PAT, True), "llama-bpe": (LLAMA3_PAT, True),
            "smollm": (DIGITS_PAT, False), "starcoder": (DIGITS_PAT, False), "refact": (DIGITS_PAT, False),
            "codeshell": (DIGITS_PAT, False), "gpt2": (GPT2_PAT, False), "mpt": (GPT2_PAT, False),
            "olmo": (GPT2_PAT, False), "default": (DEFAULT_PAT, False)}

# Meta's llama/tokenizer.py (meta-llama3 0.0.1): 256 specials after the 128000 ranks, in this order
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   *(f"<|reserved_special_token_{i}|>" for i in range(5, 251))]
STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>", "<|end|>",
               "<end_of_turn>")
BOS_TOKENS = ("<|begin_of_text|>", "<s>")  # these mean "prepend me": GPT-2's <|endoftext|> as bos does not
EOS_TOKENS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")

# tiktoken's regex engine overflows its stack on very long runs of whitespace (openai/tiktoken#195): cut runs
# longer than this, as Meta's llama3 tokenizer does; only tokens at the cuts can change
_MAX_RUN = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN},}}|\S{{{_MAX_RUN},}}")

def _split_long_runs(text: str) -> list[str]:
  if len(text) <= _MAX_RUN: return [text]
  cuts = [c for m in _LONG_RUN.finditer(text) for c in range(m.start() + _MAX_RUN, m.end(), _MAX_RUN)]
  bounds = [0, *cuts, len(text)]
  return [text[a:b] for a, b in zip(bounds, bounds[1:])]

def _gpt2_bytes() -> dict[str, int]:
  """GPT-2's bytes_to_unicode, inverted: byte-level vocabs spell each byte as one printable character."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  shifted = [b for b in range(256) if b not in keep]
  return {**{chr(b): b for b in keep}, **{chr(256 + n): b for n, b in enumerate(shifted)}}

def _spelled(token: str, u2b: dict[str, int]) -> bytes:
  # a token outside the byte alphabet (some added tokens) is literal text
  try: return bytes(u2b[c] for c in token)
  except KeyError: return token.encode("utf-8")

def _loader(f):
  """A constructor whose every failure on malformed input is a CheckpointError naming the source: the checks in it
  name the key; this catches what they did not foresee."""
  sig = inspect.signature(f)
  @functools.wraps(f)
  def run(*args, **kwargs):
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    with _malformed(bound.arguments.get("src") or bound.arguments.get("path")): return f(*args, **kwargs)
  return run

@contextlib.contextmanager
def _malformed(src):
  try: yield
  except TgLlamaError: raise
  except RecursionError: raise CheckpointError(f"{src}: tokenizer data nested deeper than Python can handle") from None
  except (LookupError, TypeError, AttributeError, ValueError, ArithmeticError, MemoryError) as e:
    raise CheckpointError(f"{src}: malformed tokenizer ({type(e).__name__}: {str(e)[:100]})") from None
  except BaseException as e:  # a Rust panic in tiktoken is a BaseException (pyo3's PanicException)
    if type(e).__name__ != "PanicException": raise
    raise CheckpointError(f"{src}: tiktoken refused the vocabulary ({str(e)[:100]})") from None

class StreamDecoder:
  """Token ids in, text out: the bytes of a character that a later token completes are held back until then."""
  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer, self._utf8 = tokenizer, codecs.getincrementaldecoder("utf-8")(errors="replace")
  def add(self, token_id: int) -> str: return self._utf8.decode(self.tokenizer.token_bytes(token_id))
  def flush(self) -> str: return self._utf8.decode(b"", final=True)

class Tokenizer:
  """`pieces[id]` is each token's bytes. `encode_ordinary` encodes text holding no special tokens. Control tokens
  (`special_tokens`) are parsed in text only when asked; user-defined ones (`added_tokens`) always, as HF and
  llama.cpp do."""
  def __init__(self, pieces: list[bytes], encode_ordinary: Callable[[str], list[int]], special_tokens: dict[str, int],
               added_tokens: dict[str, int] | None = None, bos_id: int | None = None, eos_id: int | None = None,
               add_bos: bool = False, chat_template: str | None = None, extra_stop_ids: Iterable[int] = (),
               strip_prefix_space: bool = False):
    self.pieces, self._encode_ordinary = pieces, encode_ordinary
    self.special_tokens, self.added_tokens = dict(special_tokens), dict(added_tokens or {})
    self.bos_id, self.eos_id, self.add_bos, self.chat_template = bos_id, eos_id, add_bos, chat_template
    self.strip_prefix_space = strip_prefix_space  # sentencepiece's dummy prefix: decode drops it again
    named = {**self.special_tokens, **self.added_tokens}
    self.stop_ids = frozenset({*([] if eos_id is None else [eos_id]), *extra_stop_ids, *(named[t] for t in STOP_TOKENS if t in named)})
    self._all_re, self._added_re = self._alternation(named), self._alternation(self.added_tokens)

  @staticmethod
  def _alternation(tokens: Iterable[str]) -> re.Pattern | None:
    # longest first, so a token that is a prefix of another never wins
    return re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")") if tokens else None

  @property
  def vocab_size(self) -> int: return len(self.pieces)

  def encode(self, text: str, allow_special: bool = False) -> list[int]:
    """Token ids of `text`, no BOS. Control-token strings in `text` are plain text unless `allow_special`."""
    if (split := self._all_re if allow_special else self._added_re) is None: return self._encode_ordinary(text)
    ids: list[int] = []
    for i, part in enumerate(split.split(text)):
      if i % 2: ids.append(self.added_tokens[part] if part in self.added_tokens else self.special_tokens[part])
      elif part: ids += self._encode_ordinary(part)
    return ids

  def token_bytes(self, token_id: int) -> bytes:
    if not 0 <= token_id < len(self.pieces): raise ValueError(f"token id {token_id} is outside the vocabulary ({len(self.pieces)} tokens)")
    return self.pieces[token_id]

  def decode(self, ids: Iterable[int]) -> str:
    ids = list(ids)
    text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    return text[1:] if self.strip_prefix_space and ids and self.pieces[ids[0]].startswith(b" ") else text

  def token_str(self, token_id: int) -> str: return self.token_bytes(token_id).decode("utf-8", errors="replace")

  def stream(self) -> StreamDecoder: return StreamDecoder(self)

  # *** constructors, one for each source ***

  @classmethod
  @_loader
  def from_tiktoken_model(cls, path: str | pathlib.Path, config: dict | None = None) -> Tokenizer:
    """Meta's Llama 3 tokenizer.model: one `base64(token) rank` a line, then Meta's 256 special tokens."""
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    for n, line in enumerate(pathlib.Path(path).read_bytes().splitlines(), 1):
      if not line: continue
      try:
        token, rank = line.split()
        token, rank = base64.b64decode(token, validate=True), int(rank)
      except ValueError: raise CheckpointError(f"{path}: line {n} is not `base64 rank`: {line[:60]!r}") from None
      if rank < 0 or rank in seen: raise CheckpointError(f"{path}: line {n}: rank {rank} is negative or another token's too")
      ranks[token] = rank
      seen.add(rank)
    _check_ids(ranks.values(), len(ranks), path, "the ranks")
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:
      raise CheckpointError(f"{path}: byte {missing[0]:#04x} has no token; a tiktoken model holds all 256 single bytes")
    config = config or {}
    decoder = _get(config, "added_tokens_decoder", dict, "tokenizer_config.json", {})
    specials = {}
    for k, v in decoder.items():
      if not (isinstance(v, dict) and isinstance(v.get("content"), str) and str(k).isdigit()):
        raise CheckpointError(f"tokenizer_config.json: added_tokens_decoder[{_short(k)}] is not an id with a {{'content': ...}} object")
      if v.get("special", True) and v["content"]: specials[v["content"]] = int(k)
    specials = specials or {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    _check_ids(specials.values(), len(ranks) + max(len(decoder), len(LLAMA3_SPECIALS)), "tokenizer_config.json", "added_tokens_decoder")
    if clash := set(specials.values()) & set(ranks.values()): raise CheckpointError(f"{path}: special token id {min(clash)} is also a token's rank")
    enc = tiktoken.Encoding(pathlib.Path(path).name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=specials)
    pieces = _pieces(ranks, specials)
    return cls(pieces, _chunked(enc.encode_ordinary), specials, **_config_kwargs(config, {**specials}, "<|begin_of_text|>",
                                                                                  "<|end_of_text|>", True, len(pieces)))

  @classmethod
  @_loader
  def from_hf_json(cls, tok: dict, config: dict | None = None, src: str = "tokenizer.json") -> Tokenizer:
    """A HF tokenizers byte-level BPE (`tok` is tokenizer.json parsed), with tokenizer_config.json's `config`."""
    if not isinstance(tok, dict): raise CheckpointError(f"{src}: not a JSON object but a {type(tok).__name__}")
    model = _get(tok, "model", dict, src)
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
      raise UnsupportedModelError(f"{src}: only byte-level BPE tokenizers are supported, not {_describe(model)}")
    if tok.get("normalizer") is not None:
      raise UnsupportedModelError(f"{src}: normalizer {_type_of(tok['normalizer'])} is not supported")
    pat = _hf_pattern(tok.get("pre_tokenizer"), src)
    vocab: dict[str, int] = _get(model, "vocab", dict, src, where="model.")
    added = _get(tok, "added_tokens", list, src, [])
    for n, a in enumerate(added):
      if not (isinstance(a, dict) and isinstance(a.get("content"), str) and _is_id(a.get("id"))):
        raise CheckpointError(f"{src}: added_tokens[{n}] is not a {{'content': str, 'id': int}} object: {_short(a)}")
    if not vocab and not added: raise CheckpointError(f"{src}: model.vocab is empty")
    _check_ids(vocab.values(), len(vocab) + len(added), src, "model.vocab")
    _check_ids([a["id"] for a in added], len(vocab) + len(added), src, "added_tokens")
    added = [a for a in added if a["content"]]  # an empty token would match everywhere
    specials = {a["content"]: a["id"] for a in added if a.get("special", True)}
    user = {a["content"]: a["id"] for a in added if not a.get("special", True)}
    names = [""] * (max([*vocab.values(), *(a["id"] for a in added)]) + 1)
    for t, i in vocab.items(): names[i] = t
    for a in added: names[a["id"]] = a["content"]
    pieces, ranks = _byte_level(names, _get(model, "merges", list, src, [], "model."), {*specials.values(), *user.values()},
                                model.get("ignore_merges", False), src)
    unk = vocab.get(model["unk_token"]) if isinstance(model.get("unk_token"), str) else None
    bos_default = _template_bos(tok.get("post_processor"))
    kw = _config_kwargs(config or {}, {**specials, **user}, bos_default or next((t for t in BOS_TOKENS if t in specials), None),
                        next((t for t in EOS_TOKENS if t in specials), None), bos_default is not None or None, len(pieces))
    return cls(pieces, _tiktoken_bpe(src, pat, ranks, specials, len(pieces), unk), specials, user, **kw)

  @classmethod
  @_loader
  def from_gguf_metadata(cls, kv: dict, src: str = "GGUF metadata") -> Tokenizer:
    """The vocab a GGUF file carries (`kv` from tg_llama.formats.gguf.read_metadata): byte-level BPE (`gpt2`) or
    sentencepiece BPE (`llama`)."""
    if not isinstance(kv, dict): raise CheckpointError(f"{src}: metadata is a {type(kv).__name__}, not a dict")
    if (kind := kv.get("tokenizer.ggml.model")) not in ("gpt2", "llama"):
      raise UnsupportedModelError(f"{src}: GGUF tokenizer model {_short(kind)} is not supported (only 'gpt2', byte-level BPE, and 'llama', "
                                  f"sentencepiece BPE); load the model's tokenizer.model or tokenizer.json instead")
    names: list[str] = _get(kv, "tokenizer.ggml.tokens", list, src)
    if not names: raise CheckpointError(f"{src}: tokenizer.ggml.tokens is empty")
    if (bad := next((i for i, t in enumerate(names) if not isinstance(t, str)), None)) is not None:
      raise CheckpointError(f"{src}: tokenizer.ggml.tokens[{bad}] is a {type(names[bad]).__name__}, not a string")
    types = _get(kv, "tokenizer.ggml.token_type", list, src, None) or [1] * len(names)
    if len(types) != len(names) or not all(_is_id(t) for t in types):
      raise CheckpointError(f"{src}: tokenizer.ggml.token_type must be {len(names)} integers, one per token")
    specials = {t: i for i, (t, ty) in enumerate(zip(names, types)) if ty == 3 and t}  # CONTROL
    user = {t: i for i, (t, ty) in enumerate(zip(names, types)) if ty == 4 and t}      # USER_DEFINED
    # llama.cpp's defaults for a sentencepiece vocab: <unk> <s> </s> are ids 0 1 2; BOS and the dummy prefix are added
    spm = kind == "llama"
    bos, eos = (_get(kv, f"tokenizer.ggml.{k}_token_id", int, src, d if spm and d < len(names) else None) for k, d in (("bos", 1), ("eos", 2)))
    extra = [kv[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in kv]
    for key, i in (("bos_token_id", bos), ("eos_token_id", eos), *(("eot/eom_token_id", i) for i in extra)):
      if i is not None and not (_is_id(i) and i < len(names)):
        raise CheckpointError(f"{src}: tokenizer.ggml.{key} {_short(i)} is not a token id (the vocabulary has {len(names)})")
    if spm:
      pieces, sp = _sentencepiece(kv, names, types, src)
      encode, strip = sp.encode, sp.add_space_prefix
      specials.update({t: i for i, (t, ty) in enumerate(zip(names, types)) if ty == 2 and t})  # UNKNOWN, as from_sentencepiece
      add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", True))
    else:
      pre = _get(kv, "tokenizer.ggml.pre", str, src, "default")  # llama.cpp's choice when the key is missing
      if pre not in GGUF_PRE: raise UnsupportedModelError(f"{src}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {sorted(GGUF_PRE)}")
      pat, ignore_merges = GGUF_PRE[pre]
      merges = _get(kv, "tokenizer.ggml.merges", list, src, [])
      pieces, ranks = _byte_level(names, merges, {*specials.values(), *user.values()}, ignore_merges, src)
      encode, strip = _tiktoken_bpe(src, pat, ranks, specials, len(pieces), None), False  # bytes missing from the vocab are dropped, as llama.cpp does
      add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", ignore_merges))
    return cls(pieces, encode, specials, user, bos_id=bos, eos_id=eos, add_bos=add_bos,
               chat_template=_get(kv, "tokenizer.chat_template", str, src, None), extra_stop_ids=extra,
               strip_prefix_space=strip)

  @classmethod
  def from_sentencepiece(cls, path: str | pathlib.Path, config: dict | None = None) -> Tokenizer:
    """A sentencepiece tokenizer.model (Llama 2, TinyLlama), through the optional `sentencepiece` library."""
    try: import sentencepiece
    except ImportError: raise UnsupportedModelError(f"{path}: a sentencepiece model needs the sentencepiece library: pip install sentencepiece") from None
    try: sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e: raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
    pieces: list[bytes] = []
    for i in range(sp.get_piece_size()):
      p = sp.id_to_piece(i)
      pieces.append(bytes([int(p[3:5], 16)]) if sp.is_byte(i) else " \u2047 ".encode() if sp.is_unknown(i) else p.replace("\u2581", " ").encode())
    specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    bos, eos = sp.bos_id(), sp.eos_id()
    kw = _config_kwargs(config or {}, specials, sp.id_to_piece(bos) if bos >= 0 else None, sp.id_to_piece(eos) if eos >= 0 else None, True, len(pieces))
    # sentencepiece itself parses user-defined pieces in text, so they need no splitting here
    prefix = sp.encode(".", out_type=str)[0].startswith("\u2581")  # add_dummy_prefix, without parsing the protobuf
    return cls(pieces, lambda text: sp.encode(text), specials, strip_prefix_space=prefix, **kw)

# *** helpers of the constructors ***

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

def _sentencepiece(kv: dict, names: list[str], types: list[int], src) -> tuple[list[bytes], SentencePieceBPE]:
  """Token bytes by id and the encoder of a GGUF `llama` vocab (written as convert_hf_to_gguf.py's
  _create_vocab_sentencepiece does: pieces, their scores, sentencepiece's piece types)."""
  scores = _get(kv, "tokenizer.ggml.scores", list, src, None) or [0.0] * len(names)  # llama.cpp scores a missing list 0
  if len(scores) != len(names) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x == x for x in scores):
    raise CheckpointError(f"{src}: tokenizer.ggml.scores must be {len(names)} numbers (not NaN), one per token")
  pieces, byte_ids = [], {}
  for i, (t, ty) in enumerate(zip(names, types)):
    if ty == 6:  # BYTE
      if not (m := _BYTE_PIECE.fullmatch(t)): raise CheckpointError(f"{src}: tokenizer.ggml.tokens[{i}] is a byte token (type 6) but not <0xNN>: {_short(t)}")
      byte_ids.setdefault(b := int(m.group(1), 16), i)
      pieces.append(bytes([b]))
    else: pieces.append(" \u2047 ".encode() if ty == 2 else t.encode() if ty == 3 else t.replace("\u2581", " ").encode())
  unk = _get(kv, "tokenizer.ggml.unknown_token_id", int, src, 0)
  if not (_is_id(unk) and unk < len(names)): raise CheckpointError(f"{src}: tokenizer.ggml.unknown_token_id {_short(unk)} is not a token id (the vocabulary has {len(names)})")
  return pieces, SentencePieceBPE(names, [float(x) for x in scores], types, byte_ids, unk, bool(kv.get("tokenizer.ggml.add_space_prefix", True)))

_REQUIRED = object()
_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer"}

def _get(d: dict, key: str, kind: type, src, default=_REQUIRED, where: str = ""):
  """d[key], which must be a `kind`; absent (or null) it is `default`, or an error naming the file and the key."""
  if d.get(key) is None:
    if default is _REQUIRED: raise CheckpointError(f"{src}: no {where}{key}")
    return default
  if not isinstance(v := d[key], kind) or (kind is int and isinstance(v, bool)):
    raise CheckpointError(f"{src}: {where}{key} is {_KINDS.get(type(v), type(v).__name__)}, not {_KINDS[kind]}")
  return v

def _is_id(i) -> bool: return isinstance(i, int) and not isinstance(i, bool) and i >= 0

def _check_ids(ids: Iterable, n_entries: int, src, key: str):
  # ids size lists: bound them by what the file lists, not by what it claims
  for i in ids:
    if not _is_id(i): raise CheckpointError(f"{src}: {key} has a token id {_short(i)} that is not an integer >= 0")
    if i >= n_entries: raise CheckpointError(f"{src}: {key} has token id {i}, past the {n_entries} tokens the file lists")

def _type_of(x) -> str: return _short(x.get("type")) if isinstance(x, dict) else type(x).__name__

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40
def _short(x) -> str: return _REPR.repr(x)  # a value from the file, in a message: bounded however big or shared it is

def _pieces(ranks: dict[bytes, int], specials: dict[str, int]) -> list[bytes]:
  pieces = [b""] * (max([*ranks.values(), *specials.values()]) + 1)
  for b, i in ranks.items(): pieces[i] = b
  for t, i in specials.items(): pieces[i] = t.encode()
  return pieces

def _byte_level(names: list[str], merges: list, special_ids: set[int], ignore_merges: bool, src: str) -> tuple[list[bytes], dict[bytes, int]]:
  """Token bytes by id, and tiktoken ranks: the ids themselves, so merges must come in id order."""
  u2b = _gpt2_bytes()
  pieces = [t.encode() if i in special_ids else _spelled(t, u2b) for i, t in enumerate(names)]
  ids = {t: i for i, t in enumerate(names) if i not in special_ids}
  last = -1
  results = []
  for n, m in enumerate(merges):
    if not (isinstance(m, str) and " " in m or isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m)):
      raise CheckpointError(f"{src}: merges[{n}] is not 'a b' or [a, b]: {_short(m)}")
    a, b = m.split(" ", 1) if isinstance(m, str) else m
    if (i := ids.get(a + b)) is None: raise CheckpointError(f"{src}: merge {_short(a)} {_short(b)} makes {_short(a + b)}, which is not in the vocabulary")
    if i < last: raise UnsupportedModelError(f"{src}: merges are not in token-id order (merge {_short(a)} {_short(b)} makes id {i} after id {last})")
    last = i
    results.append(i)
  # without ignore_merges only merge results (and single bytes) may be formed; with it, every token is looked up whole
  keep = ids.values() if ignore_merges else [*results, *(i for i in ids.values() if len(pieces[i]) == 1)]
  return pieces, {pieces[i]: i for i in keep if pieces[i]}

def _tiktoken_bpe(name: str, pat: str, ranks: dict[bytes, int], specials: dict[str, int], n_vocab: int, unk_id: int | None) -> Callable[[str], list[int]]:
  # tiktoken needs every byte as a rank; one the vocab lacks gets an id past its end, then becomes unk or is dropped
  missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
  base = max([n_vocab - 1, *specials.values()]) + 1
  try: enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks={**ranks, **{b: base + n for n, b in enumerate(missing)}}, special_tokens=specials)
  except ValueError as e: raise UnsupportedModelError(f"{name}: the split pattern does not compile ({str(e)[:100]})") from None
  encode = _chunked(enc.encode_ordinary)
  if not missing: return encode
  def encode_known(text: str) -> list[int]:
    ids = encode(text)
    if not ids or max(ids) < base: return ids
    return [i if i < base else unk_id for i in ids if i < base or unk_id is not None]
  return encode_known

def _chunked(encode: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
  return lambda text: [i for chunk in _split_long_runs(text) for i in encode(chunk)]

def _hf_pattern(pre: dict | None, src: str) -> str:
  """The split regex of a tokenizer.json pre_tokenizer: Split + ByteLevel, ByteLevel, or Digits + ByteLevel."""
  steps = (pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre] if pre else [])
  if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
    raise CheckpointError(f"{src}: pre_tokenizer is not an object, or a Sequence of them: {_short(pre)}")
  kinds = [s.get("type") for s in steps]
  if kinds == ["Split", "ByteLevel"] and isinstance(steps[0].get("pattern"), dict) and isinstance(steps[0]["pattern"].get("Regex"), str) \
     and steps[0].get("behavior") == "Isolated" \
     and not steps[0].get("invert") and not steps[1].get("use_regex", True):
    return steps[0]["pattern"]["Regex"]
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"): return GPT2_PAT
  if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True) \
     and not steps[1].get("add_prefix_space"):
    return DIGITS_PAT
  raise UnsupportedModelError(f"{src}: pre_tokenizer {_short(kinds or None)} is not supported (expected Split+ByteLevel, ByteLevel, or Digits+ByteLevel)")

def _describe(model: dict) -> str:
  flags = [k for k in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix") if model.get(k)]
  return _short(model.get("type")) + (f" with {', '.join(flags)}" if flags else "")

def _template_bos(post: dict | None) -> str | None:
  """The special token a TemplateProcessing post_processor puts first, i.e. the BOS that HF prepends."""
  if not isinstance(post, dict): return None
  if post.get("type") == "Sequence" and isinstance(post.get("processors"), list):
    return next((b for p in post["processors"] if (b := _template_bos(p))), None)
  single = post.get("single") if post.get("type") == "TemplateProcessing" else None
  if isinstance(single, list) and single and isinstance(first := single[0], dict) and isinstance(first.get("SpecialToken"), dict):
    return bos if isinstance(bos := first["SpecialToken"].get("id"), str) else None
  return None

def _token_name(v, key: str) -> str | None:
  if isinstance(v := v.get("content") if isinstance(v, dict) else v, str) or v is None: return v
  raise CheckpointError(f"tokenizer_config.json: {key} is {_KINDS.get(type(v), type(v).__name__)}, not a token string")

def _config_kwargs(config: dict, named: dict[str, int], bos: str | None, eos: str | None, add_bos: bool | None, n_vocab: int) -> dict:
  """bos/eos/add_bos/chat_template: tokenizer_config.json's where it says, else the defaults given."""
  if not isinstance(config, dict): raise CheckpointError(f"tokenizer_config.json: not a JSON object but a {type(config).__name__}")
  bos, eos = _token_name(config.get("bos_token", bos), "bos_token"), _token_name(config.get("eos_token", eos), "eos_token")
  template = config.get("chat_template")
  if isinstance(template, list):
    template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
  if template is not None and not isinstance(template, str): raise CheckpointError("tokenizer_config.json: chat_template is not a string")
  if add_bos is None: add_bos = bos in BOS_TOKENS
  stops = config.get("_stop_ids", ())
  if not all(_is_id(i) and i < n_vocab for i in stops):
    raise CheckpointError(f"generation_config.json: eos_token_id {_short(stops)} holds an id that is not a token (the vocabulary has {n_vocab})")
  return {"bos_id": named.get(bos), "eos_id": named.get(eos), "add_bos": bool(config.get("add_bos_token", add_bos)),
          "chat_template": template, "extra_stop_ids": stops}

# *** the loader ***

def _read_json(path: pathlib.Path) -> dict:
  try: return json.loads(path.read_text(encoding="utf-8"))
  except RecursionError: raise CheckpointError(f"{path}: JSON nested deeper than Python can read") from None
  except (OSError, UnicodeDecodeError, ValueError) as e: raise CheckpointError(f"{path}: unreadable JSON ({str(e)[:200]})") from None

def _read_json_object(path: pathlib.Path) -> dict:
  if not isinstance(d := _read_json(path), dict): raise CheckpointError(f"{path}: not a JSON object but a {type(d).__name__}")
  return d

def _dir_config(folder: pathlib.Path) -> dict:
  """tokenizer_config.json, with a chat_template.jinja beside it and generation_config.json's eos ids folded in."""
  config = _read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
  if (folder / "chat_template.jinja").is_file(): config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
  if (folder / "generation_config.json").is_file():
    eos = _read_json_object(folder / "generation_config.json").get("eos_token_id")
    config["_stop_ids"] = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(_is_id(i) for i in config["_stop_ids"]):
      raise CheckpointError(f"{folder / 'generation_config.json'}: eos_token_id {_short(eos)} is not token ids")
  return config

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")

def _load_file(path: pathlib.Path, config: dict) -> Tokenizer:
  with open(path, "rb") as f: head = f.read(256)
  if head[:4] == b"GGUF":
    from tg_llama.formats.gguf import read_metadata
    return Tokenizer.from_gguf_metadata(read_metadata(path), str(path))
  if head.lstrip()[:1] in (b"{", b"["): return Tokenizer.from_hf_json(_read_json(path), config, str(path))
  if _TIKTOKEN_LINE.match(head): return Tokenizer.from_tiktoken_model(path, config)
  return Tokenizer.from_sentencepiece(path, config)

def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
  """A tokenizer from a directory (tokenizer.json and/or tokenizer.model, optional tokenizer_config.json), a
  tokenizer.model (tiktoken or sentencepiece), a tokenizer.json, or a .gguf file. The kind is read from the
  contents. A directory's byte-level tokenizer.json wins over its tokenizer.model: it names every special token."""
  path = pathlib.Path(path)
  if not path.exists(): raise CheckpointError(f"{path}: no such file or directory")
  folder = path if path.is_dir() else path.parent
  config = _dir_config(folder)
  if path.is_file(): return _load_file(path, config)
  js, model = path / "tokenizer.json", path / "tokenizer.model"
  if js.is_file():
    try: return Tokenizer.from_hf_json(_read_json(js), config, str(js))
    except UnsupportedModelError:
      if not model.is_file(): raise
  if model.is_file(): return _load_file(model, config)
  if (gguf := path / "tokenizer.gguf").is_file(): return _load_file(gguf, config)  # written by `tg-llama convert` from a GGUF
  raise CheckpointError(f"{path}: no tokenizer.json, tokenizer.model or tokenizer.gguf in this directory")
