"""Hostile and broken checkpoints: every one is refused with a CheckpointError naming the file and the key, within a
bounded time and memory, never read silently wrong. The builders here (raw GGUF, safetensors edits, torch-zip .pth)
are shared with test_fuzz_readers.py."""
from __future__ import annotations
import collections, contextlib, io, json, math, pathlib, pickle, resource, signal, struct, tracemalloc, zipfile
import numpy as np
import pytest
import torch
from tg_llama.convert import check_weights, open_checkpoint
from tg_llama.errors import CheckpointError, TgLlamaError
from tiny_models import hf_model, write_gguf, write_hf, write_meta

# ---- bounds: a hostile file must fail fast and small, not exhaust the machine ----

@contextlib.contextmanager
def bounded(seconds: int = 30, extra_bytes: int = 1536 << 20):
  """Address space capped at the current size + extra_bytes (a MemoryError then fails the test), and an alarm after
  `seconds` (TimeoutError). Both are restored afterwards."""
  def vm_size() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmSize:"): return int(line.split()[1]) * 1024
    return 0
  def alarm(*_): raise TimeoutError(f"took over {seconds} s")
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  resource.setrlimit(resource.RLIMIT_AS, (vm_size() + extra_bytes, hard))
  old = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(seconds)
  try: yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

def refused(path: pathlib.Path, match: str):
  """open_checkpoint + check_weights refuse `path` with a CheckpointError matching `match`, within the bounds."""
  with bounded(), pytest.raises(CheckpointError, match=match): check_weights(open_checkpoint(path))

# ---- GGUF, written byte by byte so any field can be hostile ----

class Raw:
  """A GGUF value given as its type id and encoded bytes (for values no Python type maps to)."""
  def __init__(self, typ: int, data: bytes): self.typ, self.data = typ, data

def _gstr(s: str) -> bytes: return struct.pack("<Q", len(b := s.encode())) + b

def gguf_value(v) -> tuple[int, bytes]:
  if isinstance(v, Raw): return v.typ, v.data
  if isinstance(v, bool): return 7, struct.pack("<?", v)
  if isinstance(v, int):
    v = min(max(v, -2**63), 2**64 - 1)  # GGUF has no wider integer: the edges of its widest ones
    return (4, struct.pack("<I", v)) if 0 <= v < 2**32 else (10, struct.pack("<Q", v)) if v >= 0 else (11, struct.pack("<q", v))
  if isinstance(v, float): return (6, struct.pack("<f", v)) if not math.isfinite(v) or abs(v) < 3e38 else (12, struct.pack("<d", v))
  if isinstance(v, str): return 8, _gstr(v)
  items = [gguf_value(x) for x in v]
  return 9, struct.pack("<IQ", items[0][0] if items else 8, len(items)) + b"".join(b for _, b in items)

def gguf_bytes(kv: dict, tensors: list[tuple[str, tuple, int, int]], data: bytes, align: int = 32,
               n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
  """A GGUF v3 file: `tensors` as (name, row-major shape, ggml type, offset into the data), then `data` at `align`."""
  head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv)
  for key, v in kv.items():
    typ, b = gguf_value(v)
    head += _gstr(key) + struct.pack("<I", typ) + b
  for name, shape, typ, off in tensors:
    head += _gstr(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *reversed(shape)) + struct.pack("<IQ", typ, off)
  return head + bytes(-len(head) % align) + data

def gguf_parts(path: pathlib.Path) -> tuple[dict, list, bytes]:
  """A GGUF file (written by gguf-py) taken apart into (kv, tensors, data) for gguf_bytes."""
  import gguf
  r = gguf.GGUFReader(str(path))
  kv = {}
  for name, field in r.fields.items():
    if name.startswith("GGUF."): continue
    v = field.contents()
    kv[name] = float(v) if field.types[0] in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64) else v
  start = min(int(t.data_offset) for t in r.tensors)
  tensors = [(t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), int(t.data_offset) - start) for t in r.tensors]
  return kv, tensors, path.read_bytes()[start:]

