"""Weight-only quantized linear layers, each next to the code that packs its weights, and `quantize_model`
that swaps them into a loaded Llama.

  Int8Linear   int8 weights, symmetric, one float scale per output row (or per block of `group_size`, GGUF's Q8_0)
  Int4Linear   4-bit weights in blocks of `group_size`, asymmetric (scale and min per block), two per byte in
               GGUF Q4_1's order: byte j of a block holds element j (low nibble) and element j+group/2 (high)
  Int8Experts, Int4Experts   the same layouts with a leading experts axis (a mixture's stacked experts,
               tg_llama/linear.py's Experts): a decode step reads only the routed experts' blocks

GGUF's Q8_0, Q4_0 and Q4_1 blocks map onto these layouts exactly (Q4_0 is Q4_1 with min = -8*scale), so
mode "gguf" keeps a GGUF file's weights as stored: bit for bit the same values, decoded inside the matmul.
A GGUF file's scales stay float16 as stored (float32 only on a device without half, PoCL's OpenCL): each is converted
once per block inside the product, which costs nothing measurable (DEV=CPU, 2 cores, Q4_1 8192x2048: one row 0.96 vs
0.98 ms, 8 rows 4.99 vs 4.74 ms), and float32 copies made Llama 3.2 1B's weights 147 MB (19%) larger than its file.

Every layer dequantizes for its product; the float model is never held. One token (decode) dequantizes inside
tg_llama/linear.py's "lanes" matrix-vector product, whose A independent accumulators clang vectorizes
(DEV=CPU, 49152x576, int8: 2.2 ms vs 9 ms as `(x @ w.T) * scale`, whose int8 -> float conversion runs in one
serial chain); several tokens (prefill) decode the layer's weight once into a float matrix for the chunk
(linear.matmul), a buffer of one layer's size while that product runs.
Measured on SmolLM2-135M decode, DEV=CPU: float 11-19, int8/int4/gguf 29-35 tokens/s; with BEAM=2 on the
decode kernels 19 vs 49 tokens/s. Only the CPU has been measured.

Not here: activation quantization (W8A8 with an int32 dot measured slower than float accumulation in
tinygrad 0.14), int8/int4 embeddings (the token embedding stays float there; a tied output head gets its own
quantized copy), tensor parallelism (scales would have to be split alongside the weights), writing quantized
checkpoints (`quantize_model` returns the dict to record in their config)."""
from __future__ import annotations
import functools, operator
from typing import Callable
import numpy as np
from tinygrad import Device, Tensor, dtypes, nn
from tg_llama.errors import UnsupportedModelError
from tg_llama.transfer import to_device
from tg_llama.linear import Experts, Linear, experts_matmul, lanes_matvec, matmul, matvec_rows, one_row

MODES = ("none", "int8", "int4", "gguf")
LANES = 16  # a grouped int8 layer's lanes for one token (Int8Linear)

