"""safetensors files as lazy tinygrad disk tensors, with the header checked against the file's size."""
from __future__ import annotations
import json, math, pathlib, struct
from tinygrad import Tensor, dtypes
from tg_llama.errors import CheckpointError

DTYPES = {"F32": dtypes.float32, "F16": dtypes.float16, "BF16": dtypes.bfloat16, "F64": dtypes.float64,
          "I64": dtypes.int64, "I32": dtypes.int32, "I16": dtypes.int16, "I8": dtypes.int8, "U8": dtypes.uint8, "BOOL": dtypes.bool}

MAX_DIMS = 8

def read_header(path: pathlib.Path) -> tuple[dict, int]:
  """The JSON header (tensor name -> dtype, shape, data_offsets) and where the data starts. Every entry is checked
  (types, dtype, shape against its bytes, bounds, no two tensors overlapping) before anything sized by it is made."""
  if not path.is_file(): raise CheckpointError(f"{path}: no such file")
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8: raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
    n = struct.unpack("<Q", head)[0]
    if n > size - 8 or n > 100_000_000: raise CheckpointError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file of {size})")
    try: header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e: raise CheckpointError(f"{path}: corrupt safetensors header ({str(e)[:200]})") from None
  if not isinstance(header, dict): raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  header.pop("__metadata__", None)
  for name, info in header.items(): _check_entry(path, name, info, size - 8 - n)
  spans = sorted((info["data_offsets"], name) for name, info in header.items())
  for ((_, end), a), ((begin, _), b) in zip(spans, spans[1:]):
    if begin < end: raise CheckpointError(f"{path}: tensors {a} and {b} overlap in the file")
  return header, 8 + n

def _no_duplicates(pairs: list) -> dict:
  """JSON keeps the last of two equal keys; two tensors of one name in a header is a corrupt file."""
  if len(out := dict(pairs)) != len(pairs):
    seen = set()
    raise ValueError(f"a key appears twice: {next(k for k, _ in pairs if k in seen or seen.add(k))[:100]}")
  return out

def _is_int(v) -> bool: return isinstance(v, int) and not isinstance(v, bool) and v >= 0

def _check_entry(path: pathlib.Path, name: str, info, data_size: int):
  if not isinstance(info, dict): raise CheckpointError(f"{path}: tensor {name}: header entry is not a JSON object")
  if not isinstance(dtype := info.get("dtype"), str) or dtype not in DTYPES:
    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype!r}"[:300])
  shape, offsets = info.get("shape"), info.get("data_offsets")
  if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) for d in shape):
    raise CheckpointError(f"{path}: tensor {name} has a bad shape {shape!r} (a list of up to {MAX_DIMS} non-negative integers)"[:300])
  if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets) or offsets[0] > offsets[1]:
    raise CheckpointError(f"{path}: tensor {name} has bad data_offsets {offsets!r} (two integers, 0 <= begin <= end)"[:300])
  begin, end = offsets
  if end > data_size: raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {end} of the data, which has {data_size}")
  if end - begin != (nbytes := DTYPES[dtype].itemsize * math.prod(shape)):
    raise CheckpointError(f"{path}: corrupt: tensor {name} has {end - begin} bytes for shape {shape} ({nbytes} bytes)")

def load_safetensors(path: str | pathlib.Path) -> dict[str, Tensor]:
  """Every tensor of the file, lazily: nothing is read until a tensor is realized."""
  path = pathlib.Path(path)
  header, start = read_header(path)
  disk = Tensor(path)
  out = {}
  for name, info in header.items():
    begin, end = info["data_offsets"]
    t = disk[start + begin:start + end]
    out[name] = (t.bitcast(DTYPES[info["dtype"]]) if end > begin else Tensor.empty(0, dtype=DTYPES[info["dtype"]])).reshape(info["shape"])
  return out