@pytest.fixture(scope="module")
def gguf_src(tmp_path_factory) -> tuple[dict, list, bytes]:
  return gguf_parts(write_gguf(hf_model("gqa_tied"), tmp_path_factory.mktemp("gguf") / "m.gguf", "Q8_0"))

def write_gguf_parts(path: pathlib.Path, kv: dict, tensors: list, data: bytes, **kw) -> pathlib.Path:
  path.write_bytes(gguf_bytes(kv, tensors, data, **kw))
  return path

def test_rebuilt_gguf_loads(gguf_src, tmp_path):
  ckpt = open_checkpoint(write_gguf_parts(tmp_path / "m.gguf", *gguf_src))
  check_weights(ckpt)
  assert ckpt.config.n_layers == 3

@pytest.mark.parametrize("key,value,match", [
  ("llama.block_count", 2**40, r"llama\.block_count is 1099511627776, but the checkpoint holds only 29 tensors"),
  ("llama.attention.head_count", 0, r"llama\.attention\.head_count must be positive, got 0"),
  ("llama.attention.head_count", None, r"missing key 'llama\.attention\.head_count'"),
  ("llama.embedding_length", None, r"missing key 'llama\.embedding_length'"),
  ("llama.attention.head_count", "4", r"llama\.attention\.head_count must be an integer, got '4'"),
  ("llama.attention.head_count_kv", 0, r"llama\.attention\.head_count_kv must be positive"),
  ("llama.rope.freq_base", math.nan, r"llama\.rope\.freq_base must be finite, got nan"),
  ("llama.rope.freq_base", math.inf, r"llama\.rope\.freq_base must be finite, got inf"),
  ("llama.attention.layer_norm_rms_epsilon", -1.0, r"llama\.attention\.layer_norm_rms_epsilon must be positive"),
  ("llama.feed_forward_length", 0, r"llama\.feed_forward_length must be positive"),
  ("general.alignment", 0, r"general\.alignment must be a power of two, got 0"),
  ("general.alignment", 24, r"general\.alignment must be a power of two, got 24"),
])
def test_gguf_bad_metadata(gguf_src, tmp_path, key, value, match):
  kv, tensors, data = gguf_src
  kv = {k: v for k, v in kv.items() if k != key} | ({} if value is None else {key: value})
  refused(write_gguf_parts(tmp_path / "m.gguf", kv, tensors, data), r"m\.gguf: " + match)

def test_gguf_tokens_not_an_array(gguf_src, tmp_path):
  kv, tensors, data = gguf_src
  kv = {k: v for k, v in kv.items() if k != "llama.vocab_size"} | {"tokenizer.ggml.tokens": 5}
  refused(write_gguf_parts(tmp_path / "m.gguf", kv, tensors, data), r"m\.gguf: tokenizer\.ggml\.tokens must be an array")

def test_gguf_deeply_nested_arrays(gguf_src, tmp_path):
  kv, tensors, data = gguf_src
  nested = b"".join(struct.pack("<IQ", 9, 1) for _ in range(100_000)) + struct.pack("<IQ", 4, 0)
  refused(write_gguf_parts(tmp_path / "m.gguf", {**kv, "evil": Raw(9, nested)}, tensors, data), r"m\.gguf: corrupt GGUF header \(arrays nested")

def test_gguf_metadata_arrays_bounded(gguf_src, tmp_path):
  """5 MB of uint8 array items would be a 40 MB Python list (and 8x that for any file): refused past 4M items."""
  kv, tensors, data = gguf_src
  huge = Raw(9, struct.pack("<IQ", 0, 5 << 20) + bytes(5 << 20))
  refused(write_gguf_parts(tmp_path / "m.gguf", {**kv, "evil": huge}, tensors, data), r"m\.gguf: corrupt GGUF header \(metadata arrays of over")