class Int8Linear:
  """y = x @ (weight * scale).T with weight int8 (out, in) and scale (out, in // group_size), float32 unless given;
  group_size None: one scale per output row."""
  def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None, scale_dtype=dtypes.float32):
    if bias: raise ValueError("Int8Linear has no bias (Llama's linears have none)")
    self.group_size = group_size or in_features
    if in_features % self.group_size: raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    self.weight = Tensor.empty(out_features, in_features, dtype=dtypes.int8)
    self.scale = Tensor.empty(out_features, in_features // self.group_size, dtype=scale_dtype)

  def __call__(self, x: Tensor) -> Tensor:
    (N, K), G = self.weight.shape, self.group_size
    if G == K and matvec_rows(x):  # one scale per row: applied once to each dot product
      return lanes_matvec(x, self.weight, scale=self.scale[:, 0].cast(x.dtype))
    if matvec_rows(x) and G % LANES == 0:
      # a decode step's rows: lane j of a block sums the products of its elements j, j+16, ..., then multiplies by the block's
      # scale (one multiply per lane and block, not per weight). Measured on the AMD EPYC (Zen 4), Q8_0's 49152x576 head:
      # one row 4.0 -> 2.5 ms on one core; a batch against its 32-lane form, both cores' parts timed on one core: 2 rows
      # 5.8 -> 3.2 ms, 4 rows 11.3 -> 6.3, 8 rows 22.6 -> 12.6
      xs = x.contiguous().reshape(*x.shape[:-1], 1, K // G, G // LANES, LANES)
      q = self.weight.reshape(N, K // G, G // LANES, LANES)
      dots = functools.reduce(operator.add, [xs[..., i, :] * q[:, :, i].cast(x.dtype) for i in range(G // LANES)])
      return (dots * self.scale.cast(x.dtype).unsqueeze(-1)).sum(-2).sum(-1).contiguous()
    w = (self.weight.cast(x.dtype).reshape(N, K // G, G) * self.scale.cast(x.dtype).unsqueeze(-1)).reshape(N, K)
    # a block per lane step (one scale per step): measured 4.8 ms vs 7-8 ms with 64 lanes at 49152x576
    return lanes_matvec(x, w, n_lanes=G) if matvec_rows(x) else matmul(x, w)

  @staticmethod
  def quantize(w: Tensor, group_size: int | None = None) -> dict[str, Tensor]:
    """Symmetric round-to-nearest: scale = max|w| / 127 per row (or block), weight = round(w / scale)."""
    N, K = w.shape
    G = group_size or K
    blocks = w.float().reshape(N, K // G, G)
    scale = blocks.abs().max(-1) / 127
    scale = (scale == 0).where(1.0, scale)  # an all-zero block: any scale decodes it
    q = (blocks / scale.unsqueeze(-1)).round().clip(-127, 127).cast(dtypes.int8)
    return {"weight": q.reshape(N, K), "scale": scale}

class Int4Linear:
  """y = x @ (q * scale + min).T, q in 0..15 packed two per uint8 (out, in/group, group/2), Q4_1's nibble order;
  scale and min (out, in // group_size), float32 unless given."""
  def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32, scale_dtype=dtypes.float32):
    if bias: raise ValueError("Int4Linear has no bias (Llama's linears have none)")
    if group_size % 2 or in_features % group_size:
      raise ValueError(f"group_size={group_size} must be even and divide in_features={in_features}")
    self.group_size = group_size
    self.weight = Tensor.empty(out_features, in_features // group_size, group_size // 2, dtype=dtypes.uint8)
    self.scale = Tensor.empty(out_features, in_features // group_size, dtype=scale_dtype)
    self.min = Tensor.empty(out_features, in_features // group_size, dtype=scale_dtype)

  def __call__(self, x: Tensor) -> Tensor:
    N, B, H = self.weight.shape  # rows, blocks per row, bytes per block
    lo, hi = self.weight.bitwise_and(0xF).cast(x.dtype), self.weight.rshift(4).cast(x.dtype)
    scale, mn = self.scale.cast(x.dtype).unsqueeze(-1), self.min.cast(x.dtype).unsqueeze(-1)
    # several tokens: decoded once into a float matrix, not once per token inside the product (measured 5x slower)
    if not matvec_rows(x): return matmul(x, (lo.cat(hi, dim=-1) * scale + mn).reshape(N, B * 2 * H))
    # one token: the H bytes of a block are the lanes, each byte read once for its two weights (see linear.lanes_matvec)
    xs = x.contiguous().reshape(*x.shape[:-1], 1, B, 2 * H)
    if one_row(x):
      # sum(x * (q * scale + min)) = scale * sum(x * q) + min * sum(x), per block: a multiply and two multiply-adds a lane
      # and block, not four; the minimums times the input's block sums (the same for every row) in a kernel of their own
      # (opts.py's "block minimums"). Measured on the AMD EPYC (Zen 4), tune.py's timer, both cores' parts on one core:
      # 2048x8192 1.22-1.29 -> 0.88 + 0.09 ms, 8192x2048 1.29-1.31 -> 0.85-0.93 + 0.10; a decode step of SmolLM2 7.0-8.0 ->
      # 6.4-7.1 ms, of Llama 3.2 1B's shape 50.4 -> 44.7 ms (best of 30). A batch keeps the form below: there each weight's
      # q * scale + min is shared by the rows taken at a time (opts.loop_opts), two multiply-adds a row instead of three
      dots = (scale * (xs[..., :H] * lo + xs[..., H:] * hi)).sum(-2).sum(-1).contiguous()
      return (dots + (self.min.cast(x.dtype) * xs.sum(-1)).sum(-1)).contiguous()
    return (xs[..., :H] * (lo * scale + mn) + xs[..., H:] * (hi * scale + mn)).sum(-2).sum(-1).contiguous()

  @staticmethod
  def quantize(w: Tensor, group_size: int = 32) -> dict[str, Tensor]:
    """Asymmetric round-to-nearest per block: min = min(w), scale = (max(w) - min) / 15, q = round((w - min) / scale)."""
    N, K = w.shape
    blocks = w.float().reshape(N, K // group_size, group_size)
    mn = blocks.min(-1)
    scale = (blocks.max(-1) - mn) / 15
    scale = (scale == 0).where(1.0, scale)  # a constant block: q = 0 decodes to min
    q = ((blocks - mn.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clip(0, 15).cast(dtypes.uint8)
    return {"weight": q[..., :group_size // 2].bitwise_or(q[..., group_size // 2:].lshift(4)), "scale": scale, "min": mn}

class _Experts:
  """A quantized layer's parameters with a leading experts axis, called as tg_llama/linear.py's Experts: indexed by the
  routed experts first, so only their blocks are read, then decoded as the 2-D layer decodes them."""
  def __call__(self, x: Tensor, sel: Tensor | None = None) -> Tensor:
    params = {name: t if sel is None else t[sel] for name, t in nn.state.get_state_dict(self).items()}
    return experts_matmul(x, self.decode(x.dtype, **params), sel)

  @classmethod
  def quantize(cls, w: Tensor, *args) -> dict[str, Tensor]:
    """The 2-D layer's quantization (its arguments) of every expert's (out, in) rows."""
    E, N, K = w.shape
    return {k: v.reshape(E, N, *v.shape[1:]) for k, v in cls.linear.quantize(w.reshape(E * N, K), *args).items()}

class Int8Experts(_Experts):
  """Int8Linear's layout per expert: weight int8 (experts, out, in), scale (experts, out, in // group_size)."""
  linear = Int8Linear
  def __init__(self, n_experts: int, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None,
               scale_dtype=dtypes.float32):
    self.group_size = group_size or in_features
    if bias or in_features % self.group_size: raise ValueError(f"Int8Experts: no bias, and group_size={group_size} must divide {in_features}")
    self.weight = Tensor.empty(n_experts, out_features, in_features, dtype=dtypes.int8)
    self.scale = Tensor.empty(n_experts, out_features, in_features // self.group_size, dtype=scale_dtype)

  def decode(self, dtype, weight: Tensor, scale: Tensor) -> Tensor:
    return (weight.cast(dtype).reshape(*scale.shape, self.group_size) * scale.cast(dtype).unsqueeze(-1)).flatten(-2)

class Int4Experts(_Experts):
  """Int4Linear's layout per expert: weight uint8 (experts, out, in/group, group/2), scale and min
  (experts, out, in // group_size)."""
  linear = Int4Linear
  def __init__(self, n_experts: int, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
               scale_dtype=dtypes.float32):
    if bias or group_size % 2 or in_features % group_size: raise ValueError(f"Int4Experts: no bias, and group_size={group_size} must be even and divide {in_features}")
    self.group_size = group_size
    self.weight = Tensor.empty(n_experts, out_features, in_features // group_size, group_size // 2, dtype=dtypes.uint8)
    self.scale = Tensor.empty(n_experts, out_features, in_features // group_size, dtype=scale_dtype)
    self.min = Tensor.empty(n_experts, out_features, in_features // group_size, dtype=scale_dtype)

  def decode(self, dtype, weight: Tensor, scale: Tensor, min: Tensor) -> Tensor:
    q = weight.bitwise_and(0xF).cat(weight.rshift(4), dim=-1).cast(dtype)
    return (q * scale.cast(dtype).unsqueeze(-1) + min.cast(dtype).unsqueeze(-1)).flatten(-2)

class QuantizedEmbedding:
  """Token embedding rows gathered from a quantized layer's blocks and decoded: the embedding of a GGUF file kept as
  stored, sharing a tied output head's blocks (SmolLM2's: 18 MB of Q4_1 instead of 113 MB of float32)."""
  def __init__(self, layer: Int8Linear | Int4Linear):
    self.layer_type, self.group_size = type(layer), layer.group_size
    for name, t in nn.state.get_state_dict(layer).items(): setattr(self, name, t)

  def __call__(self, idx: Tensor) -> Tensor:
    def rows(t: Tensor) -> Tensor:  # t[idx] along the first axis, as tinygrad's nn.Embedding gathers
      flat = t.reshape(t.shape[0], -1)
      hit = Tensor.arange(t.shape[0]) == idx.unsqueeze(-1)
      return hit.unsqueeze(-1).where(flat, 0).sum(-2, dtype=t.dtype)
    scale = rows(self.scale).float().unsqueeze(-1)  # (..., blocks, 1)
    if self.layer_type is Int8Linear:
      q = rows(self.weight).float()
      return (q.reshape(*q.shape[:-1], -1, self.group_size) * scale).flatten(-2)
    w = rows(self.weight).reshape(*idx.shape, *self.weight.shape[1:])  # (..., blocks, bytes per block)
    q = w.bitwise_and(0xF).cat(w.rshift(4), dim=-1).float()
    return (q * scale + rows(self.min).float().unsqueeze(-1)).flatten(-2)

# ---- GGUF blocks as stored (spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md; layouts in ggml-common.h) ----

GGUF_BLOCKS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # bytes per block of 32 weights

def from_gguf_blocks(raw: np.ndarray, ggml_type: str, shape: tuple[int, ...], device: str) -> tuple[type, dict[str, Tensor]]:
  """Split raw GGUF blocks (uint8 in host memory, row-major over `shape`: (out, in), or (experts, out, in)) into a layer
  class and its parameters on `device`, without rounding anything: Q8_0 = {f16 d, int8 q[32]}; Q4_0 = {f16 d, u8 qs[16]}
  meaning (q - 8) * d; Q4_1 = {f16 d, f16 m, u8 qs[16]} meaning q * d + m. The scales stay float16 where the device has
  half. Split by numpy and copied in, not by tinygrad kernels: scheduling those took 20 ms a weight (4 of SmolLM2's 6 s load)."""
  *rows, K = shape
  blocks = raw.reshape(*rows, K // 32, GGUF_BLOCKS[ggml_type])
  int8, int4 = (Int8Linear, Int4Linear) if len(shape) == 2 else (Int8Experts, Int4Experts)
  kept = np.float16 if dtypes.float16 in Device[device].renderer.supported_dtypes() else np.float32
  half = lambda at: np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16).reshape(*rows, K // 32)
  d = half(0)
  if ggml_type == "Q8_0": params = {"weight": np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(*rows, K), "scale": d.astype(kept)}
  elif ggml_type == "Q4_0": params = {"weight": blocks[..., 2:], "scale": d.astype(kept), "min": (d * -8).astype(kept)}  # exact in float16 too
  else: params = {"weight": blocks[..., 4:], "scale": d.astype(kept), "min": half(2).astype(kept)}
  return int8 if ggml_type == "Q8_0" else int4, {name: to_device(a, device) for name, a in params.items()}

# ---- swapping layers into a model ----

def linear_for(mode: str) -> Callable:
  """The Linear class for `Llama(config, linear=...)` when building a model to fill with quantized parameters."""
  return {"none": Linear, "int8": Int8Linear, "int4": Int4Linear}[_check_mode(mode, ("none", "int8", "int4"))]

def build_layer(cls: type, params: dict[str, Tensor], shape: tuple[int, ...], **kwargs):
  """A layer of class `cls` for a weight of `shape` (out, in) or (experts, out, in), holding `params` (checked, and
  realized in one schedule: they share their source, so a GGUF weight's blocks are read once, not once per parameter)."""
  layer = cls(*shape[:-2], shape[-1], shape[-2], **kwargs)
  for name, t in params.items():
    want = getattr(layer, name)
    if t.shape != want.shape or t.dtype != want.dtype:
      raise ValueError(f"{cls.__name__}.{name}: got {t.shape} {t.dtype}, the layer needs {want.shape} {want.dtype}")
    setattr(layer, name, t.contiguous())
  Tensor.realize(*[getattr(layer, name) for name in params])
  return layer

QUANTIZED = {"int8": (Int8Linear, Int8Experts), "int4": (Int4Linear, Int4Experts)}  # for (out, in) and (experts, out, in)

def quantize_model(llama, mode: str, checkpoint=None, read: Callable[[str], Tensor] | None = None,
                   built: Callable[[], None] | None = None) -> dict:
  """Swap every linear of `llama` (tg_llama.models.llama.Llama), and every stack of experts, for a quantized one, in
  place, and return the quantization to record in a saved config. "int8"/"int4" quantize each float weight, taken from
  `read(name)` (a weight's canonical name; default: the weight the model holds); "gguf" takes each weight's blocks from
  `checkpoint` (a GGUF tg_llama.convert.Checkpoint) when they are Q8_0, Q4_0 or Q4_1 and leaves other weights float, and
  keeps such a token embedding in its blocks too (QuantizedEmbedding, sharing a tied output head's). Called before the
  float weights are read (tg_llama.api.load_weights does), no float copy of a quantized weight is ever held. int8/int4
  leave the token embedding float. `built()` is called after each layer is made (tg_llama.api drops the file pages
  it was read from there, so the file and its copy are never resident whole at once)."""
  _check_mode(mode, MODES)
  if mode == "none": return {"mode": "none"}
  if mode == "gguf" and (checkpoint is None or checkpoint.format != "gguf"):
    got = f"a {checkpoint.format} checkpoint" if checkpoint else "no checkpoint"
    raise ValueError(f"quantize mode 'gguf' keeps a GGUF file's blocks: load a GGUF file (got {got})")
  if any(isinstance(getattr(parent, attr).weight.device, tuple) for _, parent, attr in linears(llama)):
    raise UnsupportedModelError("quantized layers run on one device: load without --devices to quantize")
  kept = {name: checkpoint.raw_dtypes[f"{name}.weight"] for name, _, _ in linears(llama)} if mode == "gguf" else {}
  embed = mode == "gguf" and llama.is_first and checkpoint.raw_dtypes.get("model.embed_tokens.weight") in GGUF_BLOCKS
  if embed: kept["model.embed_tokens"] = checkpoint.raw_dtypes["model.embed_tokens.weight"]
  shared = embed and checkpoint.config.tie_embeddings and kept.get("lm_head") in GGUF_BLOCKS  # a tied head's blocks: the embedding's
  if embed and not shared:
    shape = (checkpoint.config.vocab_size, checkpoint.config.dim)
    llama.embed_tokens = QuantizedEmbedding(gguf_layer(checkpoint, "model.embed_tokens", shape, llama.embed_tokens.weight.device))
    if built: built()
  # the largest first: while a weight is read, its file pages and raw copy are resident next to all built before it
  # (Llama 3.2 1B's Q4_1 GGUF: peak RSS at load 1.31 GB with its 164 MB head read last, 0.98 GB with it first)
  for name, parent, attr in sorted(linears(llama), key=lambda l: -getattr(l[1], l[2]).weight.numel()):
    w = getattr(parent, attr).weight
    shape = tuple(w.shape)
    if mode in ("int8", "int4"):
      cls = QUANTIZED[mode][len(shape) - 2]
      new = build_layer(cls, cls.quantize(read(f"{name}.weight") if read else w), shape)
    elif kept[name] in GGUF_BLOCKS: new = gguf_layer(checkpoint, name, shape, w.device)
    else: continue
    setattr(parent, attr, new)
    if built: built()
  if shared: llama.embed_tokens = QuantizedEmbedding(llama.lm_head)
  if mode == "int8": return {"mode": "int8", "bits": 8, "group_size": None}
  if mode == "int4": return {"mode": "int4", "bits": 4, "group_size": 32}
  return {"mode": "gguf", "types": kept}

def gguf_layer(checkpoint, name: str, shape: tuple[int, ...], device: str):
  """The quantized layer holding the GGUF blocks of the weight `name` (a linear's, experts', or "model.embed_tokens")."""
  cls, params = from_gguf_blocks(checkpoint.blocks[f"{name}.weight"](), checkpoint.raw_dtypes[f"{name}.weight"], shape, device)
  return build_layer(cls, params, shape, scale_dtype=params["scale"].dtype, **({"group_size": 32} if cls in (Int8Linear, Int8Experts) else {}))

def quantized_names(llama) -> set[str]:
  """The canonical names of the parameters that quantized layers hold (not to be read as float weights)."""
  names = {f"{name}.{p}" for name, parent, attr in linears(llama) if not isinstance(layer := getattr(parent, attr), (Linear, Experts))
           for p in nn.state.get_state_dict(layer)}
  if isinstance(getattr(llama, "embed_tokens", None), QuantizedEmbedding):
    names |= {f"model.embed_tokens.{p}" for p in nn.state.get_state_dict(llama.embed_tokens)}
  return names

def linears(llama) -> list[tuple[str, object, str]]:
  """(canonical name, parent module, attribute) for every linear (and stack of experts) of the model shard that
  quantization swaps (each block says which: tg_llama/models/)."""
  out = [(f"model.layers.{i}.{name}", parent, attr) for i, block in llama.layers.items() for name, parent, attr in block.linears()]
  if llama.is_last: out.append(("lm_head", llama, "lm_head"))
  return out

def _check_mode(mode: str, allowed: tuple[str, ...]) -> str:
  if mode not in allowed: raise ValueError(f"unknown quantize mode {mode!r}; choose one of {', '.join(allowed)}")
  return mode
