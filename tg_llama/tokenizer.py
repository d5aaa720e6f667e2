"""Tokenizer: text <-> token ids for Llama-family models, from a tokenizer.model, a tokenizer.json, a directory
holding them, or a GGUF file's metadata. Byte-level BPE runs on tiktoken; sentencepiece models on `sentencepiece`.

Non-goals: WordPiece and Unigram models, normalizers (NFC, lowercasing), the lstrip/rstrip flags of added tokens,
GGUF `llama` (sentencepiece) vocabularies, and the rare word where rank-order BPE (tiktoken) and merge-list BPE
(HF tokenizers, llama.cpp) part ways: tiktoken merges any neighbours whose concatenation is a token."""
from __future__ import annotations
import base64, codecs, json, pathlib, re
from typing import Callable, Iterable
import tiktoken
from tg_llama.errors import CheckpointError, UnsupportedModelError

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
  def from_tiktoken_model(cls, path: str | pathlib.Path, config: dict | None = None) -> Tokenizer:
    """Meta's Llama 3 tokenizer.model: one `base64(token) rank` a line, then Meta's 256 special tokens."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(pathlib.Path(path).read_bytes().splitlines(), 1):
      if not line: continue
      try: token, rank = line.split(); ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError: raise CheckpointError(f"{path}: line {n} is not `base64 rank`: {line[:60]!r}") from None
    config = config or {}
    specials = {v["content"]: int(k) for k, v in config.get("added_tokens_decoder", {}).items() if v.get("special", True)}
    specials = specials or {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    enc = tiktoken.Encoding(pathlib.Path(path).name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=specials)
    pieces = _pieces(ranks, specials)
    return cls(pieces, _chunked(enc.encode_ordinary), specials, **_config_kwargs(config, {**specials}, "<|begin_of_text|>",
                                                                                  "<|end_of_text|>", True))

  @classmethod
  def from_hf_json(cls, tok: dict, config: dict | None = None, src: str = "tokenizer.json") -> Tokenizer:
    """A HF tokenizers byte-level BPE (`tok` is tokenizer.json parsed), with tokenizer_config.json's `config`."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
      raise UnsupportedModelError(f"{src}: only byte-level BPE tokenizers are supported, not {_describe(model)}")
    if tok.get("normalizer") is not None:
      raise UnsupportedModelError(f"{src}: normalizer {tok['normalizer'].get('type')} is not supported")
    pat = _hf_pattern(tok.get("pre_tokenizer"), src)
    vocab: dict[str, int] = model["vocab"]
    added = tok.get("added_tokens") or []
    specials = {a["content"]: a["id"] for a in added if a.get("special", True)}
    user = {a["content"]: a["id"] for a in added if not a.get("special", True)}
    names = [""] * (max([*vocab.values(), *(a["id"] for a in added)]) + 1)
    for t, i in vocab.items(): names[i] = t
    for a in added: names[a["id"]] = a["content"]
    pieces, ranks = _byte_level(names, model.get("merges") or [], {*specials.values(), *user.values()},
                                model.get("ignore_merges", False), src)
    unk = vocab.get(model["unk_token"]) if model.get("unk_token") else None
    bos_default = _template_bos(tok.get("post_processor"))
    kw = _config_kwargs(config or {}, {**specials, **user}, bos_default or next((t for t in BOS_TOKENS if t in specials), None),
                        next((t for t in EOS_TOKENS if t in specials), None), bos_default is not None or None)
    return cls(pieces, _tiktoken_bpe(src, pat, ranks, specials, len(pieces), unk), specials, user, **kw)

  @classmethod
  def from_gguf_metadata(cls, kv: dict, src: str = "GGUF metadata") -> Tokenizer:
    """The vocab a GGUF file carries (`kv` from tg_llama.formats.gguf.read_metadata)."""
    if (kind := kv.get("tokenizer.ggml.model")) != "gpt2":
      raise UnsupportedModelError(f"{src}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE); "
                                  f"load the model's tokenizer.model or tokenizer.json instead")
    pre = kv.get("tokenizer.ggml.pre", "default")  # llama.cpp's choice when the key is missing
    if pre not in GGUF_PRE: raise UnsupportedModelError(f"{src}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {sorted(GGUF_PRE)}")
    pat, ignore_merges = GGUF_PRE[pre]
    names: list[str] = kv["tokenizer.ggml.tokens"]
    types = kv.get("tokenizer.ggml.token_type") or [1] * len(names)
    specials = {t: i for i, (t, ty) in enumerate(zip(names, types)) if ty == 3}  # CONTROL
    user = {t: i for i, (t, ty) in enumerate(zip(names, types)) if ty == 4}      # USER_DEFINED
    pieces, ranks = _byte_level(names, kv.get("tokenizer.ggml.merges") or [], {*specials.values(), *user.values()}, ignore_merges, src)
    bos, eos = kv.get("tokenizer.ggml.bos_token_id"), kv.get("tokenizer.ggml.eos_token_id")
    extra = [kv[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in kv]
    # bytes missing from the vocab are dropped, as llama.cpp does
    return cls(pieces, _tiktoken_bpe(src, pat, ranks, specials, len(pieces), None), specials, user, bos_id=bos, eos_id=eos,
               add_bos=kv.get("tokenizer.ggml.add_bos_token", ignore_merges), chat_template=kv.get("tokenizer.chat_template"),
               extra_stop_ids=extra)

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
    kw = _config_kwargs(config or {}, specials, sp.id_to_piece(bos) if bos >= 0 else None, sp.id_to_piece(eos) if eos >= 0 else None, True)
    # sentencepiece itself parses user-defined pieces in text, so they need no splitting here
    prefix = sp.encode(".", out_type=str)[0].startswith("\u2581")  # add_dummy_prefix, without parsing the protobuf
    return cls(pieces, lambda text: sp.encode(text), specials, strip_prefix_space=prefix, **kw)

# *** helpers of the constructors ***

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
  for m in merges:
    a, b = m.split(" ", 1) if isinstance(m, str) else m
    if (i := ids.get(a + b)) is None: raise CheckpointError(f"{src}: merge {a!r} {b!r} makes {a + b!r}, which is not in the vocabulary")
    if i < last: raise UnsupportedModelError(f"{src}: merges are not in token-id order (merge {a!r} {b!r} makes id {i} after id {last})")
    last = i
    results.append(i)
  # without ignore_merges only merge results (and single bytes) may be formed; with it, every token is looked up whole
  keep = ids.values() if ignore_merges else [*results, *(i for i in ids.values() if len(pieces[i]) == 1)]
  return pieces, {pieces[i]: i for i in keep if pieces[i]}

def _tiktoken_bpe(name: str, pat: str, ranks: dict[bytes, int], specials: dict[str, int], n_vocab: int, unk_id: int | None) -> Callable[[str], list[int]]:
  # tiktoken needs every byte as a rank; one the vocab lacks gets an id past its end, then becomes unk or is dropped
  missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
  base = max([n_vocab - 1, *specials.values()]) + 1
  enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks={**ranks, **{b: base + n for n, b in enumerate(missing)}}, special_tokens=specials)
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
  steps = (pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else [])
  kinds = [s.get("type") for s in steps]
  if kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {}) and steps[0].get("behavior") == "Isolated" \
     and not steps[0].get("invert") and not steps[1].get("use_regex", True):
    return steps[0]["pattern"]["Regex"]
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"): return GPT2_PAT
  if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True) \
     and not steps[1].get("add_prefix_space"):
    return DIGITS_PAT
  raise UnsupportedModelError(f"{src}: pre_tokenizer {kinds or None} is not supported (expected Split+ByteLevel, ByteLevel, or Digits+ByteLevel)")

