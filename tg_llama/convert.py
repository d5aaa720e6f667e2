"""The loader: opens a checkpoint of any format and maps its tensors onto the model's canonical names and layout, with
the name tables and fix-ups of the architecture module the config names (tg_llama/models/); and the writer of that layout.

Canonical = Hugging Face's names and its half-split RoPE layout (the cheapest to compute), a mixture's experts stacked
(experts, out, in) as llama.cpp stores them. Meta's and llama.cpp's q/k weights use the interleaved layout and are
permuted at load; a GGUF's quantized blocks can be read as stored (Checkpoint.blocks), fixed up alike. A converted
checkpoint is a plain HF directory that transformers loads too."""
from __future__ import annotations
import contextlib, json, mmap, os, pathlib, re, shutil, struct, tempfile
from dataclasses import dataclass, field, replace
from typing import Callable
import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tg_llama.config import LlamaConfig
from tg_llama.errors import CheckpointError, TgLlamaError, UnsupportedModelError
from tg_llama.formats import gguf, hf, meta
from tg_llama import models, transfer

# in the source but not weights of the model: RoPE tables that the config already describes
IGNORED = re.compile(r"(rope\.freqs|rope_freqs\.weight|.*rotary_emb\.inv_freq)$")

def canonical_shapes(config: LlamaConfig, start_layer: int = 0, end_layer: int | None = None) -> dict[str, tuple[int, ...]]:
  c, end_layer = config, config.n_layers if end_layer is None else end_layer
  per_layer = models.module(c.arch).layer_shapes(c)
  out = {"model.embed_tokens.weight": (c.vocab_size, c.dim)} if start_layer == 0 else {}
  out.update({f"model.layers.{i}.{k}": v for i in range(start_layer, end_layer) for k, v in per_layer.items()})
  if end_layer == c.n_layers: out.update({"model.norm.weight": (c.dim,), "lm_head.weight": (c.vocab_size, c.dim)})
  return out

def source_names(config: LlamaConfig, fmt: str) -> dict[str, list[str]]:
  """Each canonical tensor name -> the names it is read from in format `fmt` (the architecture's tables; several are
  stacked on a new first axis)."""
  arch, prefix = models.module(config.arch), models.LAYER_PREFIX[fmt]
  out = {canonical: [canonical if fmt == "hf" else names[("gguf", "meta").index(fmt)]] for canonical, names in arch.GLOBAL_NAMES.items()}
  per_layer = arch.layer_sources(config, fmt)
  for i in range(config.n_layers):
    out.update({f"model.layers.{i}.{k}": [f"{prefix}.{i}.{n}" for n in names] for k, names in per_layer.items()})
  return out

@dataclass
class Checkpoint:
  """A checkpoint opened for loading: its config, and a lazy loader per canonical tensor name."""
  path: pathlib.Path
  format: str                                     # "hf", "meta" or "gguf"
  config: LlamaConfig
  tensors: dict[str, Callable[[str], Tensor]]     # canonical name -> (device -> lazy float tensor)
  shapes: dict[str, tuple[int, ...]]              # canonical name -> shape, known without reading any data
  metadata: dict                                  # the source's own config dict / GGUF key-values
  raw_dtypes: dict[str, str]                      # canonical name -> the stored dtype or quant type
  blocks: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)  # GGUF: canonical name -> (() -> raw blocks
                                                  # in host memory, uint8 (..., rows, bytes per row), fixed up as the tensor is)

def detect_format(path: pathlib.Path) -> str:
  if not path.exists(): raise CheckpointError(f"{path}: no such file or directory")
  if path.is_file():
    with open(path, "rb") as f: magic = f.read(4)
    if magic == b"GGUF": return "gguf"
    raise CheckpointError(f"{path}: not a GGUF file (bad magic {magic!r}); pass a GGUF file, an HF directory or a Meta directory")
  if hf.is_hf_dir(path): return "hf"
  if meta.is_meta_dir(path): return "meta"
  raise CheckpointError(f"{path}: neither an HF checkpoint (config.json) nor a Meta checkpoint (params.json)")

