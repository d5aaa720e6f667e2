"""safetensors files as lazy tinygrad disk tensors, with the header checked against the file's size."""
from __future__ import annotations
import json, pathlib, struct
from tinygrad import Tensor, dtypes
from tg_llama.errors import CheckpointError

DTYPES = {"F32": dtypes.float32, "F16": dtypes.float16, "BF16": dtypes.bfloat16, "F64": dtypes.float64,
          "I64": dtypes.int64, "I32": dtypes.int32, "I16": dtypes.int16, "I8": dtypes.int8, "U8": dtypes.uint8, "BOOL": dtypes.bool}

def read_header(path: pathlib.Path) -> tuple[dict, int]:
  """The JSON header (tensor name -> dtype, shape, data_offsets) and where the data starts."""
  if not path.is_file(): raise CheckpointError(f"{path}: no such file")
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8: raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
    n = struct.unpack("<Q", head)[0]
    if n > size - 8 or n > 100_000_000: raise CheckpointError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file of {size})")
    try: header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e: raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict): raise CheckpointError(f"{path}: corrupt safetensors header")
  header.pop("__metadata__", None)
  for name, info in header.items():
    if info.get("dtype") not in DTYPES: raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    begin, end = info["data_offsets"]
    if 8 + n + end > size: raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {8 + n + end}, the file has {size}")
    nbytes = DTYPES[info["dtype"]].itemsize
    for d in info["shape"]: nbytes *= d
    if end - begin != nbytes: raise CheckpointError(f"{path}: corrupt: tensor {name} has {end - begin} bytes for shape {info['shape']}")
  return header, 8 + n

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
