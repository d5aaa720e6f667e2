"""tg_llama.tokenizer against HF tokenizers/transformers on Llama 3 (tokenizer.model, tokenizer.json, as GGUF
metadata) and SmolLM2 (its GGUF), plus loader detection, special tokens, streaming, and sentencepiece."""
import io, json, sys
import pytest, regex
from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers, models, trainers, AddedToken
from tg_llama.errors import CheckpointError, UnsupportedModelError
from tg_llama.tokenizer import DEFAULT_PAT, DIGITS_PAT, GPT2_PAT, LLAMA3_PAT, Tokenizer, load_tokenizer

CORPUS = {
  "prose": "Hello, world! This is a simple English sentence. The quick brown fox jumps over the lazy dog.",
  "contractions": "It's 5 o'clock; we'll see—they're here, I'd say, you've won. DON'T CAN'T I'M YOU'RE WE'VE HE'LL SHE'D",
  "code": "def f(x):\n\tif x  >  0:\n\t\treturn x ** 2\n        else:\n            return -x    # comment\n\n\n",
  "numbers": "numbers: 1 12 123 1234 12345678901234567890 3.14159 -42 1,000,000 0x1F  2024 x  1  22   333\t4444 a1b2c3",
  "chinese": "中文测试：我爱自然语言处理。今天天气很好！",
  "japanese": "日本語のテキストです。カタカナとひらがな、漢字を混ぜています。",
  "emoji": "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 heart ❤️ ",
  "scripts": "Привет мир, γειά σου κόσμε, مرحبا بالعالم, שלום, नमस्ते 안녕하세요 ١٢٣ ４５６ Ünïcödé naïve café Ångström",
  "newlines": "\n\n\nnewlines\n\n  \n\t\n   trailing   \r\nwindows\r\nline endings\r\n",
  "spaces": "   leading spaces and a long run                                   of spaces\t\t\t  ",
  "specials": "special strings <|eot_id|> and <|im_end|> and <|begin_of_text|> <|im_start|>user\nhi<|endoftext|>",
  "symbols": "URLs https://example.com/path?q=1&r=2#frag a.b@c.io ∑∫√∞≠≤≥ ±×÷ →←↑↓ `code` ~tilde ^caret $5 <tag/>",
  "invisible": "zero\u200bwidth\u200djoiner and combining e\u0301 nbsp\u00a0here",
  "empty": "", "space": " ", "letter": "a",
}
MULTIBYTE = ["chinese", "japanese", "emoji", "scripts"]

def hf_plain(tok: HFTokenizer) -> HFTokenizer:
  """A copy that reads special-token strings in text as plain text, as our allow_special=False does."""
  plain = HFTokenizer.from_str(tok.to_str())
  plain.encode_special_tokens = True
  return plain

def hf_ids(tok: HFTokenizer, text: str) -> list[int]: return tok.encode(text, add_special_tokens=False).ids

def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
  dec = tok.stream()
  return [dec.add(i) for i in ids] + [dec.flush()]

# *** fixtures: each tokenizer once per module ***

@pytest.fixture(scope="module")
def l3_model(llama3_tokenizer_dir): return load_tokenizer(llama3_tokenizer_dir / "tokenizer.model")

@pytest.fixture(scope="module")
def l3_json(llama3_tokenizer_dir): return load_tokenizer(llama3_tokenizer_dir / "tokenizer.json")

@pytest.fixture(scope="module")
def l3_hf(llama3_tokenizer_dir): return HFTokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))

@pytest.fixture(scope="module")
def l3_hf_plain(l3_hf): return hf_plain(l3_hf)

@pytest.fixture(scope="module")
def l3_gguf(llama3_tokenizer_dir):
  """Llama 3's tokenizer.json laid out as a GGUF `gpt2` vocab with pre `llama-bpe`, as llama.cpp's converter does."""
  tj = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
  tokens = [""] * (len(tj["model"]["vocab"]) + len(tj["added_tokens"]))
  for t, i in tj["model"]["vocab"].items(): tokens[i] = t
  types = [1] * len(tokens)
  for a in tj["added_tokens"]: tokens[a["id"]], types[a["id"]] = a["content"], 3
  kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": tj["model"]["merges"],
        "tokenizer.ggml.bos_token_id": 128000, "tokenizer.ggml.eos_token_id": 128009}
  return Tokenizer.from_gguf_metadata(kv)

