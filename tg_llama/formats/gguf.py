"""GGUF reader: the header is parsed here (with errors that name the file), the tensor data stays on disk
as tinygrad disk tensors, and the ggml blocks are decoded by tinygrad's own `ggml_data_to_tensor`.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3)."""
from __future__ import annotations
import math, mmap, pathlib, struct
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

# the fewest bytes one item of each value type takes, so a count can be checked against the bytes left before looping
_MIN_BYTES = {**{t: struct.calcsize(f) for t, f in _SCALARS.items()}, 8: 8, 9: 12}
MAX_NESTING = 4          # arrays of arrays: llama.cpp writes none; the bound keeps a hostile file from recursing
MAX_DIMS = 4             # GGML_MAX_DIMS
MAX_ARRAY_ITEMS = 1 << 22  # all arrays together (Llama 3 tokenizer: 537k items); as Python lists they cost 8-30x their bytes
MAX_TENSORS = 1 << 16      # Llama 3.1 405B has 1,140

class _Reader:
  def __init__(self, buf, path):
    self.buf, self.pos, self.path, self.items_left = buf, 0, path, MAX_ARRAY_ITEMS
  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.buf): raise CheckpointError(f"{self.path}: truncated GGUF header (needs byte {self.pos+n}, file has {len(self.buf)})")
    b = self.buf[self.pos:self.pos+n]
    self.pos += n
    return b
  def scalar(self, fmt: str): return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
  def count(self, n: int, item_bytes: int, what: str) -> int:
    """A count read from the file, refused when its items cannot fit in the bytes that are left."""
    if n * item_bytes > len(self.buf) - self.pos:
      raise CheckpointError(f"{self.path}: corrupt GGUF header ({what} of {n} items at byte {self.pos}, the file has {len(self.buf)} bytes)")
    return n
  def string(self) -> str:
    n = self.count(self.scalar("<Q"), 1, "string")
    return self.take(n).decode("utf-8", errors="replace")
  def value(self, typ: int, depth: int = 0):
    if typ in _SCALARS: return self.scalar(_SCALARS[typ])
    if typ == 8: return self.string()
    if typ == 9:
      if depth >= MAX_NESTING: raise CheckpointError(f"{self.path}: corrupt GGUF header (arrays nested over {MAX_NESTING} deep)")
      item_typ, n = self.scalar("<I"), self.scalar("<Q")
      if item_typ not in _MIN_BYTES: raise CheckpointError(f"{self.path}: corrupt GGUF header (unknown array item type {item_typ})")
      self.count(n, _MIN_BYTES[item_typ], "array")
      self.items_left -= n
      if self.items_left < 0:
        raise CheckpointError(f"{self.path}: corrupt GGUF header (metadata arrays of over {MAX_ARRAY_ITEMS} items in all)")
      if item_typ in _SCALARS:  # fast path for the big arrays (token scores, token types)
        fmt = _SCALARS[item_typ]
        return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt))))
      return [self.value(item_typ, depth + 1) for _ in range(n)]
    raise CheckpointError(f"{self.path}: corrupt GGUF header (unknown value type {typ})")

def _header(r: _Reader) -> tuple[dict, list, int]:
  """The key-values, the raw tensor index (name, shape, type, offset) and where the key-values end."""
  if (magic := r.take(4)) != b"GGUF": raise CheckpointError(f"{r.path}: not a GGUF file (bad magic {magic!r})")
  if (version := r.scalar("<I")) not in (2, 3): raise CheckpointError(f"{r.path}: unsupported GGUF version {version}")
  n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
  r.count(n_kv, 8 + 4 + 1, "key-value list")  # key length, value type, the smallest value
  kv = {}
  for _ in range(n_kv):
    key, typ = r.string(), r.scalar("<I")
    if key in kv: raise CheckpointError(f"{r.path}: corrupt GGUF header (key {key} appears twice)")
    kv[key] = r.value(typ)
  kv_end = r.pos
  r.count(n_tensors, 8 + 4 + 4 + 8, "tensor list")  # name length, dims count, type, offset
  if n_tensors > MAX_TENSORS: raise CheckpointError(f"{r.path}: corrupt GGUF header ({n_tensors} tensors; a Llama has a few thousand at most)")
  raw = []
  for _ in range(n_tensors):
    name, ndim = r.string(), r.scalar("<I")
    if not 1 <= ndim <= MAX_DIMS: raise CheckpointError(f"{r.path}: tensor {name} has {ndim} dimensions (GGUF allows 1 to {MAX_DIMS})")
    dims = tuple(r.scalar("<Q") for _ in range(ndim))
    raw.append((name, tuple(reversed(dims)), r.scalar("<I"), r.scalar("<Q")))
  return kv, raw, kv_end

