"""Meta checkpoints: params.json + consolidated.NN.pth, one .pth per model-parallel rank.

A .pth is a pickle inside a zip. Unpickling runs whatever the pickle names, so this reader resolves
only the handful of globals a torch state dict needs and refuses anything else before it can run;
tensor data is never unpickled at all: it stays on disk, sliced as tinygrad disk tensors."""
from __future__ import annotations
import io, pathlib, pickle, pickletools, struct, zipfile, zlib
from dataclasses import dataclass
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tg_llama.errors import CheckpointError

STORAGE_DTYPES = {"FloatStorage": dtypes.float32, "HalfStorage": dtypes.float16, "BFloat16Storage": dtypes.bfloat16,
                  "DoubleStorage": dtypes.float64, "LongStorage": dtypes.int64, "IntStorage": dtypes.int32,
                  "ShortStorage": dtypes.int16, "CharStorage": dtypes.int8, "ByteStorage": dtypes.uint8, "BoolStorage": dtypes.bool}

@dataclass(frozen=True)
class _Storage:
  dtype: DType
  key: str

@dataclass(frozen=True)
class _TensorRef:
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

MAX_DIMS = 8
MAX_PICKLE_BYTES = 4 << 20  # names and shapes only, ~150 bytes a tensor (405B: ~170 kB); unpickled objects cost up to 60x their bytes

def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  # checked here, before anything is sized by them: the pickle is untrusted
  if not isinstance(storage, _Storage): raise pickle.UnpicklingError(f"a tensor's storage is {type(storage).__name__}")
  for what, v in (("shape", size), ("stride", stride)):
    if not isinstance(v, (tuple, list)) or len(v) > MAX_DIMS or not all(_is_index(d) for d in v): raise pickle.UnpicklingError(f"bad tensor {what}")
  if len(size) != len(stride) or not _is_index(storage_offset): raise pickle.UnpicklingError("bad tensor stride or offset")
  return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))

def _is_index(v) -> bool: return isinstance(v, int) and not isinstance(v, bool) and v >= 0

def _rebuild_parameter(data, requires_grad=False, backward_hooks=None): return data

class _OrderedDict(dict):
  pass

_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2, ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): _OrderedDict, **{("torch", name): name for name in STORAGE_DTYPES}}

class _SafeUnpickler(pickle.Unpickler):
  def __init__(self, f, path):
    super().__init__(f)
    self.path = path
  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise CheckpointError(f"{self.path}: refused to load: the pickle names {module}.{name}, which a torch checkpoint does not need "
                            "(it may be malicious; nothing it names was run)")
    return _ALLOWED[(module, name)]
  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], str) and pid[1] in STORAGE_DTYPES
            and isinstance(pid[2], str)):
      raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r} in the pickle"[:300])
    return _Storage(STORAGE_DTYPES[pid[1]], pid[2])

def _data_offset(f, info: zipfile.ZipInfo, path: pathlib.Path) -> int:
  f.seek(info.header_offset)
  local = f.read(30)
  if len(local) < 30 or local[:4] != b"PK\x03\x04": raise CheckpointError(f"{path}: corrupt zip entry {info.filename}"[:300])
  name_len, extra_len = struct.unpack("<HH", local[26:30])
  return info.header_offset + 30 + name_len + extra_len

def torch_load_safe(path: pathlib.Path) -> dict[str, Tensor]:
  """A torch.save'd state dict (zip format) as lazy disk tensors, without executing the pickle."""
  if not path.is_file(): raise CheckpointError(f"{path}: no such file")
  try:
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
      names = z.namelist()
      pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
      if pkl is None: raise CheckpointError(f"{path}: not a torch checkpoint (no data.pkl inside)")
      prefix = pkl[:-len("data.pkl")]
      state = _SafeUnpickler(io.BytesIO(_pickle_bytes(z, z.getinfo(pkl), path)), path).load()
      entries = {n[len(prefix) + len("data/"):]: z.getinfo(n) for n in names if n.startswith(prefix + "data/")}
      offsets = {key: (_data_offset(f, info, path), info) for key, info in entries.items()}
  except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError) as e:
    if isinstance(e, CheckpointError): raise
    raise CheckpointError(f"{path}: not a torch zip checkpoint, or truncated ({str(e)[:200]})") from None
  except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error, RecursionError) as e:
    if isinstance(e, CheckpointError): raise
    raise CheckpointError(f"{path}: corrupt pickle ({type(e).__name__}: {str(e)[:200]})") from None
  if not isinstance(state, dict): raise CheckpointError(f"{path}: the checkpoint is not a state dict")
  disk, size = Tensor(path), path.stat().st_size
  out: dict[str, Tensor] = {}
  for name, ref in state.items():
    if not isinstance(ref, _TensorRef): continue
    if not isinstance(name, str): raise CheckpointError(f"{path}: a tensor is named {name!r}, not a string"[:300])
    if ref.storage.key not in offsets: raise CheckpointError(f"{path}: tensor {name} points at missing storage {ref.storage.key}")
    start, info = offsets[ref.storage.key]
    if info.compress_type != zipfile.ZIP_STORED: raise CheckpointError(f"{path}: tensor {name} is compressed; torch never writes that")
    numel, expect = 1, []
    for d in reversed(ref.shape):
      expect.insert(0, numel)
      numel *= d
    if numel > 1 and tuple(s for s, d in zip(ref.stride, ref.shape) if d != 1) != tuple(e for e, d in zip(expect, ref.shape) if d != 1):
      raise CheckpointError(f"{path}: tensor {name} is not contiguous (stride {ref.stride}); save it with .contiguous()")
    begin = start + ref.offset * ref.storage.dtype.itemsize
    end = begin + numel * ref.storage.dtype.itemsize
    if end > size or end > start + info.file_size: raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {end}, past its data")
    out[name] = (disk[begin:end].bitcast(ref.storage.dtype) if numel else Tensor.empty(0, dtype=ref.storage.dtype)).reshape(ref.shape)
  return out

def _pickle_bytes(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: pathlib.Path) -> bytes:
  """data.pkl, read only when its size is bounded, and scanned opcode by opcode first: CPython's unpickler allocates
  a length read from the pickle (BINBYTES8 of 2**40) before it finds the data missing."""
  if info.compress_type != zipfile.ZIP_STORED: raise CheckpointError(f"{path}: data.pkl is compressed; torch never writes that")
  if info.file_size > MAX_PICKLE_BYTES: raise CheckpointError(f"{path}: data.pkl of {info.file_size} bytes is too big for a state dict")
  data = z.read(info)
  try:
    for _ in pickletools.genops(data): pass
  except ValueError as e: raise CheckpointError(f"{path}: corrupt pickle ({str(e)[:200]})") from None
  return data

def is_meta_dir(path: pathlib.Path) -> bool: return path.is_dir() and (path / "params.json").is_file()

def shard_files(path: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(path.glob("consolidated.*.pth"))
  if not files: raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth")
  return files