@pytest.fixture(scope="module")
def smol_kv(smollm2_gguf):
  from tg_llama.formats.gguf import read_metadata
  return read_metadata(smollm2_gguf)

@pytest.fixture(scope="module")
def smol(smollm2_gguf): return load_tokenizer(smollm2_gguf)

@pytest.fixture(scope="module")
def smol_hf_raw(smollm2_gguf):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).backend_tokenizer

@pytest.fixture(scope="module")
def smol_hf(smol_hf_raw):
  # transformers 5 builds a GGUF `gpt2` vocab with GPT-2's pre-tokenizer unless it knows tokenizer.ggml.pre, and it
  # has no entry for "smollm". SmolLM2's own tokenizer.json, and llama.cpp for pre "smollm" (llama-vocab.cpp), split
  # digits one by one first: restore that, the rest (vocab, merges, special tokens) is transformers' own.
  tok = HFTokenizer.from_str(smol_hf_raw.to_str())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return tok

@pytest.fixture(scope="module")
def smol_hf_plain(smol_hf): return hf_plain(smol_hf)

# *** Llama 3 ***

@pytest.mark.parametrize("name", CORPUS)
def test_llama3_tokenizer_model_matches_hf(l3_model, l3_hf, l3_hf_plain, name):
  text = CORPUS[name]
  assert l3_model.encode(text) == hf_ids(l3_hf_plain, text)
  assert l3_model.encode(text, allow_special=True) == hf_ids(l3_hf, text)
  assert l3_model.decode(l3_model.encode(text)) == text

@pytest.mark.parametrize("name", CORPUS)
def test_llama3_tokenizer_json_matches_hf(l3_json, l3_hf, l3_hf_plain, name):
  text = CORPUS[name]
  assert l3_json.encode(text) == hf_ids(l3_hf_plain, text)
  assert l3_json.encode(text, allow_special=True) == hf_ids(l3_hf, text)
  assert l3_json.decode(l3_json.encode(text)) == text

@pytest.mark.parametrize("name", CORPUS)
def test_llama3_gguf_vocab_matches_hf(l3_gguf, l3_hf, l3_hf_plain, name):
  text = CORPUS[name]
  assert l3_gguf.encode(text) == hf_ids(l3_hf_plain, text)
  assert l3_gguf.encode(text, allow_special=True) == hf_ids(l3_hf, text)

def test_llama3_special_tokens(l3_model, l3_json, l3_gguf, l3_hf):
  for tok in (l3_model, l3_json):
    assert tok.vocab_size == 128256 == l3_hf.get_vocab_size()
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (128000, 128001, True)
    assert tok.stop_ids == {128001, 128009}
    assert len(tok.special_tokens) == 256
    assert {t: tok.special_tokens[t] for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_250|>")} \
      == {t: l3_hf.token_to_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_250|>")}
    assert tok.token_str(128009) == "<|eot_id|>" and tok.token_str(9906) == "Hello"
    assert tok.chat_template is None
  assert (l3_gguf.eos_id, l3_gguf.add_bos) == (128009, True) and l3_gguf.stop_ids == {128001, 128009}

def test_allow_special_llama3(l3_model, l3_hf, l3_hf_plain):
  text = "user says <|eot_id|> here"
  plain, special = l3_model.encode(text), l3_model.encode(text, allow_special=True)
  assert 128009 not in plain and plain == hf_ids(l3_hf_plain, text)
  assert special.count(128009) == 1 and special == hf_ids(l3_hf, text)
  assert l3_model.decode(plain) == l3_model.decode(special) == text

def test_long_whitespace_run(l3_model):
  # tiktoken's regex overflows its stack on a run this long unless it is cut
  text = "a" + " " * 60_000 + "b" + "x" * 60_000
  assert l3_model.decode(l3_model.encode(text)) == text

