"""Meta checkpoints: params.json + consolidated.NN.pth, one .pth per model-parallel rank.

A .pth is a pickle inside a zip. Unpickling runs whatever the pickle names, so this reader resolves
only the handful of globals a torch state dict needs and refuses anything else before it can run;
tensor data is never unpickled at all: it stays on disk, sliced as tinygrad disk tensors."""
from __future__ import annotations
import pathlib, pickle, struct, zipfile
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

def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))

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
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and pid[1] in STORAGE_DTYPES):
      raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
    return _Storage(STORAGE_DTYPES[pid[1]], str(pid[2]))

def _data_offset(f, info: zipfile.ZipInfo) -> int:
  f.seek(info.header_offset)
  local = f.read(30)
  if local[:4] != b"PK\x03\x04": raise CheckpointError(f"corrupt zip entry {info.filename}")
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
      state = _SafeUnpickler(z.open(pkl), path).load()
      entries = {n[len(prefix) + len("data/"):]: z.getinfo(n) for n in names if n.startswith(prefix + "data/")}
      offsets = {key: (_data_offset(f, info), info) for key, info in entries.items()}
  except zipfile.BadZipFile: raise CheckpointError(f"{path}: not a torch zip checkpoint, or truncated") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
    if isinstance(e, CheckpointError): raise
    raise CheckpointError(f"{path}: corrupt pickle ({e})") from None
  if not isinstance(state, dict): raise CheckpointError(f"{path}: the checkpoint is not a state dict")
  disk, size = Tensor(path), path.stat().st_size
  out: dict[str, Tensor] = {}
  for name, ref in state.items():
    if not isinstance(ref, _TensorRef): continue
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
    out[name] = disk[begin:end].bitcast(ref.storage.dtype).reshape(ref.shape)
  return out

def is_meta_dir(path: pathlib.Path) -> bool: return path.is_dir() and (path / "params.json").is_file()

def shard_files(path: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(path.glob("consolidated.*.pth"))
  if not files: raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth")
  return files
