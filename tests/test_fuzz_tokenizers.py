"""Property-based fuzzing of the tokenizer loaders: a tokenizer.json, tokenizer_config.json, GGUF metadata and a tiktoken
tokenizer.model, each a small valid one with keys, types, lengths and nesting mutated. Every outcome is a working
tokenizer or a TgLlamaError; never another exception, a Rust panic, a hang (hypothesis' deadline) or gigabytes (the
address space is capped at +1 GB for this module)."""
import base64, copy, json, resource, tempfile, pathlib
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from tg_llama.errors import TgLlamaError
from tg_llama.tokenizer import Tokenizer, load_tokenizer
from test_prompt_safety import byte_level_json, gguf_kv, vm_bytes

# no shrinking: a failure is reported as found, and the file stays within its minute on two cores
SETTINGS = settings(max_examples=80, deadline=3000, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TEXT = "hello there <|im_end|> tell ünï 😀\n  x"

@pytest.fixture(scope="module", autouse=True)
def address_space_cap():
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 2**30, hard))
  yield
  resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

def deep(depth: int, leaf):
  """`leaf` nested `depth` levels down, in lists and Sequence objects (a tree: JSON cannot share a node)."""
  for i in range(depth): leaf = [leaf] if i % 2 else {"type": "Sequence", "processors" if i % 4 else "pretokenizers": [leaf]}
  return leaf

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 255, 256, 10**12, 2**31, 2**64]) | \
          st.floats(allow_nan=True) | st.text(max_size=6) | st.sampled_from(["", " ", "a b", "Ġ t", "h e", "<|im_end|>", "BPE", "ByteLevel"])
keys = st.text(max_size=5) | st.sampled_from(["type", "id", "content"])
values = st.recursive(scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(keys, c, max_size=4),
                      max_leaves=12) | st.integers(100, 3000).map(lambda d: deep(d, "x"))

def mutate(doc, draw, paths):
  """One mutation of `doc` at one of `paths` (dotted, or a tuple of keys for keys that hold dots; a number indexes a list):
  delete, replace, shrink, grow or nest."""
  path = draw(st.sampled_from(paths))
  path = path.split(".") if isinstance(path, str) else list(path)
  parent = doc
  for key in path[:-1]:
    if not isinstance(parent, (dict, list)): return
    key = int(key) if isinstance(parent, list) and key.isdigit() else key
    if isinstance(parent, list) and not (isinstance(key, int) and key < len(parent)): return
    if isinstance(parent, dict) and key not in parent: return
    parent = parent[key]
  last = int(path[-1]) if isinstance(parent, list) and path[-1].isdigit() else path[-1]
  if isinstance(parent, list) and not (isinstance(last, int) and last < len(parent)): return
  if not isinstance(parent, (dict, list)): return
  how = draw(st.sampled_from(["delete", "replace", "replace", "shrink", "grow", "nest"]))
  old = parent[last] if not isinstance(parent, dict) or last in parent else None
  if how == "delete": parent.pop(last) if isinstance(parent, list) or last in parent else None
  elif how == "replace": parent[last] = draw(values)
  elif how == "shrink" and isinstance(old, (list, dict, str)):
    n = draw(st.integers(0, max(len(old) - 1, 0)))
    parent[last] = old[:n] if not isinstance(old, dict) else dict(list(old.items())[:n])
  elif how == "grow" and isinstance(old, list): parent[last] = old + draw(st.lists(values | st.sampled_from(old or [0]), max_size=4))
  elif how == "grow" and isinstance(old, dict): parent[last] = {**old, **draw(st.dictionaries(st.text(max_size=4), values | st.integers(), max_size=3))}
  elif how == "nest": parent[last] = deep(draw(st.integers(1, 3000)), old)

def works(make) -> None:
  """A tokenizer that loads must also encode and decode; anything refused must be a TgLlamaError."""
  try: tok = make()
  except TgLlamaError as e:
    assert "\n" not in str(e)
    return
  ids = tok.encode(TEXT, allow_special=True) + tok.encode(TEXT)
  assert all(0 <= i < tok.vocab_size for i in ids)
  tok.decode(ids)
  stream = tok.stream()
  "".join(stream.add(i) for i in ids) + stream.flush()

