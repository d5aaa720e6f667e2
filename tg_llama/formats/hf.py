"""Hugging Face checkpoints: a directory with config.json and model.safetensors, or shards listed
in model.safetensors.index.json."""
from __future__ import annotations
import json, pathlib
from tinygrad import Tensor
from tg_llama.errors import CheckpointError
from tg_llama.formats.safetensors import load_safetensors

def is_hf_dir(path: pathlib.Path) -> bool: return path.is_dir() and (path / "config.json").is_file()

MAX_JSON_BYTES = 16 << 20  # config.json, params.json, an index: kilobytes in every real checkpoint

def read_json(path: pathlib.Path) -> dict:
  """A JSON object from a small config file; anything else (a list, nesting too deep to parse, a huge file) is a CheckpointError."""
  if not path.is_file(): raise CheckpointError(f"{path}: no such file")
  if (size := path.stat().st_size) > MAX_JSON_BYTES: raise CheckpointError(f"{path}: {size} bytes is too big for a config file")
  try: out = json.loads(path.read_bytes())
  except (ValueError, UnicodeDecodeError) as e: raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200]})") from None
  except RecursionError: raise CheckpointError(f"{path}: not valid JSON (nested too deep)") from None
  if not isinstance(out, dict): raise CheckpointError(f"{path}: must hold a JSON object, not a {type(out).__name__}")
  return out

def weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  if (index := path / "model.safetensors.index.json").is_file():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map: raise CheckpointError(f"{index}: weight_map must be a non-empty JSON object")
    return sorted({_inside(path, index, f) for f in weight_map.values()})
  if (single := path / "model.safetensors").is_file(): return [single]
  if list(path.glob("*.bin")) or list(path.glob("*.pth")):
    raise CheckpointError(f"{path}: holds only pickled .bin weights; convert them to safetensors (tg-llama never unpickles HF .bin files)")
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

def _inside(path: pathlib.Path, index: pathlib.Path, name) -> pathlib.Path:
  """A weight_map entry is a file name in the checkpoint's directory, never a path that leads out of it (symlinks are
  followed, as the Hugging Face cache links every file to its blob)."""
  if not isinstance(name, str) or "\0" in name or (f := pathlib.PurePosixPath(name)).is_absolute() or ".." in f.parts or not f.name:
    raise CheckpointError(f"{index}: weight_map names {name!r}, which is not a file inside {path}"[:300])
  return path / f

def read_hf(path: pathlib.Path) -> tuple[dict, dict[str, Tensor]]:
  """config.json as a dict, and every tensor (lazy) under its HF name."""
  config = read_json(path / "config.json")
  tensors: dict[str, Tensor] = {}
  for f in weight_files(path):
    for name, t in load_safetensors(f).items():
      if name in tensors: raise CheckpointError(f"{f}: tensor {name} is also in another shard")
      tensors[name] = t
  return config, tensors