def open_checkpoint(path: str | pathlib.Path) -> Checkpoint:
  """The checkpoint's config and lazy tensors. Checked on opening: every count, size and offset of the file against its
  length, the config's numbers (present, typed, positive, finite), the tensors' dtypes, and that the norm weights are
  finite. Not checked: NaN or inf in the large weights (embeddings, linears), which would take a second pass over the
  whole file; a NaN there shows up as NaN logits."""
  path = pathlib.Path(path)
  ckpt = {"hf": _open_hf, "meta": _open_meta, "gguf": _open_gguf}[detect_format(path)](path)
  _check_norms(ckpt)
  return ckpt

def _check_norms(ckpt: Checkpoint):
  for name in sorted(n for n in ckpt.tensors if n.endswith("norm.weight")):  # small: (dim,) each
    if len(ckpt.shapes[name]) != 1: raise CheckpointError(f"{ckpt.path}: tensor {name} has shape {ckpt.shapes[name]}, a norm weight is a vector")
    if not np.isfinite(ckpt.tensors[name]("CPU").numpy()).all(): raise CheckpointError(f"{ckpt.path}: tensor {name} holds NaN or infinite values")

def _open_hf(path: pathlib.Path) -> Checkpoint:
  cfg, raw = hf.read_hf(path)
  config = LlamaConfig.from_hf(cfg, str(path / "config.json"))
  names = {n for n in raw if not IGNORED.match(n)}
  _check_layer_count(path / "config.json", "num_hidden_layers", config, len(names), "hf")
  _check_float(path, {n: raw[n].dtype for n in names})
  if "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
    # transformers would make up a random output head here; a checkpoint that is tied says so
    if not config.tie_embeddings: raise CheckpointError(f"{path}: missing tensor lm_head.weight, and config.json's tie_word_embeddings is not true")
  tensors, shapes, raw_dtypes, read = {}, {}, {}, set()
  for name, srcs in source_names(config, "hf").items():
    if not (present := [n for n in srcs if n in names]): continue  # check_weights names what is missing
    if len(present) < len(srcs): raise CheckpointError(f"{path}: missing tensor {next(n for n in srcs if n not in names)}")
    parts = [raw[n] for n in srcs]
    if len(parts) > 1 and any(p.shape != parts[0].shape or p.dtype != parts[0].dtype for p in parts):
      raise CheckpointError(f"{path}: the tensors {srcs[0]}..{srcs[-1]} that make {name} differ in shape or dtype")
    tensors[name] = (lambda dev, t=parts[0]: to_device(t, dev)) if len(parts) == 1 else \
                    (lambda dev, parts=parts: Tensor.stack(*[to_device(t, dev) for t in parts]))
    shapes[name] = tuple(parts[0].shape) if len(parts) == 1 else (len(parts), *parts[0].shape)
    raw_dtypes[name], read = parts[0].dtype.name, read | set(srcs)
  for n in names - read:  # under their own names: check_weights refuses them
    tensors[n], shapes[n], raw_dtypes[n] = (lambda dev, t=raw[n]: to_device(t, dev)), tuple(raw[n].shape), raw[n].dtype.name
  if config.tie_embeddings and "model.embed_tokens.weight" in raw: _tie(tensors, shapes, raw_dtypes)
  return Checkpoint(path, "hf", config, tensors, shapes, cfg, raw_dtypes)

