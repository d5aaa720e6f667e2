"""The float linear layer the model uses, with a matrix-vector product for one token written in the backend's layout; and a
mixture's stacked experts (Experts), of which a token reads only its own.

For one token, `x @ w.T` renders as one serial float chain per output (the reduction axis is innermost), which
clang cannot vectorize without reassociating. Splitting the reduction as (in/A, A) and adding the A partial
sums last gives A independent accumulators that it does vectorize: measured on DEV=CPU, 2 cores, float32,
576x1536 0.86 -> 0.16 ms, 3072x576 0.60 -> 0.28 ms, 576x576 0.36 -> 0.15 ms (the 49152x576 head is
memory-bound either way). So the CPU's layout (tg_llama/backend.py's KernelLayout, the CPU's in tg_llama/cpu/) splits
one token's products into up to 64 lanes; other backends' take the plain product, which their own heuristics tune.
Several tokens (a decode batch, a prefill chunk) take the plain matmul, which tg_llama/cpu/opts.py tiles by their count
on the CPU. A prefill chunk's weight is first written out in panels where the layout says so (the CPU's: 16 output rows
a panel, each panel (in, 16) contiguous): the product then runs one panel at a time over every token of the chunk, its
inner loop a vector multiply-add of a contiguous panel row by one input value, which clang vectorizes, while the
panel stays in cache; an (out, in) weight gives a dot product per output (one scalar chain each), and a whole (in, out)
transpose streams the weight from memory once per 4 tokens when it outgrows the cache. Measured on DEV=CPU, 2 cores,
64 tokens, Q4_1 blocks decoded and multiplied: 8192x2048 (Llama 3.2 1B's MLP) 204 ms transposed -> 36 ms in panels,
576x576 4.5 (out, in) -> 1.3 ms (a float weight pays one copy of itself per chunk)."""
from __future__ import annotations
from tinygrad import Tensor
from tinygrad.helpers import ceildiv, prod
from tg_llama.backend import kernel_layout
from tg_llama.models.layer_graph import realize

PANEL_BYTES = 16 << 20  # the most of a weight held packed in panels at once (matmul)
MAX_MATVEC_ROWS = 8  # a quantized layer's decode batch: each weight row is read once for all of them (tg_llama/cpu/opts.py)

def lanes(n: int, rows: int, widest: int) -> int:
  """The widest lane count (up to `widest` lanes for all the rows together) that splits a reduction of length n."""
  return next(a for a in (64, 32, 16, 8, 4, 2, 1) if n % a == 0 and a * rows <= widest or a == 1)

