"""Property-based fuzzing of the three readers (GGUF, HF safetensors directory, Meta .pth): mutated headers, counts,
offsets, types and nesting of valid tiny files. Every outcome is a successful open (check_weights passes and the small
tensors read) or a TgLlamaError: never another exception, a hang or a crash, within a bounded time and address space.
Derandomized and bounded (max_examples) so the whole file runs in about a minute on 2 cores."""
from __future__ import annotations
import io, json, math, pathlib, shutil, struct, tempfile, zipfile
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from tg_llama.convert import check_weights, open_checkpoint
from tg_llama.errors import TgLlamaError
from test_hostile_files import Raw, bounded, gguf_bytes, gguf_parts, pth_bytes
from tiny_models import hf_model, write_gguf, write_hf, write_meta

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])

def survives(path: pathlib.Path):
  """Open, check and read the small tensors of `path`: a TgLlamaError is a fine outcome, anything else fails the test
  (the bounds turn a hang into TimeoutError and a runaway allocation into MemoryError)."""
  with bounded(seconds=20):
    try:
      ckpt = open_checkpoint(path)
      check_weights(ckpt)
      for name in ("model.norm.weight", "model.layers.0.self_attn.k_proj.weight"): ckpt.tensors[name]("CPU").numpy()
    except TgLlamaError: pass

class Src(tuple):
  """A fixture's value, shown short in hypothesis' reports."""
  def __repr__(self): return "<source files>"

_examples_dir: list[pathlib.Path] = []

@pytest.fixture(scope="module", autouse=True)
def examples_dir(tmp_path_factory):
  """Every example's files under pytest's temporary folder (which pytest prunes), not loose in the system's /tmp."""
  _examples_dir[:] = [tmp_path_factory.mktemp("fuzz_examples")]
  yield
  shutil.rmtree(_examples_dir.pop(), ignore_errors=True)

def workdir() -> pathlib.Path: return pathlib.Path(tempfile.mkdtemp(prefix="ex_", dir=_examples_dir[0]))

# values of every JSON type, weighted towards the numbers that break arithmetic
EDGE_INTS = st.sampled_from([0, -1, 1, 2, 3, 7, 24, 64, 2**31, 2**32 + 1, 2**40, 2**63, 2**64 - 1, 10**12, -(2**63)])
EDGE_FLOATS = st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e308, math.nan, math.inf, -math.inf, 0.5])
SCALARS = st.none() | st.booleans() | EDGE_INTS | st.integers(-2**70, 2**70) | EDGE_FLOATS | st.floats() | st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)

def flip_bytes(data: bytes, region: tuple[int, int], draw) -> bytes:
  """1-8 bytes of data[region] overwritten with random values."""
  out = bytearray(data)
  for _ in range(draw(st.integers(1, 8))): out[draw(st.integers(*region))] = draw(st.integers(0, 255))
  return bytes(out)

# ---- GGUF ----

@pytest.fixture(scope="module")
def gguf_src(tmp_path_factory):
  return Src(gguf_parts(write_gguf(hf_model("gqa_tied"), tmp_path_factory.mktemp("fuzz_gguf") / "m.gguf", "Q8_0")))

GGUF_VALUES = (SCALARS.filter(lambda v: v is not None) | st.lists(EDGE_INTS | st.text(max_size=4), max_size=3)
               | st.builds(Raw, st.integers(0, 13), st.binary(max_size=24)))

@FUZZ
@given(data=st.data())
def test_gguf_metadata_fields(gguf_src, data):
  kv, tensors, blob = gguf_src
  kv = dict(kv)
  for _ in range(data.draw(st.integers(1, 4))):
    key = data.draw(st.sampled_from(sorted(kv) + ["general.alignment", "llama.expert_count", "llama.attention.key_length"]))
    if data.draw(st.booleans()) and key in kv: del kv[key]
    else: kv[key] = data.draw(GGUF_VALUES)
  survives(_write(kv, tensors, blob))

@FUZZ
@given(data=st.data())
def test_gguf_tensor_index(gguf_src, data):
  kv, tensors, blob = gguf_src
  tensors = list(tensors)
  for _ in range(data.draw(st.integers(1, 3))):
    i = data.draw(st.integers(0, len(tensors) - 1))
    name, shape, typ, off = tensors[i]
    what = data.draw(st.sampled_from(["name", "shape", "type", "offset", "dup", "drop"]))
    if what == "name": name = data.draw(st.sampled_from([t[0] for t in tensors] + ["", "blk.99.attn_q.weight", "rope_freqs.weight"]))
    if what == "shape": shape = tuple(data.draw(st.lists(EDGE_INTS.filter(lambda d: 0 <= d < 2**64), min_size=0, max_size=6)))
    if what == "type": typ = data.draw(st.integers(0, 40))
    if what == "offset": off = data.draw(EDGE_INTS.filter(lambda o: 0 <= o < 2**64) | st.integers(0, len(blob)))
    if what == "dup": tensors.append(tensors[i])
    if what == "drop": tensors.pop(i)
    else: tensors[i] = (name, shape, typ, off)
  counts = data.draw(st.sampled_from([{}, {"n_tensors": data.draw(EDGE_INTS.filter(lambda n: 0 <= n < 2**64))},
                                      {"n_kv": data.draw(EDGE_INTS.filter(lambda n: 0 <= n < 2**64))}]))
  survives(_write(kv, tensors, blob, **counts))