def _open_meta(path: pathlib.Path) -> Checkpoint:
  params = hf.read_json(path / "params.json")
  files = meta.shard_files(path)
  shards = [meta.torch_load_safe(f) for f in files]
  names = [n for n in shards[0] if not IGNORED.match(n)]
  for f, s in zip(files, shards):
    if (missing := set(names) - set(s)): raise CheckpointError(f"{f}: missing tensors {sorted(missing)[:3]} that the first shard has")
    if (extra := {n for n in s if not IGNORED.match(n)} - set(names)):
      raise CheckpointError(f"{f}: tensors {sorted(extra)[:3]} that the first shard lacks")
  vocab = None
  if "output.weight" in shards[0]:
    if any(len(s["output.weight"].shape) != 2 for s in shards): raise CheckpointError(f"{path}: output.weight is not a matrix")
    vocab = sum(s["output.weight"].shape[0] for s in shards)
  config = LlamaConfig.from_meta(params, vocab_size=vocab, src=str(path / "params.json"))
  _check_layer_count(path / "params.json", "n_layers", config, len(names), "meta")
  _check_float(path, {n: shards[0][n].dtype for n in names})
  expected = canonical_shapes(config)
  to_canonical = {srcs[0]: name for name, srcs in source_names(config, "meta").items()}
  tensors, shapes, raw_dtypes = {}, {}, {}
  for src in names:
    if src not in to_canonical: raise CheckpointError(f"{path}: unexpected tensor {src} for a Llama checkpoint")
    name, parts = to_canonical[src], [s[src] for s in shards]
    axis = _shard_axis(parts, expected[name], f"{path}/{src}")
    tensors[name] = lambda dev, name=name, parts=parts, axis=axis: _sanitize(config, "meta", name, _concat(parts, axis, dev))
    shapes[name] = tuple(sum(p.shape[a] for p in parts) if a == axis else d for a, d in enumerate(parts[0].shape))
    raw_dtypes[name] = parts[0].dtype.name
  return Checkpoint(path, "meta", config, tensors, shapes, params, raw_dtypes)

MAX_ROPE_FACTORS = 4096  # one per pair of head dims

def _open_gguf(path: pathlib.Path) -> Checkpoint:
  kv, infos, disk = gguf.read_gguf(path)
  factors = None
  if (rope := infos.get("rope_freqs.weight")) is not None:  # llama.cpp keeps Llama 3.1's RoPE scaling as per-frequency divisors
    if len(rope.shape) != 1 or rope.shape[0] > MAX_ROPE_FACTORS: raise CheckpointError(f"{path}: rope_freqs.weight has shape {rope.shape}")
    factors = tuple(float(x) for x in gguf.load_tensor(disk, rope, "CPU").tolist())
  config = LlamaConfig.from_gguf(kv, factors, src=str(path))
  _check_layer_count(path, f"{kv['general.architecture']}.block_count", config, sum(not IGNORED.match(n) for n in infos), "gguf")
  to_canonical = {srcs[0]: name for name, srcs in source_names(config, "gguf").items()}
  tensors, shapes, raw_dtypes, blocks = {}, {}, {}, {}
  for src, info in infos.items():
    if IGNORED.match(src): continue
    if src not in to_canonical: raise CheckpointError(f"{path}: unexpected tensor {src} for a {config.arch} model")
    name = to_canonical[src]
    tensors[name] = lambda dev, name=name, info=info: _gguf_tensor(config, path, disk, name, info, dev)
    blocks[name] = lambda name=name, info=info: _sanitize(config, "gguf", name, _read(path, info).reshape(*info.shape[:-1], -1))
    shapes[name], raw_dtypes[name] = info.shape, gguf.ggml_type_name(info.ggml_type)
  if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:  # GGUF has no flag: llama.cpp ties a missing output
    config = _tied(config)
    _tie(tensors, shapes, raw_dtypes, blocks)
  return Checkpoint(path, "gguf", config, tensors, shapes, kv, raw_dtypes, blocks)

HOST_FLOATS = {"F32": np.float32, "F16": np.float16}  # GGUF types read as they are; the others decoded by tinygrad

def _gguf_tensor(config: LlamaConfig, path: pathlib.Path, disk: Tensor, name: str, info: gguf.GGUFTensorInfo, device: str) -> Tensor:
  """One tensor of a GGUF file on `device`, as float. F32 and F16 (norms, a float model's weights) are read and fixed up on
  the host and copied in: each through tinygrad's scheduler took 5-15 ms (SmolLM2 has 61 norms)."""
  if (kind := HOST_FLOATS.get(gguf.ggml_type_name(info.ggml_type))) is None: return _sanitize(config, "gguf", name, gguf.load_tensor(disk, info, device))
  return transfer.to_device(_sanitize(config, "gguf", name, _read(path, info).view(kind).reshape(info.shape)), device)

def _read(path: pathlib.Path, info: gguf.GGUFTensorInfo) -> np.ndarray:
  """A GGUF tensor's bytes as stored (uint8), read into host memory: not mapped, so nothing of the file stays resident
  once they are on the device."""
  raw = np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
  if raw.size != info.nbytes: raise CheckpointError(f"{path}: truncated while reading tensor {info.name} (the file changed after it was opened)")
  return raw