def test_decode_rejects_unknown_ids(l3_model):
  with pytest.raises(ValueError, match="128256"): l3_model.decode([1, 128256])
  with pytest.raises(ValueError, match="-1"): l3_model.decode([-1])

# *** SmolLM2 (GGUF) ***

@pytest.mark.parametrize("name", CORPUS)
def test_smollm2_gguf_matches_transformers(smol, smol_hf, smol_hf_plain, name):
  text = CORPUS[name]
  assert smol.encode(text) == hf_ids(smol_hf_plain, text)
  assert smol.encode(text, allow_special=True) == hf_ids(smol_hf, text)
  assert smol.decode(smol.encode(text)) == text

def test_smollm2_digit_free_text_matches_unpatched_transformers(smol, smol_hf_raw):
  for name, text in CORPUS.items():
    if not any(c.isnumeric() for c in text): assert smol.encode(text, allow_special=True) == hf_ids(smol_hf_raw, text), name

def test_smollm2_special_tokens(smol, smol_hf, smol_kv):
  assert smol.vocab_size == 49152 == smol_hf.get_vocab_size()
  assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
  assert smol.stop_ids == {0, 2}  # <|im_end|>, <|endoftext|>
  assert smol.special_tokens["<|im_start|>"] == 1 and len(smol.special_tokens) == 17
  assert smol.chat_template == smol_kv["tokenizer.chat_template"]
  text = "<|im_start|>user\nhi<|im_end|>"
  assert smol.encode(text, allow_special=True)[0] == 1 and 1 not in smol.encode(text)

def test_bytes_missing_from_vocab_are_dropped(smol, smol_hf):
  # SmolLM2 has no token for byte 0x04: llama.cpp and transformers both drop it
  assert smol.encode("a\x04b") == hf_ids(smol_hf, "a\x04b") == smol.encode("a") + smol.encode("b")

def test_gguf_errors(smol_kv):
  with pytest.raises(UnsupportedModelError, match="'qwen9'"): Tokenizer.from_gguf_metadata({**smol_kv, "tokenizer.ggml.pre": "qwen9"})
  with pytest.raises(UnsupportedModelError, match="'bert'"): Tokenizer.from_gguf_metadata({**smol_kv, "tokenizer.ggml.model": "bert"})

# *** the split patterns against llama.cpp's regex sequences (llama-vocab.cpp), run the way it runs them ***

GPT2_SEQ = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_SEQUENCES = {
  "smollm": (DIGITS_PAT, [r"\p{N}", GPT2_SEQ]),
  "default": (DEFAULT_PAT, [r"[\p{P}\$\+<=>\^~\|]+", GPT2_SEQ, r"\p{N}+", r"[0-9][0-9][0-9]"]),
  "gpt2": (GPT2_PAT, [GPT2_SEQ]),
  "llama3": (LLAMA3_PAT, [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]),
}

def llama_cpp_split(text: str, sequence: list[str]) -> list[str]:
  """unicode_regex_split: each regex cuts every piece so far into its matches and the text between them."""
  pieces = [text]
  for pat in sequence:
    out = []
    for piece in pieces:
      pos = 0
      for m in regex.finditer(pat, piece):
        out += [s for s in (piece[pos:m.start()], m.group()) if s]
        pos = m.end()
      if pos < len(piece): out.append(piece[pos:])
    pieces = out
  return pieces

@pytest.mark.parametrize("pre", LLAMA_CPP_SEQUENCES)
def test_split_patterns_match_llama_cpp_sequences(pre):
  pat, sequence = LLAMA_CPP_SEQUENCES[pre]
  for name, text in CORPUS.items():
    if pre == "default" and name == "scripts": text = text.replace("١٢٣ ４５６", "")  # mixed-script digit runs: approximated
    assert regex.findall(pat, text) == llama_cpp_split(text, sequence), name

# *** streaming ***

@pytest.mark.parametrize("name", MULTIBYTE)
def test_stream_decoder(l3_model, smol, name):
  text = CORPUS[name]
  for tok in (l3_model, smol):
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text and not any("\ufffd" in c for c in chunks)
    # one token per byte: every character but ASCII arrives split
    byte_ids = {tok.token_bytes(i): i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}
    chunks = stream(tok, [byte_ids[bytes([b])] for b in text.encode()])
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
    assert chunks.count("") >= len(text.encode()) - len(text)  # held back until the character completes