def test_gguf_overlapping_tensors(gguf_src, tmp_path):
  kv, tensors, data = gguf_src
  offsets = {name: off for name, _, _, off in tensors}
  tensors = [(n, s, t, offsets["blk.0.attn_q.weight"] if n == "blk.0.attn_k.weight" else o) for n, s, t, o in tensors]
  refused(write_gguf_parts(tmp_path / "m.gguf", kv, tensors, data), r"m\.gguf: tensors blk\.0\.attn_[qk]\.weight and blk\.0\.attn_[qk]\.weight overlap")

def test_gguf_tensor_named_twice(gguf_src, tmp_path):
  kv, tensors, data = gguf_src
  tensors = tensors + [tensors[-1]]
  refused(write_gguf_parts(tmp_path / "m.gguf", kv, tensors, data), r"m\.gguf: tensor blk\.2\.\S+ appears twice")

def test_gguf_nan_norm(gguf_src, tmp_path):
  kv, tensors, data = gguf_src
  off = next(o for n, _, _, o in tensors if n == "output_norm.weight")
  data = data[:off] + struct.pack("<f", math.nan) + data[off + 4:]
  refused(write_gguf_parts(tmp_path / "m.gguf", kv, tensors, data), r"m\.gguf: tensor model\.norm\.weight holds NaN or infinite values")

def test_gguf_nan_rope_factor(tmp_path):
  kv, tensors, data = gguf_parts(write_gguf(hf_model("gqa_rope_llama3"), tmp_path / "src.gguf", "F32"))
  off = next(o for n, _, _, o in tensors if n == "rope_freqs.weight")
  data = data[:off] + struct.pack("<f", math.inf) + data[off + 4:]
  refused(write_gguf_parts(tmp_path / "m.gguf", kv, tensors, data), r"m\.gguf: rope_freqs\.weight holds a factor that is not finite")

def test_gguf_metadata_is_read_without_the_tensor_data(gguf_src, tmp_path):
  from tg_llama.formats.gguf import metadata_only
  kv, tensors, data = gguf_src
  f = write_gguf_parts(tmp_path / "m.gguf", kv, tensors + [("big", (64, 1 << 20), 0, len(data))], data + bytes(256 << 20))
  tracemalloc.start()
  try:
    out = metadata_only(f)
    peak = tracemalloc.get_traced_memory()[1]
  finally: tracemalloc.stop()
  assert len(out) < 100_000 and peak < 16 << 20, f"metadata_only held {peak} bytes for a {len(out)}-byte header"

# ---- HF: config.json, the index and safetensors headers ----

@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> pathlib.Path: return write_hf(hf_model("mha"), tmp_path_factory.mktemp("hf") / "hf")

@pytest.fixture
def hf_dir(hf_src, tmp_path) -> pathlib.Path:
  import shutil
  return pathlib.Path(shutil.copytree(hf_src, tmp_path / "hf"))

def edit_json(path: pathlib.Path, **changes):
  d = json.loads(path.read_text())
  for k, v in changes.items():
    if v is None: d.pop(k, None)
    else: d[k] = v
  path.write_text(json.dumps(d))

def edit_safetensors(f: pathlib.Path, edit):
  """Rewrite the JSON header of a safetensors file through `edit(header)`; the data stays as it was."""
  data = f.read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  header = json.loads(data[8:8 + n])
  edit(header)
  blob = json.dumps(header).encode()
  f.write_bytes(struct.pack("<Q", len(blob + b" " * (-len(blob) % 8))) + blob + b" " * (-len(blob) % 8) + data[8 + n:])