@FUZZ
@given(data=st.data())
def test_gguf_header_bytes(gguf_src, data):
  kv, tensors, blob = gguf_src
  raw = gguf_bytes(kv, tensors, blob)
  header_end = len(raw) - len(blob)
  path = workdir() / "m.gguf"
  path.write_bytes(flip_bytes(raw, (0, header_end - 1), data.draw))
  survives(path)

def _write(kv, tensors, blob, **counts) -> pathlib.Path:
  path = workdir() / "m.gguf"
  path.write_bytes(gguf_bytes(kv, tensors, blob, **counts))
  return path

# ---- HF directory: config.json, the safetensors header ----

@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> pathlib.Path: return write_hf(hf_model("mha"), tmp_path_factory.mktemp("fuzz_hf") / "hf")

def _hf_copy(src: pathlib.Path) -> pathlib.Path: return pathlib.Path(shutil.copytree(src, workdir() / "hf"))

CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
               "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
               "model_type", "eos_token_id", "bos_token_id", "hidden_act"]

@FUZZ
@given(data=st.data())
def test_hf_config_fields(hf_src, data):
  path = _hf_copy(hf_src)
  cfg = json.loads((path / "config.json").read_text())
  for _ in range(data.draw(st.integers(1, 3))):
    key = data.draw(st.sampled_from(CONFIG_KEYS))
    if data.draw(st.booleans()): cfg.pop(key, None)
    else: cfg[key] = data.draw(JSON)
  (path / "config.json").write_text(json.dumps(data.draw(st.just(cfg) | JSON)))
  survives(path)

def _safetensors_copy(hf_src):
  """A copy of the checkpoint, its safetensors file, the file's bytes and its header's length."""
  path = _hf_copy(hf_src)
  raw = (f := path / "model.safetensors").read_bytes()
  return path, f, raw, struct.unpack("<Q", raw[:8])[0]

@FUZZ
@given(data=st.data())
def test_safetensors_header_fields(hf_src, data):
  path, f, raw, n = _safetensors_copy(hf_src)
  header = json.loads(raw[8:8 + n])
  names = sorted(header)
  for _ in range(data.draw(st.integers(1, 3))):
    name = data.draw(st.sampled_from(names))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "offsets_of"]))
    if field == "entry": header[name] = data.draw(JSON)
    elif field == "offsets_of" and isinstance(header[name], dict) and isinstance(other := header[data.draw(st.sampled_from(names))], dict):
      header[name]["data_offsets"] = other.get("data_offsets")  # another tensor's bytes
    elif isinstance(header[name], dict):
      header[name][field] = data.draw(JSON | st.lists(EDGE_INTS, max_size=3) | st.sampled_from(["F32", "F16", "BF16", "I32", "BOOL", "U8", "F64"]))
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
  survives(path)

@FUZZ
@given(data=st.data())
def test_safetensors_header_bytes(hf_src, data):
  path, f, raw, n = _safetensors_copy(hf_src)
  f.write_bytes(flip_bytes(raw, (0, 8 + n - 1), data.draw))
  survives(path)

# ---- Meta: params.json, the pickled tensor records, the pickle and zip bytes ----

@pytest.fixture(scope="module")
def meta_src(tmp_path_factory):
  import torch
  path = write_meta(hf_model("mha"), tmp_path_factory.mktemp("fuzz_meta") / "meta", n_shards=1)
  sd = torch.load(path / "consolidated.00.pth")
  return Src((json.loads((path / "params.json").read_text()), {k: v.float().numpy() for k, v in sd.items()}))

def _meta(params, pth: bytes) -> pathlib.Path:
  path = workdir() / "meta"
  path.mkdir()
  (path / "params.json").write_text(json.dumps(params))
  (path / "consolidated.00.pth").write_bytes(pth)
  return path

PICKLE_VALUES = SCALARS | st.lists(EDGE_INTS | st.text(max_size=2), max_size=9).map(tuple)
STORAGE_KINDS = st.sampled_from(["FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "BoolStorage", "DoubleStorage", "Tensor"])

@FUZZ
@given(data=st.data())
def test_meta_fields(meta_src, data):
  params, tensors = meta_src
  params = dict(params)
  for _ in range(data.draw(st.integers(0, 2))):
    params[data.draw(st.sampled_from(["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                                      "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len"]))] = data.draw(JSON)
  fields = {}
  for _ in range(data.draw(st.integers(0, 3))):
    name = data.draw(st.sampled_from(sorted(tensors)))
    field = data.draw(st.sampled_from(["offset", "shape", "stride", "kind"]))
    fields.setdefault(name, {})[field] = data.draw(STORAGE_KINDS if field == "kind" else PICKLE_VALUES)
  survives(_meta(params, pth_bytes(tensors, fields)))

@FUZZ
@given(data=st.data())
def test_meta_pickle_and_zip_bytes(meta_src, data):
  params, tensors = meta_src
  raw = pth_bytes(tensors)
  where = data.draw(st.sampled_from(["pickle", "zip_end", "anywhere"]))
  if where == "pickle":  # data.pkl's bytes, re-zipped with a matching CRC so the unpickler sees them
    pkl = zipfile.ZipFile(io.BytesIO(raw)).read("archive/data.pkl")
    raw = pth_bytes(tensors, pickle_bytes=flip_bytes(pkl, (0, len(pkl) - 1), data.draw))
  else: raw = flip_bytes(raw, (max(0, len(raw) - 400), len(raw) - 1) if where == "zip_end" else (0, len(raw) - 1), data.draw)
  survives(_meta(params, raw))