def test_stream_flush_of_a_cut_character(l3_model):
  byte_ids = {l3_model.token_bytes(i): i for i in range(256)}
  dec = l3_model.stream()
  assert [dec.add(byte_ids[bytes([b])]) for b in "😀".encode()[:2]] == ["", ""]
  assert dec.flush() == "\ufffd"

# *** HF tokenizer.json with user-defined tokens (a small byte-level BPE trained here) ***

@pytest.fixture(scope="module")
def trained_json(tmp_path_factory):
  hf = HFTokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  hf.train_from_iterator(list(CORPUS.values()) * 3, trainer)
  hf.add_tokens([AddedToken("<think>", special=False, normalized=False)])
  path = tmp_path_factory.mktemp("trained") / "tokenizer.json"
  hf.save(str(path))
  (path.parent / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>", "chat_template": "{{ x }}"}))
  return path, HFTokenizer.from_file(str(path))

def test_trained_byte_level_json_matches_hf(trained_json):
  path, hf = trained_json
  tok = load_tokenizer(path)
  assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (None, 2, False, "{{ x }}")
  assert tok.added_tokens == {"<think>": hf.token_to_id("<think>")}
  plain = hf_plain(hf)
  for name, text in {**CORPUS, "think": "a <think>b</think> <|im_end|>"}.items():
    assert tok.encode(text) == hf_ids(plain, text), name  # user-defined tokens are parsed even here
    assert tok.encode(text, allow_special=True) == hf_ids(hf, text), name
    assert tok.decode(tok.encode(text)) == text

# *** the loader ***

def test_directory_with_config(llama3_tokenizer_dir, tmp_path):
  (tmp_path / "tokenizer.model").symlink_to(llama3_tokenizer_dir / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}, "chat_template": "T"}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
  tok = load_tokenizer(tmp_path)
  assert (tok.eos_id, tok.chat_template, tok.add_bos) == (128009, "T", True)
  assert tok.stop_ids == {128001, 128008, 128009}
  (tmp_path / "chat_template.jinja").write_text("J")
  assert load_tokenizer(tmp_path / "tokenizer.model").chat_template == "J"

def test_loader_errors(tmp_path):
  with pytest.raises(CheckpointError, match="no such file"): load_tokenizer(tmp_path / "nope")
  with pytest.raises(CheckpointError, match="no tokenizer.json, tokenizer.model or tokenizer.gguf"): load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\nnot a line\n")
  with pytest.raises(CheckpointError, match="line 3"): load_tokenizer(tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
  with pytest.raises(UnsupportedModelError, match="WordPiece"): load_tokenizer(tmp_path / "tokenizer.json")

# *** sentencepiece (a small model trained here: Llama 2's layout, BPE with byte fallback) ***

@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  model = io.BytesIO()
  # mostly English, so that the rarer scripts fall outside character_coverage and go through byte fallback
  lines = [t for t in CORPUS.values() if t.strip()] + [CORPUS["prose"], CORPUS["contractions"], CORPUS["code"]] * 100
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                 vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                 bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
  path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
  path.write_bytes(model.getvalue())
  return path

def test_sentencepiece_matches_library(spm_path):
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
  tok = load_tokenizer(spm_path)
  assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (1, 2, True, {2})
  for name, text in CORPUS.items():
    assert tok.encode(text) == sp.encode(text), name
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), name
  assert tok.encode("<s>hi", allow_special=True) == [1, *sp.encode("hi")] and tok.encode("<s>hi") == sp.encode("<s>hi")
  ids = tok.encode(CORPUS["emoji"])
  chunks = stream(tok, ids)
  assert "".join(chunks).lstrip() == sp.decode(ids) and not any("\ufffd" in c for c in chunks)

def test_sentencepiece_missing(spm_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "sentencepiece", None)
  with pytest.raises(UnsupportedModelError, match="pip install sentencepiece"): load_tokenizer(spm_path)