@pytest.mark.parametrize("changes,match", [
  ({"num_hidden_layers": 10**12}, r"num_hidden_layers is 1000000000000, but the checkpoint holds only 30 tensors"),
  ({"hidden_size": None}, r"config\.json: missing key 'hidden_size'"),
  ({"hidden_size": "64"}, r"config\.json: hidden_size must be an integer, got '64'"),
  ({"num_attention_heads": 0}, r"config\.json: num_attention_heads must be positive, got 0"),
  ({"intermediate_size": -192}, r"config\.json: intermediate_size must be positive"),
  ({"rope_theta": math.nan}, r"config\.json: rope_theta must be finite, got nan"),
  ({"rms_norm_eps": math.inf}, r"config\.json: rms_norm_eps must be finite"),
  ({"rope_scaling": {"rope_type": "llama3", "factor": math.nan, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}}, r"config\.json: factor must be finite"),
  ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}}, r"config\.json: rope scaling high_freq_factor 4\.0 must exceed"),
  ({"rope_scaling": [1, 2]}, r"config\.json: rope_scaling must be a JSON object"),
  ({"tie_word_embeddings": "yes"}, r"config\.json: tie_word_embeddings must be true or false"),
  ({"eos_token_id": [2, "x"]}, r"config\.json: eos_token_id must be an integer"),
  ({"model_type": ["llama"]}, r"config\.json: unsupported architecture"),
])
def test_hf_bad_config(hf_dir, changes, match):
  edit_json(hf_dir / "config.json", **changes)
  with bounded(), pytest.raises(TgLlamaError, match=match): check_weights(open_checkpoint(hf_dir))

@pytest.mark.parametrize("text,match", [("[1, 2]", r"config\.json: must hold a JSON object, not a list"),
                                        ("[" * 100_000 + "]" * 100_000, r"config\.json: not valid JSON \(nested too deep\)")])
def test_hf_config_not_an_object(hf_dir, text, match):
  (hf_dir / "config.json").write_text(text)
  refused(hf_dir, match)

def test_hf_missing_lm_head_is_not_silently_tied(hf_dir):
  f = hf_dir / "model.safetensors"
  edit_safetensors(f, lambda h: h.pop("lm_head.weight"))
  refused(hf_dir, r"hf: missing tensor lm_head\.weight, and config\.json's tie_word_embeddings is not true")

def _set(name: str, **fields):
  return lambda h: h[name].update(fields)

@pytest.mark.parametrize("edit,match", [
  (_set("model.norm.weight", shape=["a", 250_000_000, 8]), r"tensor model\.norm\.weight has a bad shape \['a', 250000000, 8\]"),
  (_set("model.norm.weight", data_offsets=[-256, 0]), r"tensor model\.norm\.weight has bad data_offsets \[-256, 0\]"),
  (_set("model.norm.weight", data_offsets=[256, 0]), r"tensor model\.norm\.weight has bad data_offsets \[256, 0\]"),
  (_set("model.norm.weight", data_offsets=[0.5, 256.5]), r"tensor model\.norm\.weight has bad data_offsets"),
  (_set("model.norm.weight", dtype="I32"), r"tensor model\.norm\.weight is stored as int; a weight must be a float type"),
  (_set("model.norm.weight", dtype="BOOL", shape=[256]), r"tensor model\.norm\.weight is stored as bool"),
  (_set("model.norm.weight", dtype=["F32"]), r"tensor model\.norm\.weight has unsupported dtype \['F32'\]"),
  (lambda h: h.__setitem__("model.norm.weight", [1, 2]), r"tensor model\.norm\.weight: header entry is not a JSON object"),
])
def test_safetensors_bad_header(hf_dir, edit, match):
  edit_safetensors(hf_dir / "model.safetensors", edit)
  refused(hf_dir, r"(model\.safetensors|hf): " + match)

def test_safetensors_overlapping_tensors(hf_dir):
  def edit(h): h["model.layers.0.input_layernorm.weight"]["data_offsets"] = h["model.layers.0.post_attention_layernorm.weight"]["data_offsets"]
  edit_safetensors(hf_dir / "model.safetensors", edit)
  refused(hf_dir, r"model\.safetensors: tensors model\.layers\.0\.\S+ and model\.layers\.0\.\S+ overlap in the file")

def test_safetensors_nan_norm(hf_dir):
  f = hf_dir / "model.safetensors"
  data = bytearray(f.read_bytes())
  n = struct.unpack("<Q", data[:8])[0]
  begin = json.loads(data[8:8 + n])["model.layers.1.input_layernorm.weight"]["data_offsets"][0]
  data[8 + n + begin:8 + n + begin + 4] = struct.pack("<f", math.nan)
  f.write_bytes(bytes(data))
  refused(hf_dir, r"(model\.safetensors|hf): tensor model\.layers\.1\.input_layernorm\.weight holds NaN or infinite values")

