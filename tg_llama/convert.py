"""The one place that maps every format's tensor names and rotary layout onto the model's canonical ones.

Canonical = Hugging Face's LlamaForCausalLM names and its half-split RoPE layout (the cheapest to
compute). Meta's and llama.cpp's q/k weights use the interleaved layout and are permuted at load;
a converted checkpoint is therefore a plain HF directory that transformers loads too."""
from __future__ import annotations
import contextlib, json, mmap, os, pathlib, re, shutil, struct, tempfile
from dataclasses import dataclass, replace
from typing import Callable
import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tg_llama.config import LlamaConfig
from tg_llama.errors import CheckpointError, TgLlamaError, UnsupportedModelError
from tg_llama.formats import gguf, hf, meta

# canonical per-layer suffix -> (GGUF suffix, Meta suffix)
LAYER_NAMES = {
  "input_layernorm.weight": ("attn_norm.weight", "attention_norm.weight"),
  "self_attn.q_proj.weight": ("attn_q.weight", "attention.wq.weight"),
  "self_attn.k_proj.weight": ("attn_k.weight", "attention.wk.weight"),
  "self_attn.v_proj.weight": ("attn_v.weight", "attention.wv.weight"),
  "self_attn.o_proj.weight": ("attn_output.weight", "attention.wo.weight"),
  "post_attention_layernorm.weight": ("ffn_norm.weight", "ffn_norm.weight"),
  "mlp.gate_proj.weight": ("ffn_gate.weight", "feed_forward.w1.weight"),
  "mlp.up_proj.weight": ("ffn_up.weight", "feed_forward.w3.weight"),
  "mlp.down_proj.weight": ("ffn_down.weight", "feed_forward.w2.weight"),
}
GLOBAL_NAMES = {"model.embed_tokens.weight": ("token_embd.weight", "tok_embeddings.weight"),
                "model.norm.weight": ("output_norm.weight", "norm.weight"), "lm_head.weight": ("output.weight", "output.weight")}
# in the source but not weights of the model: RoPE tables that the config already describes
IGNORED = re.compile(r"(rope\.freqs|rope_freqs\.weight|.*rotary_emb\.inv_freq)$")

def canonical_shapes(config: LlamaConfig, start_layer: int = 0, end_layer: int | None = None) -> dict[str, tuple[int, ...]]:
  c, end_layer = config, config.n_layers if end_layer is None else end_layer
  q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  per_layer = {"input_layernorm.weight": (c.dim,), "self_attn.q_proj.weight": (q, c.dim), "self_attn.k_proj.weight": (kv, c.dim),
               "self_attn.v_proj.weight": (kv, c.dim), "self_attn.o_proj.weight": (c.dim, q), "post_attention_layernorm.weight": (c.dim,),
               "mlp.gate_proj.weight": (c.hidden_dim, c.dim), "mlp.up_proj.weight": (c.hidden_dim, c.dim), "mlp.down_proj.weight": (c.dim, c.hidden_dim)}
  out = {"model.embed_tokens.weight": (c.vocab_size, c.dim)} if start_layer == 0 else {}
  out.update({f"model.layers.{i}.{k}": v for i in range(start_layer, end_layer) for k, v in per_layer.items()})
  if end_layer == c.n_layers: out.update({"model.norm.weight": (c.dim,), "lm_head.weight": (c.vocab_size, c.dim)})
  return out

def interleaved_to_half_split(w: Tensor, n_heads: int) -> Tensor:
  """Meta and llama.cpp store each head's rotary pairs interleaved (x0,y0,x1,y1..); HF, and we, store
  them half-split (x0,x1..,y0,y1..). Without this the model diverges after a few tokens."""
  out_dim, in_dim = w.shape
  return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

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
  _check_layer_count(path / "config.json", "num_hidden_layers", config, len(names))
  _check_float(path, {n: raw[n].dtype for n in names})
  if "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
    # transformers would make up a random output head here; a checkpoint that is tied says so
    if not config.tie_embeddings: raise CheckpointError(f"{path}: missing tensor lm_head.weight, and config.json's tie_word_embeddings is not true")
  tensors = {n: (lambda dev, t=raw[n]: to_device(t, dev)) for n in names}
  shapes, raw_dtypes = {n: tuple(raw[n].shape) for n in names}, {n: raw[n].dtype.name for n in names}
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
  _check_layer_count(path / "params.json", "n_layers", config, len(names))
  _check_float(path, {n: shards[0][n].dtype for n in names})
  expected = canonical_shapes(config)
  to_canonical = _name_map(config.n_layers, index=1)
  tensors, shapes, raw_dtypes = {}, {}, {}
  for src in names:
    if src not in to_canonical: raise CheckpointError(f"{path}: unexpected tensor {src} for a Llama checkpoint")
    name, parts = to_canonical[src], [s[src] for s in shards]
    axis = _shard_axis(parts, expected[name], f"{path}/{src}")
    permute = config.n_heads if name.endswith("q_proj.weight") else config.n_kv_heads if name.endswith("k_proj.weight") else 0
    tensors[name] = lambda dev, parts=parts, axis=axis, permute=permute: _concat_permute(parts, axis, permute, dev)
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
  _check_layer_count(path, "llama.block_count", config, sum(not IGNORED.match(n) for n in infos))
  to_canonical = _name_map(config.n_layers, index=0)
  tensors, shapes, raw_dtypes = {}, {}, {}
  for src, info in infos.items():
    if IGNORED.match(src): continue
    if src not in to_canonical: raise CheckpointError(f"{path}: unexpected tensor {src} for a Llama model")
    name = to_canonical[src]
    permute = config.n_heads if name.endswith("q_proj.weight") else config.n_kv_heads if name.endswith("k_proj.weight") else 0
    tensors[name] = lambda dev, info=info, permute=permute: _maybe_permute(gguf.load_tensor(disk, info, dev), permute)
    shapes[name], raw_dtypes[name] = info.shape, gguf.ggml_type_name(info.ggml_type)
  if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:  # GGUF has no flag: llama.cpp ties a missing output
    config = _tied(config)
    _tie(tensors, shapes, raw_dtypes)
  return Checkpoint(path, "gguf", config, tensors, shapes, kv, raw_dtypes)

