"""Tensor parallelism on one machine: a loaded Llama split Megatron-style over several devices of one backend.

q/k/v/gate/up are split on their output axis and o/down on their input axis, so each device holds
n_heads/n query heads, n_kv_heads/n key-value heads (and that slice of every block's KV cache) and
hidden_dim/n of the feed-forward; o/down end in a partial sum that tinygrad all-reduces. The embedding and
the output head are split on the vocabulary when it divides (a tied pair stays one tensor), else copied to
every device, like the norms and the RoPE tables. A mixture of experts (Mixtral) splits the same way inside each expert:
w1/w3 (experts, hidden, dim) on their hidden axis, w2 (experts, dim, hidden) on its own, the router copied; every
device holds every expert's slice, so routing needs no communication. The model code is the same for one device and
for many: tinygrad's multi-device tensors place the all-reduces.

Inputs go to every device first (`place_input`): tinygrad 0.14 does not broadcast a one-device tensor into
a multi-device op, it fails with "all buffers must have the same device". The model's output is then on
every device (or split on the vocabulary); `.to(devices[0])` gathers it into a plain tensor.

Not here: layer shards across machines (see api.load_shard), quantized layers (their scales would have to
be split alongside the weights), uneven splits, devices of different backends."""
from __future__ import annotations
from tinygrad import Tensor
from tg_llama.config import LlamaConfig
from tg_llama.errors import UnsupportedModelError
from tg_llama.models.llama import Llama

# which axis of each linear's (out, in) weight is split: 0 column-parallel, 1 row-parallel; experts' (experts, out, in) alike
LINEAR_AXES = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1, "w1": 1, "w3": 1, "w2": 2}

def devices_for(device: str, n: int) -> tuple[str, ...]:
  """n devices of one backend, from `device`'s index on: ("CUDA", 2) -> ("CUDA:0", "CUDA:1")."""
  if n < 1: raise ValueError(f"the number of devices must be positive, got {n}")
  base, _, index = device.partition(":")
  return tuple(f"{base}:{int(index or 0) + i}" for i in range(n))

def check_divisible(config: LlamaConfig, n: int):
  sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "hidden_dim": config.hidden_dim}
  if bad := [name for name, size in sizes.items() if size % n]:
    raise UnsupportedModelError(f"{' and '.join(f'{name}={sizes[name]}' for name in bad)} cannot be split over {n} devices; "
                                f"the device count must divide {', '.join(f'{k}={v}' for k, v in sizes.items())}")

def split_axis(name: str, config: LlamaConfig, n: int) -> int | None:
  """The axis a parameter (canonical name) is split on over n devices; None: a full copy on each."""
  layer = name.split(".")[-2]
  if layer in LINEAR_AXES: return LINEAR_AXES[layer]
  if layer in ("embed_tokens", "lm_head"): return 0 if config.vocab_size % n == 0 else None
  return None

def shard_model(llama: Llama, devices: tuple[str, ...]):
  """Split a loaded model over `devices` in place: its weights and, once setup_rope has run, its RoPE tables
  (a KV cache splits itself: KVCache.shard)."""
  n = len(devices)
  check_divisible(llama.config, n)
  params = llama.weights()
  if quantized := [name for name in params if not name.endswith(".weight")]:
    raise UnsupportedModelError(f"quantized layers cannot be split over devices yet ({quantized[0]}); load the model unquantized")
  for name, t in params.items(): _split(t, devices, split_axis(name, llama.config, n))  # a tied head is split once
  if llama.cos is not None and llama.sin is not None:
    _split(llama.cos, devices, None)
    _split(llama.sin, devices, None)

def place_input(x: Tensor, devices: tuple[str, ...]) -> Tensor:
  """Token ids (or hidden states) as a model split over `devices` takes them: a copy on every device."""
  return x if len(devices) < 2 or isinstance(x.device, tuple) else x.shard(devices)

def _split(t: Tensor, devices: tuple[str, ...], axis: int | None):
  if not isinstance(t.device, tuple): t.shard_(devices, axis).realize()