JSON_PATHS = ["model", "model.vocab", "model.merges", "model.merges.0", "model.merges.3", "model.type", "model.unk_token",
              "model.ignore_merges", "model.byte_fallback", "model.vocab.h", "model.vocab.Ġt", "added_tokens", "added_tokens.0",
              "added_tokens.0.id", "added_tokens.2.content", "added_tokens.1.special", "pre_tokenizer", "pre_tokenizer.type",
              "pre_tokenizer.use_regex", "post_processor", "normalizer", "version"]
CONFIG_PATHS = ["bos_token", "eos_token", "chat_template", "add_bos_token", "added_tokens_decoder", "added_tokens_decoder.257"]
BASE_JSON = byte_level_json()

@SETTINGS
@given(st.data())
def test_fuzz_tokenizer_json(data):
  doc, config = copy.deepcopy(BASE_JSON), {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": "x",
                                           "added_tokens_decoder": {"257": {"content": "<|im_start|>"}}}
  for _ in range(data.draw(st.integers(1, 4))): mutate(doc, data.draw, JSON_PATHS)
  if data.draw(st.booleans()): mutate(config, data.draw, CONFIG_PATHS)
  works(lambda: Tokenizer.from_hf_json(doc, config, "fuzz.json"))

GGUF_PATHS = ["tokenizer.ggml.tokens", "tokenizer.ggml.tokens.0", "tokenizer.ggml.tokens.100", "tokenizer.ggml.tokens.260",
              "tokenizer.ggml.token_type", "tokenizer.ggml.token_type.5", "tokenizer.ggml.token_type.261", "tokenizer.ggml.merges",
              "tokenizer.ggml.merges.1", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
              "tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
# GGUF keys hold dots: a path is (key, index)
GGUF_PATHS = [(key, last) if last.isdigit() else (path,) for path in GGUF_PATHS for key, _, last in [path.rpartition(".")]]
BASE_KV = gguf_kv(**{"tokenizer.ggml.eot_token_id": 259})

@SETTINGS
@given(st.data())
def test_fuzz_gguf_metadata(data):
  kv = copy.deepcopy(BASE_KV)
  for _ in range(data.draw(st.integers(1, 4))): mutate(kv, data.draw, GGUF_PATHS)
  works(lambda: Tokenizer.from_gguf_metadata(kv, "fuzz.gguf"))

BASE_LINES = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)] + \
             [f"{base64.b64encode(t).decode()} {256 + i}" for i, t in enumerate([b"he", b"ll", b"hell", b" t"])]
line_edits = st.sampled_from(["drop", "dup", "rank", "token", "junk", "swap"])

@SETTINGS
@given(st.lists(st.tuples(line_edits, st.integers(0, len(BASE_LINES) - 1), st.integers(-2**40, 2**40) | st.sampled_from([0, 5, 259, 10**12]),
                          st.binary(max_size=8)), max_size=5), st.booleans())
def test_fuzz_tiktoken_model(edits, through_loader):
  lines = list(BASE_LINES)
  for how, i, n, raw in edits:
    i = i % max(len(lines), 1)
    if not lines: break
    if how == "drop": lines.pop(i)
    elif how == "dup": lines.insert(i, lines[i])
    elif how == "rank": lines[i] = f"{lines[i].split()[0]} {n}"
    elif how == "token": lines[i] = f"{base64.b64encode(raw).decode()} {lines[i].split()[-1]}"
    elif how == "junk": lines[i] = raw.decode("latin-1")
    elif how == "swap": lines[i], lines[-1] = lines[-1], lines[i]
  with tempfile.TemporaryDirectory() as folder:
    path = pathlib.Path(folder) / "tokenizer.model"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    works(lambda: load_tokenizer(path) if through_loader else Tokenizer.from_tiktoken_model(path))

@settings(max_examples=40, deadline=3000, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "generation_config.json"]), values)
def test_fuzz_json_files(name, value):
  with tempfile.TemporaryDirectory() as folder:
    folder = pathlib.Path(folder)
    (folder / "tokenizer.json").write_text(json.dumps(BASE_JSON))
    try: text = json.dumps(value if name == "tokenizer.json" else {"eos_token_id": value, "bos_token": value})
    except (RecursionError, ValueError): return  # json itself cannot write it
    (folder / name).write_text(text)
    works(lambda: load_tokenizer(folder))