def _check_layer_count(src: pathlib.Path, key: str, config: LlamaConfig, n_tensors: int, fmt: str):
  """Before anything loops over the layers: a count the file's tensors cannot fill is refused (10**12 layers would hang)."""
  per_layer = sum(map(len, models.module(config.arch).layer_sources(config, fmt).values()))
  if config.n_layers * per_layer > n_tensors:
    raise CheckpointError(f"{src}: {key} is {config.n_layers}, but the checkpoint holds only {n_tensors} tensors "
                          f"({per_layer} per layer): the config contradicts the weights")

def _check_float(path: pathlib.Path, stored: dict[str, DType]):
  for name, dtype in stored.items():
    if not dtypes.is_float(dtype): raise CheckpointError(f"{path}: tensor {name} is stored as {dtype.name}; a weight must be a float type")

def _tied(config: LlamaConfig) -> LlamaConfig: return replace(config, tie_embeddings=True)

def _tie(*tables: dict):
  """Tied embeddings: the output head reads the embedding's tensor."""
  for table in tables: table["lm_head.weight"] = table["model.embed_tokens.weight"]

def _shard_axis(parts: list[Tensor], full: tuple[int, ...], where: str) -> int | None:
  """Meta splits each weight across model-parallel ranks on its own axis (and replicates the norms)."""
  shape = parts[0].shape
  if any(p.shape != shape or p.dtype != parts[0].dtype for p in parts) or len(shape) != len(full):
    raise CheckpointError(f"{where}: shards of shapes {sorted({tuple(p.shape) for p in parts})} and the config's shape {full} do not match")
  if len(parts) == 1 or tuple(shape) == tuple(full): return None
  for axis in range(len(full)):
    if shape[axis] * len(parts) == full[axis] and all(s == f for a, (s, f) in enumerate(zip(shape, full)) if a != axis): return axis
  raise CheckpointError(f"{where}: {len(parts)} shards of shape {tuple(shape)} do not make the config's shape {full}")

def _concat(parts: list[Tensor], axis: int | None, device: str) -> Tensor:
  return to_device(parts[0], device) if axis is None else Tensor.cat(*[to_device(p, device) for p in parts], dim=axis)

def _sanitize(config: LlamaConfig, fmt: str, name: str, w: Tensor) -> Tensor: return models.module(config.arch).sanitize(config, fmt, name, w)

def to_device(t: Tensor, device: str) -> Tensor:
  """A disk tensor onto the device; bfloat16 widened to float32 there by moving bits, which every backend can
  do (clang's CPU target has no __bf16, so a bfloat16 tensor must never reach a CPU kernel)."""
  if t.dtype != dtypes.bfloat16: return t.to(device)
  return t.bitcast(dtypes.uint16).to(device).cast(dtypes.uint32).lshift(16).bitcast(dtypes.float32)

def release_file_pages():
  """Drop the pages of memory-mapped checkpoint files from this process's resident memory, once their tensors sit on
  the device (for SmolLM2's GGUF: 100 MB of RSS). The mapping stays: a tensor read later is paged in again."""
  for name in list(Device._opened_devices):
    if name.startswith("DISK") and (mem := getattr(Device[name], "mem", None)) is not None:
      with contextlib.suppress(OSError, ValueError): mem.madvise(mmap.MADV_DONTNEED)

def check_weights(ckpt: Checkpoint, start_layer: int = 0, end_layer: int | None = None):
  """Every tensor the shard needs is there with the config's shape, and nothing is there that the config has no place for."""
  expected_all = canonical_shapes(ckpt.config)
  for name in ckpt.tensors:
    if name not in expected_all:
      raise CheckpointError(f"{ckpt.path}: tensor {name} does not belong to the config's model "
                            f"({ckpt.config.n_layers} layers): the config contradicts the weights")
  for name, shape in canonical_shapes(ckpt.config, start_layer, end_layer).items():
    if name not in ckpt.tensors: raise CheckpointError(f"{ckpt.path}: missing tensor {name}")
    if (got := ckpt.shapes[name]) != shape: raise CheckpointError(f"{ckpt.path}: tensor {name} has shape {got}, the config expects {shape}")

