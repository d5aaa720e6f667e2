"""GGUF reader: the header is parsed here (with errors that name the file), the tensor data stays on disk
as tinygrad disk tensors, and the ggml blocks are decoded by tinygrad's own `ggml_data_to_tensor`.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3)."""
from __future__ import annotations
import mmap, pathlib, struct
from dataclasses import dataclass
from tinygrad import Tensor
from tinygrad.llm.gguf import ggml_data_to_tensor
from tg_llama.errors import CheckpointError, UnsupportedModelError

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144),
              13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}

# the others, named for the error message
OTHER_GGML_TYPES = {10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
                    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

@dataclass(frozen=True)
class GGUFTensorInfo:
  name: str
  shape: tuple[int, ...]  # in row-major (numpy) order: ggml's dims reversed
  ggml_type: int
  offset: int             # absolute byte offset in the file
  nbytes: int

class _Reader:
  def __init__(self, buf, path):
    self.buf, self.pos, self.path = buf, 0, path
  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.buf): raise CheckpointError(f"{self.path}: truncated GGUF header (needs byte {self.pos+n}, file has {len(self.buf)})")
    b = self.buf[self.pos:self.pos+n]
    self.pos += n
    return b
  def scalar(self, fmt: str): return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
  def string(self) -> str:
    n = self.scalar("<Q")
    if n > len(self.buf): raise CheckpointError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
    return self.take(n).decode("utf-8", errors="replace")
  def value(self, typ: int):
    if typ in _SCALARS: return self.scalar(_SCALARS[typ])
    if typ == 8: return self.string()
    if typ == 9:
      item_typ, n = self.scalar("<I"), self.scalar("<Q")
      if item_typ in _SCALARS:  # fast path for the big arrays (token scores, token types)
        fmt = _SCALARS[item_typ]
        return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt))))
      return [self.value(item_typ) for _ in range(n)]
    raise CheckpointError(f"{self.path}: corrupt GGUF header (unknown value type {typ})")

def _parse(path: pathlib.Path) -> tuple[dict, list[GGUFTensorInfo]]:
  if not path.is_file(): raise CheckpointError(f"{path}: no such file")
  with open(path, "rb") as f:
    size = path.stat().st_size
    if size < 24: raise CheckpointError(f"{path}: too small to be a GGUF file ({size} bytes)")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      r = _Reader(buf, path)
      if (magic := r.take(4)) != b"GGUF": raise CheckpointError(f"{path}: not a GGUF file (bad magic {magic!r})")
      if (version := r.scalar("<I")) not in (2, 3): raise CheckpointError(f"{path}: unsupported GGUF version {version}")
      n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
      kv = {}
      for _ in range(n_kv):
        key, typ = r.string(), r.scalar("<I")
        kv[key] = r.value(typ)
      raw = []
      for _ in range(n_tensors):
        name, ndim = r.string(), r.scalar("<I")
        dims = tuple(r.scalar("<Q") for _ in range(ndim))
        raw.append((name, tuple(reversed(dims)), r.scalar("<I"), r.scalar("<Q")))
      align = kv.get("general.alignment", 32)
      data_start = (r.pos + align - 1) // align * align
  infos = []
  for name, shape, typ, off in raw:
    n = 1
    for d in shape: n *= d
    if typ not in GGML_TYPES:
      raise UnsupportedModelError(f"{path}: tensor {name} has GGML type {OTHER_GGML_TYPES.get(typ, typ)}, which tg-llama does not read "
                                  f"(supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
    _, block, block_bytes = GGML_TYPES[typ]
    info = GGUFTensorInfo(name, shape, typ, data_start + off, n // block * block_bytes)
    if info.offset + info.nbytes > size:
      raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {info.offset + info.nbytes}, the file has {size}")
    infos.append(info)
  return kv, infos

def metadata_only(path: str | pathlib.Path) -> bytes:
  """A valid GGUF file holding `path`'s metadata (tokenizer, chat template, hyperparameters) and no tensors."""
  path = pathlib.Path(path)
  _parse(path)  # validate first
  with open(path, "rb") as f:
    head = f.read(24)
    r = _Reader(f.read(), path)  # the rest, to walk the key-values
  n_kv = struct.unpack("<Q", head[16:24])[0]
  for _ in range(n_kv):
    r.string()
    r.value(r.scalar("<I"))
  return head[:8] + struct.pack("<Q", 0) + head[16:24] + r.buf[:r.pos]

def read_metadata(path: str | pathlib.Path) -> dict:
  """The GGUF key-value metadata (architecture, hyperparameters, tokenizer) without touching tensor data."""
  return _parse(pathlib.Path(path))[0]

def read_gguf(path: str | pathlib.Path) -> tuple[dict, dict[str, GGUFTensorInfo], Tensor]:
  """Metadata, the tensor index, and the whole file as a disk tensor to slice blocks from."""
  path = pathlib.Path(path)
  kv, infos = _parse(path)
  return kv, {i.name: i for i in infos}, Tensor(path)

def ggml_type_name(typ: int) -> str: return GGML_TYPES[typ][0]

def load_tensor(disk: Tensor, info: GGUFTensorInfo, device: str) -> Tensor:
  """Decode one tensor to float (lazily): the raw blocks are copied to `device` and decoded there."""
  n = 1
  for d in info.shape: n *= d
  raw = disk[info.offset:info.offset + info.nbytes].to(device)
  return ggml_data_to_tensor(raw, n, info.ggml_type).reshape(info.shape)