def dot(a: Tensor, b: Tensor, n_lanes: int = 1) -> Tensor:
  """(a * b).sum(-1), broadcast, over their last axis K; with n_lanes > 1 summed as (K/n_lanes, n_lanes), the n_lanes partial
  sums added last: independent accumulators, which the CPU's compiler vectorizes (the same sum, added in another order)."""
  if n_lanes == 1: return (a * b).sum(-1)
  split = lambda t: t.reshape(*t.shape[:-1], t.shape[-1] // n_lanes, n_lanes)
  return (split(a) * split(b)).sum(-2).sum(-1)

def matvec_rows(x: Tensor) -> bool:
  """Whether x (..., K) is a decode step's few rows, for a matrix-vector product, not a prefill chunk's matmul."""
  return all(isinstance(s, int) for s in x.shape[:-1]) and prod(x.shape[:-1]) <= MAX_MATVEC_ROWS

def matmul(x: Tensor, w: Tensor) -> Tensor:
  """x (..., K) of several rows @ w.T, w (N, K) a weight or a dequantizing expression, decoded once for all the rows (not
  once per row inside the product): a decode batch reads it as it is, a prefill chunk (more than MAX_MATVEC_ROWS rows)
  in panels where the backend's layout has them (and the weight is on one device)."""
  (N, K), P = w.shape, kernel_layout(x.device).panel
  if matvec_rows(x) or not P or N % P or isinstance(w.device, tuple): return (x.contiguous() @ w.contiguous().T).contiguous()
  x = x.contiguous()
  # a weight of more than PANEL_BYTES in panels runs as pieces of its output rows, each packed just before its product, so
  # the packed copy held is one piece's (a whole float32 8192x2048 MLP weight was 64 of the 76 MB a Llama 3.2 1B prefill held)
  piece = ceildiv(N // P, ceildiv(N * K * x.dtype.itemsize, PANEL_BYTES)) * P  # whole panels, as few pieces as fit
  outs = [_panel_matmul(x, w[i:i + piece], P) for i in range(0, N, piece)]
  return outs[0] if len(outs) == 1 else realize(outs[0].cat(*outs[1:], dim=-1).contiguous())

def _panel_matmul(x: Tensor, w: Tensor, P: int) -> Tensor:
  (N, K) = w.shape
  panels = w.reshape(N // P, 1, P, K).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # stored (N/P, 1, K, P)
  out = (x.reshape(1, -1, 1, K) * panels).sum(-1).contiguous()  # (N/P, rows, P): a panel's outputs for every row, then the next panel's
  # realized here, so that each weight's panels are written just before its product and their memory is reused by the next
  # (scheduled with the layer, every pack ran first and all seven panel buffers were live at once: 232 MB in Llama 3.2 1B)
  return realize(out.permute(1, 0, 2).reshape(*x.shape[:-1], N).contiguous())

def one_row(x: Tensor) -> bool: return all(isinstance(s, int) and s == 1 for s in x.shape[:-1])

def lanes_matvec(x: Tensor, w: Tensor, n_lanes: int | None = None, scale: Tensor | None = None) -> Tensor:
  """x (..., K) with one row, w (N, K) of any dtype or a dequantizing expression: x @ w.T, the reduction split into
  `n_lanes` (default: the widest that divides K in the backend's layout, 1 where it takes the plain product), times
  `scale` (N,) inside the same kernel when given.
  Input and output are made contiguous: otherwise tinygrad fuses the previous elementwise op (SwiGLU's silu * up)
  into the load and recomputes it for every output row, or fuses gate and up (one input) into one slower kernel."""
  (N, K) = w.shape
  # a weight split over devices on its input axis: each device's part of the reduction splits into lanes
  A = n_lanes or lanes(K // len(w.device) if isinstance(w.device, tuple) and w.uop.axis == 1 else K, prod(x.shape[:-1]),
                       kernel_layout(x.device).matvec_lanes)
  y = dot(x.contiguous().reshape(*x.shape[:-1], 1, K), w.cast(x.dtype), A)
  return (y if scale is None else y * scale).contiguous()

class Linear:
  """y = x @ weight.T, weight (out, in); no bias (Llama's linears have none)."""
  def __init__(self, in_features: int, out_features: int, bias: bool = False):
    if bias: raise ValueError("Linear has no bias (Llama's linears have none)")
    self.weight = Tensor.empty(out_features, in_features)

  def __call__(self, x: Tensor) -> Tensor:
    # several tokens: a product kernel of its own, its input computed once, not per output row
    return lanes_matvec(x, self.weight) if one_row(x) else matmul(x, self.weight)

class Experts:
  """n_experts linears stacked: weight (experts, out, in). `layer(x, sel)`: x (..., k or 1, in) through the experts
  that sel (..., k) picks, giving (..., k, out), reading only their rows: indexing the weight by a tensor folds into
  gated loads. `layer(x)`: x (..., experts or 1, in) through every expert, giving (..., experts, out)."""
  def __init__(self, n_experts: int, in_features: int, out_features: int, bias: bool = False):
    if bias: raise ValueError("Experts have no bias (Mixtral's have none)")
    self.weight = Tensor.empty(n_experts, out_features, in_features)

  def __call__(self, x: Tensor, sel: Tensor | None = None) -> Tensor: return experts_matmul(x, self.weight if sel is None else self.weight[sel], sel)

def experts_matmul(x: Tensor, w: Tensor, sel: Tensor | None) -> Tensor:
  """x (..., k or 1, in) @ w.T per expert, w (..., k, out, in) gathered by sel, or (experts, out, in) for all of them."""
  # gathered: the plain product (lanes_matvec's split measured no faster: 2 of 8 experts of 2048x1024, 1.3 vs 1.5 ms);
  # all experts: the weights decoded once into a float tensor, not once per row inside the product (as Int4Linear)
  return (x.unsqueeze(-2) @ (w if sel is not None else w.contiguous()).transpose(-1, -2)).squeeze(-2).contiguous()