# ---- writing the canonical layout ----

_ST_DTYPES = {dtypes.float32: "F32", dtypes.float16: "F16", dtypes.bfloat16: "BF16"}

def save_safetensors(tensors: dict[str, Tensor], path: pathlib.Path, on_tensor: Callable[[str], None] = lambda _: None):
  """Write one tensor at a time, so converting never holds more than one tensor on the host."""
  header, offset = {}, 0
  for name, t in tensors.items():
    nbytes = t.nbytes()
    header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, t in tensors.items():
      f.write(t.contiguous().realize().data())
      on_tensor(name)

def convert_checkpoint(src: str | pathlib.Path, dst: str | pathlib.Path, dtype: DType = dtypes.float16, device: str = "CPU",
                       on_tensor: Callable[[str], None] = lambda _: None, force: bool = False) -> pathlib.Path:
  """Write `src` (any format) as an HF-layout directory: config.json + model.safetensors (+ tokenizer files).

  Written into a temporary folder beside `dst` and moved into place once complete: a failed or interrupted conversion
  leaves `dst` as it was. An existing non-empty `dst` is replaced only with force=True, and never when it is, holds or
  lies inside the checkpoint (after symlinks)."""
  if dtype not in _ST_DTYPES: raise UnsupportedModelError(f"cannot write dtype {dtype} (choose float32, float16 or bfloat16)")
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  target = check_destination(src, dst, force)
  ckpt = open_checkpoint(src)
  check_weights(ckpt)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
  try:
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is 0700; the result gets the mode mkdir would give it
    out = {}
    for name, srcs in source_names(ckpt.config, "hf").items():  # a stacked tensor is written back a slice per source
      if name == "lm_head.weight" and ckpt.config.tie_embeddings: continue
      t = ckpt.tensors[name](device).cast(dtype)
      out.update({srcs[0]: t} if len(srcs) == 1 else {src: t[i] for i, src in enumerate(srcs)})
    save_safetensors(out, tmp / "model.safetensors", on_tensor)
    (tmp / "config.json").write_text(json.dumps(ckpt.config.to_hf(), indent=2))
    copy_tokenizer(ckpt, tmp)
    _move_into_place(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst

def check_destination(src: pathlib.Path, dst: pathlib.Path, force: bool) -> pathlib.Path:
  """Where `dst` really is (symlinks resolved), once it is clear that writing there destroys nothing it should not."""
  target = dst.resolve()
  read = {src.resolve(), *(f.resolve() for f in (src.iterdir() if src.is_dir() else ()))}  # an HF snapshot's files link to blobs
  if any(r == target or target in r.parents or r in target.parents for r in read):
    raise TgLlamaError(f"cannot convert {src} into {dst}: the destination is, holds or lies inside the checkpoint it reads; "
                       f"choose a folder outside it")
  if target.exists() and not target.is_dir(): raise TgLlamaError(f"cannot convert into {dst}: it exists and is not a directory")
  if target.is_dir() and any(target.iterdir()) and not force:
    raise TgLlamaError(f"{dst} exists and is not empty; pass --force (force=True) to replace it once the conversion is complete")
  return target

def _move_into_place(tmp: pathlib.Path, target: pathlib.Path):
  if not target.exists() or not any(target.iterdir()): return os.replace(tmp, target)  # rename replaces an empty folder
  aside = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
  try:
    os.replace(target, aside / target.name)
    try: os.replace(tmp, target)
    except BaseException:
      os.replace(aside / target.name, target)
      raise
  finally: shutil.rmtree(aside, ignore_errors=True)  # the old folder, once the new one is in its place

def _umask() -> int:
  os.umask(mask := os.umask(0o022))
  return mask

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")

def copy_tokenizer(ckpt: Checkpoint, dst: pathlib.Path):
  """The tokenizer travels with the converted weights: HF/Meta files as they are, a GGUF's as a tensor-less GGUF."""
  if ckpt.format == "gguf":
    (dst / "tokenizer.gguf").write_bytes(gguf.metadata_only(ckpt.path))
    return
  for name in TOKENIZER_FILES:
    if (src := ckpt.path / name).is_file(): shutil.copyfile(src, dst / name)