def _describe(model: dict) -> str:
  flags = [k for k in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix") if model.get(k)]
  return f"{model.get('type')}" + (f" with {', '.join(flags)}" if flags else "")

def _template_bos(post: dict | None) -> str | None:
  """The special token a TemplateProcessing post_processor puts first, i.e. the BOS that HF prepends."""
  if not post: return None
  if post.get("type") == "Sequence": return next((b for p in post.get("processors", []) if (b := _template_bos(p))), None)
  if post.get("type") == "TemplateProcessing" and post.get("single") and "SpecialToken" in post["single"][0]:
    return post["single"][0]["SpecialToken"]["id"]
  return None

def _token_name(v) -> str | None: return v.get("content") if isinstance(v, dict) else v

def _config_kwargs(config: dict, named: dict[str, int], bos: str | None, eos: str | None, add_bos: bool | None) -> dict:
  """bos/eos/add_bos/chat_template: tokenizer_config.json's where it says, else the defaults given."""
  bos, eos = _token_name(config.get("bos_token", bos)), _token_name(config.get("eos_token", eos))
  template = config.get("chat_template")
  if isinstance(template, list): template = next((t["template"] for t in template if t.get("name") == "default"), None)
  if add_bos is None: add_bos = bos in BOS_TOKENS
  return {"bos_id": named.get(bos), "eos_id": named.get(eos), "add_bos": bool(config.get("add_bos_token", add_bos)),
          "chat_template": template, "extra_stop_ids": config.get("_stop_ids", ())}

# *** the loader ***

def _read_json(path: pathlib.Path) -> dict:
  try: return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e: raise CheckpointError(f"{path}: unreadable JSON ({e})") from None

def _dir_config(folder: pathlib.Path) -> dict:
  """tokenizer_config.json, with a chat_template.jinja beside it and generation_config.json's eos ids folded in."""
  config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
  if (folder / "chat_template.jinja").is_file(): config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
  if (folder / "generation_config.json").is_file():
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    config["_stop_ids"] = eos if isinstance(eos, list) else [] if eos is None else [eos]
  return config

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")

def _load_file(path: pathlib.Path, config: dict) -> Tokenizer:
  with open(path, "rb") as f: head = f.read(256)
  if head[:4] == b"GGUF":
    from tg_llama.formats.gguf import read_metadata
    return Tokenizer.from_gguf_metadata(read_metadata(path), str(path))
  if head.lstrip()[:1] == b"{": return Tokenizer.from_hf_json(_read_json(path), config, str(path))
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