def _alignment(kv: dict, path) -> int:
  align = kv.get("general.alignment", 32)
  if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
    raise CheckpointError(f"{path}: general.alignment must be a power of two, got {align!r}")
  return align

def _parse(path: pathlib.Path) -> tuple[dict, list[GGUFTensorInfo], int]:
  """Metadata, tensor index and where the key-values end; every offset checked against the file's size."""
  if not path.is_file(): raise CheckpointError(f"{path}: no such file")
  with open(path, "rb") as f:
    size = path.stat().st_size
    if size < 24: raise CheckpointError(f"{path}: too small to be a GGUF file ({size} bytes)")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      r = _Reader(buf, path)
      kv, raw, kv_end = _header(r)
      align = _alignment(kv, path)
      data_start = (r.pos + align - 1) // align * align
  infos, names = [], set()
  for name, shape, typ, off in raw:
    if name in names: raise CheckpointError(f"{path}: tensor {name} appears twice")
    names.add(name)
    if typ not in GGML_TYPES:
      raise UnsupportedModelError(f"{path}: tensor {name} has GGML type {OTHER_GGML_TYPES.get(typ, typ)}, which tg-llama does not read "
                                  f"(supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
    type_name, block, block_bytes = GGML_TYPES[typ]
    if shape[-1] % block: raise CheckpointError(f"{path}: tensor {name} has rows of {shape[-1]}, not a multiple of {type_name}'s block of {block}")
    if off % align: raise CheckpointError(f"{path}: tensor {name} at offset {off} is not aligned to {align} bytes")
    info = GGUFTensorInfo(name, shape, typ, data_start + off, math.prod(shape) // block * block_bytes)
    if info.offset + info.nbytes > size:
      raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {info.offset + info.nbytes}, the file has {size}")
    infos.append(info)
  for a, b in zip(ordered := sorted(infos, key=lambda i: i.offset), ordered[1:]):
    if b.offset < a.offset + a.nbytes: raise CheckpointError(f"{path}: tensors {a.name} and {b.name} overlap in the file")
  return kv, infos, kv_end

def metadata_only(path: str | pathlib.Path) -> bytes:
  """A valid GGUF file holding `path`'s metadata (tokenizer, chat template, hyperparameters) and no tensors."""
  path = pathlib.Path(path)
  _, _, kv_end = _parse(path)  # validates, and finds where the key-values end
  with open(path, "rb") as f: head = f.read(kv_end)
  return head[:8] + struct.pack("<Q", 0) + head[16:]

def read_metadata(path: str | pathlib.Path) -> dict:
  """The GGUF key-value metadata (architecture, hyperparameters, tokenizer) without touching tensor data."""
  return _parse(pathlib.Path(path))[0]

def read_gguf(path: str | pathlib.Path) -> tuple[dict, dict[str, GGUFTensorInfo], Tensor]:
  """Metadata, the tensor index, and the whole file as a disk tensor to slice blocks from."""
  path = pathlib.Path(path)
  kv, infos, _ = _parse(path)
  return kv, {i.name: i for i in infos}, Tensor(path)

def ggml_type_name(typ: int) -> str: return GGML_TYPES[typ][0]

def load_tensor(disk: Tensor, info: GGUFTensorInfo, device: str) -> Tensor:
  """Decode one tensor to float (lazily): the raw blocks are copied to `device` and decoded there."""
  raw = disk[info.offset:info.offset + info.nbytes].to(device)
  return ggml_data_to_tensor(raw, math.prod(info.shape), info.ggml_type).reshape(info.shape)