@pytest.fixture
def sharded(tmp_path) -> pathlib.Path: return write_hf(hf_model("mha"), tmp_path / "hf", max_shard_size="100KB")

@pytest.mark.parametrize("where", ["../outside.safetensors", "ABSOLUTE", ["x"]])
def test_index_points_outside_the_checkpoint(sharded, where):
  index = sharded / "model.safetensors.index.json"
  d = json.loads(index.read_text())
  name = next(iter(d["weight_map"]))
  shard = sharded / d["weight_map"][name]
  if where == "ABSOLUTE": where = str(shard)  # a real file, just not named relative to the checkpoint
  elif isinstance(where, str): shard.rename(sharded.parent / "outside.safetensors")  # the shard, moved out: it would load
  d["weight_map"] = {n: (where if f == d["weight_map"][name] else f) for n, f in d["weight_map"].items()}
  index.write_text(json.dumps(d))
  refused(sharded, r"model\.safetensors\.index\.json: weight_map names .* which is not a file inside")

@pytest.mark.parametrize("text", ["[]", '{"weight_map": [1]}', '{"weight_map": {}}'])
def test_index_not_an_object(sharded, text):
  (sharded / "model.safetensors.index.json").write_text(text)
  refused(sharded, r"model\.safetensors\.index\.json: (must hold a JSON object|weight_map must be a non-empty JSON object)")

def test_tensor_in_two_shards(sharded):
  from safetensors.numpy import load_file, save_file
  files = sorted(sharded.glob("model-*.safetensors"))
  first, last = load_file(files[0]), load_file(files[-1])
  save_file({**last, next(iter(first)): next(iter(first.values()))}, files[-1])
  refused(sharded, r"model-\S+\.safetensors: tensor \S+ is also in another shard")

# ---- Meta: params.json and the pickle inside the .pth zip ----

class _Storage:
  def __init__(self, key: str, kind: str, numel: int): self.key, self.kind, self.numel = key, kind, numel

class _TensorRef:
  """Pickles as torch does: torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())."""
  def __init__(self, storage, offset, shape, stride): self.args = (storage, offset, shape, stride, False, collections.OrderedDict())
  def __reduce__(self): return (torch._utils._rebuild_tensor_v2, self.args)

class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel) if isinstance(obj, _Storage) else None

