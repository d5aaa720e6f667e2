"""The architectures tg-llama runs: one module here per architecture, over the shared blocks (blocks.py: attention,
RoPE). A module holds its transformer `Block` (attributes named as in its Hugging Face checkpoints), its tensor names in
every format with their shapes (`layer_shapes`, `layer_sources`), and its per-format fix-ups (`sanitize`); the model
shell (llama.Llama: embedding, blocks, norm, head, layer shards) builds the blocks of the module its config names
(LlamaConfig.arch).

The tables below map the name a checkpoint gives its architecture to that module. Adding a family member: a new module
with those four names, GLOBAL_NAMES (the embedding, norm and head) and HF_CLASS (what a converted config.json calls it),
its Block with linears() (the layers quantize.py swaps), and a line in each table it is read from."""
from __future__ import annotations
import importlib
from types import ModuleType

# config.json's model_type -> module
HF_TYPES = {"llama": "llama", "mistral": "llama", "mixtral": "mixtral"}
# GGUF's general.architecture -> module; llama.cpp writes Mixtral as "llama" with an expert_count (LlamaConfig.from_gguf)
GGUF_ARCHS = {"llama": "llama"}
# each format's prefix of a layer's tensor names
LAYER_PREFIX = {"hf": "model.layers", "gguf": "blk", "meta": "layers"}

def module(arch: str) -> ModuleType: return importlib.import_module(f"tg_llama.models.{arch}")
