"""tg-llama: Llama-family language models in tinygrad tensors, on any backend tinygrad runs."""
from tg_llama.api import Model, load, load_shard
from tg_llama.config import LlamaConfig
from tg_llama.errors import CheckpointError, ContextLengthError, TgLlamaError, UnsupportedModelError

__all__ = ["load", "load_shard", "Model", "LlamaConfig", "TgLlamaError", "CheckpointError", "ContextLengthError", "UnsupportedModelError"]