def _check_layer_count(src: pathlib.Path, key: str, config: LlamaConfig, n_tensors: int):
  """Before anything loops over the layers: a count the file's tensors cannot fill is refused (10**12 layers would hang)."""
  if config.n_layers * len(LAYER_NAMES) > n_tensors:
    raise CheckpointError(f"{src}: {key} is {config.n_layers}, but the checkpoint holds only {n_tensors} tensors "
                          f"({len(LAYER_NAMES)} per layer): the config contradicts the weights")

def _check_float(path: pathlib.Path, stored: dict[str, DType]):
  for name, dtype in stored.items():
    if not dtypes.is_float(dtype): raise CheckpointError(f"{path}: tensor {name} is stored as {dtype.name}; a weight must be a float type")

def _tied(config: LlamaConfig) -> LlamaConfig: return replace(config, tie_embeddings=True)

def _tie(*tables: dict):
  """Tied embeddings: the output head reads the embedding's tensor."""
  for table in tables: table["lm_head.weight"] = table["model.embed_tokens.weight"]

def _name_map(n_layers: int, index: int) -> dict[str, str]:
  out = {names[index]: canonical for canonical, names in GLOBAL_NAMES.items()}
  prefix = "blk" if index == 0 else "layers"
  for i in range(n_layers):
    out.update({f"{prefix}.{i}.{names[index]}": f"model.layers.{i}.{canonical}" for canonical, names in LAYER_NAMES.items()})
  return out

def _shard_axis(parts: list[Tensor], full: tuple[int, ...], where: str) -> int | None:
  """Meta splits each weight across model-parallel ranks on its own axis (and replicates the norms)."""
  shape = parts[0].shape
  if any(p.shape != shape or p.dtype != parts[0].dtype for p in parts) or len(shape) != len(full):
    raise CheckpointError(f"{where}: shards of shapes {sorted({tuple(p.shape) for p in parts})} and the config's shape {full} do not match")
  if len(parts) == 1 or tuple(shape) == tuple(full): return None
  for axis in range(len(full)):
    if shape[axis] * len(parts) == full[axis] and all(s == f for a, (s, f) in enumerate(zip(shape, full)) if a != axis): return axis
  raise CheckpointError(f"{where}: {len(parts)} shards of shape {tuple(shape)} do not make the config's shape {full}")

def _concat_permute(parts: list[Tensor], axis: int | None, permute: int, device: str) -> Tensor:
  w = to_device(parts[0], device) if axis is None else Tensor.cat(*[to_device(p, device) for p in parts], dim=axis)
  return _maybe_permute(w, permute)

def to_device(t: Tensor, device: str) -> Tensor:
  """A disk tensor onto the device; bfloat16 widened to float32 there by moving bits, which every backend can
  do (clang's CPU target has no __bf16, so a bfloat16 tensor must never reach a CPU kernel)."""
  if t.dtype != dtypes.bfloat16: return t.to(device)
  return t.bitcast(dtypes.uint16).to(device).cast(dtypes.uint32).lshift(16).bitcast(dtypes.float32)

def _maybe_permute(w: Tensor, n_heads: int) -> Tensor: return interleaved_to_half_split(w, n_heads) if n_heads else w

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
    names = [n for n in canonical_shapes(ckpt.config) if not (n == "lm_head.weight" and ckpt.config.tie_embeddings)]
    save_safetensors({n: ckpt.tensors[n](device).cast(dtype) for n in names}, tmp / "model.safetensors", on_tensor)
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
