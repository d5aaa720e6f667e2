"""Hugging Face checkpoints: a directory with config.json and model.safetensors, or shards listed
in model.safetensors.index.json."""
from __future__ import annotations
import json, pathlib
from tinygrad import Tensor
from tg_llama.errors import CheckpointError
from tg_llama.formats.safetensors import load_safetensors

def is_hf_dir(path: pathlib.Path) -> bool: return path.is_dir() and (path / "config.json").is_file()

def read_json(path: pathlib.Path) -> dict:
  if not path.is_file(): raise CheckpointError(f"{path}: no such file")
  try: return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e: raise CheckpointError(f"{path}: not valid JSON ({e})") from None

def weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  if (index := path / "model.safetensors.index.json").is_file():
    files = sorted(set(read_json(index).get("weight_map", {}).values()))
    if not files: raise CheckpointError(f"{index}: empty weight_map")
    return [path / f for f in files]
  if (single := path / "model.safetensors").is_file(): return [single]
  if list(path.glob("*.bin")) or list(path.glob("*.pth")):
    raise CheckpointError(f"{path}: holds only pickled .bin weights; convert them to safetensors (tg-llama never unpickles HF .bin files)")
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

def read_hf(path: pathlib.Path) -> tuple[dict, dict[str, Tensor]]:
  """config.json as a dict, and every tensor (lazy) under its HF name."""
  config = read_json(path / "config.json")
  tensors: dict[str, Tensor] = {}
  for f in weight_files(path): tensors.update(load_safetensors(f))
  return config, tensors