def pth_bytes(tensors: dict[str, np.ndarray], fields: dict[str, dict] | None = None, pickle_bytes: bytes | None = None,
              compress_pickle: bool = False) -> bytes:
  """A torch.save-style zip (archive/data.pkl + archive/data/N) of float32 `tensors`; `fields` overrides a tensor's
  pickled offset/shape/stride/kind (any Python values), `pickle_bytes` the whole pickle."""
  state, fields = collections.OrderedDict(), fields or {}
  for i, (name, a) in enumerate(tensors.items()):
    f = {"offset": 0, "shape": tuple(a.shape), "stride": tuple(int(s) // 4 for s in a.strides), "kind": "FloatStorage", **fields.get(name, {})}
    state[name] = _TensorRef(_Storage(str(i), f["kind"], a.size), f["offset"], f["shape"], f["stride"])
  if pickle_bytes is None:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    pickle_bytes = buf.getvalue()
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as z:
    z.writestr(zipfile.ZipInfo("archive/data.pkl"), pickle_bytes, zipfile.ZIP_DEFLATED if compress_pickle else zipfile.ZIP_STORED)
    for i, a in enumerate(tensors.values()): z.writestr(zipfile.ZipInfo(f"archive/data/{i}"), np.ascontiguousarray(a, np.float32).tobytes())
  return out.getvalue()

@pytest.fixture(scope="module")
def meta_src(tmp_path_factory) -> tuple[dict, dict[str, np.ndarray]]:
  path = write_meta(hf_model("mha"), tmp_path_factory.mktemp("meta") / "meta", n_shards=1)
  sd = torch.load(path / "consolidated.00.pth")
  return json.loads((path / "params.json").read_text()), {k: v.float().numpy() for k, v in sd.items()}

def write_meta_parts(path: pathlib.Path, params, tensors: dict, **kw) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  (path / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
  (path / "consolidated.00.pth").write_bytes(pth_bytes(tensors, **kw))
  return path

def test_rebuilt_pth_loads(meta_src, tmp_path):
  ckpt = open_checkpoint(write_meta_parts(tmp_path / "meta", *meta_src))
  check_weights(ckpt)
  np.testing.assert_array_equal(ckpt.tensors["model.norm.weight"]("CPU").numpy(), meta_src[1]["norm.weight"])

@pytest.mark.parametrize("changes,match", [
  ({"n_layers": 10**12}, r"params\.json: n_layers is 1000000000000, but the checkpoint holds only 30 tensors"),
  ({"dim": None}, r"params\.json: missing key 'dim'"),
  ({"n_heads": 0}, r"params\.json: n_heads must be positive, got 0"),
  ({"n_heads": 4.5}, r"params\.json: n_heads must be an integer, got 4\.5"),
  ({"norm_eps": math.nan}, r"params\.json: norm_eps must be finite"),
  ({"ffn_dim_multiplier": 1e308}, r"params\.json: ffn_dim_multiplier 1e\+308 makes an infinite feed-forward size"),
  ({"multiple_of": 0}, r"params\.json: multiple_of must be positive"),
])
def test_meta_bad_params(meta_src, tmp_path, changes, match):
  params, tensors = meta_src
  params = {k: v for k, v in {**params, **changes}.items() if v is not None}
  refused(write_meta_parts(tmp_path / "meta", params, tensors), match)

@pytest.mark.parametrize("text", ["[1]", "[" * 100_000 + "]" * 100_000])
def test_meta_params_not_an_object(meta_src, tmp_path, text):
  refused(write_meta_parts(tmp_path / "meta", text, meta_src[1]), r"params\.json: (must hold a JSON object|not valid JSON)")

@pytest.mark.parametrize("fields,match", [
  ({"offset": -16}, r"corrupt pickle \(UnpicklingError: bad tensor stride or offset\)"),
  ({"shape": ("a", 250_000_000, 8)}, r"corrupt pickle \(UnpicklingError: bad tensor shape\)"),
  ({"shape": (64,) * 9, "stride": (1,) * 9}, r"corrupt pickle \(UnpicklingError: bad tensor shape\)"),
  ({"stride": (1, 1)}, r"corrupt pickle \(UnpicklingError: bad tensor stride or offset\)"),
  ({"kind": "IntStorage"}, r"tensor norm\.weight is stored as int; a weight must be a float type"),
])
def test_pth_bad_tensor_fields(meta_src, tmp_path, fields, match):
  params, tensors = meta_src
  refused(write_meta_parts(tmp_path / "meta", params, tensors, fields={"norm.weight": fields}), r"(consolidated\.00\.pth|meta): " + match)

# a pickle that claims a 4 GB bytes object: CPython's unpickler allocates it before finding the data missing
HUGE_PICKLE = b"\x80\x04\x8e" + struct.pack("<Q", 4 << 30) + b"abc."

@pytest.mark.parametrize("compress", [False, True])
def test_pth_pickle_claiming_gigabytes(meta_src, tmp_path, compress):
  params, tensors = meta_src
  path = write_meta_parts(tmp_path / "meta", params, tensors, pickle_bytes=HUGE_PICKLE, compress_pickle=compress)
  refused(path, r"consolidated\.00\.pth: (corrupt pickle|data\.pkl is compressed)")

def test_pth_compressed_pickle(meta_src, tmp_path):
  """torch stores data.pkl uncompressed; a deflated one could inflate 1000:1, so it is refused unread."""
  path = write_meta_parts(tmp_path / "meta", *meta_src, compress_pickle=True)
  refused(path, r"consolidated\.00\.pth: data\.pkl is compressed; torch never writes that")
