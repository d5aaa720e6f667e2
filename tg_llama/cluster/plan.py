"""The plan of a pipeline: which layers each stage runs, on which Ray node, on which backend and in which dtype; checked
against the cluster before any weights are read.

Layers split by each stage's share of its node's memory (exo's memory-weighted partition: a node with twice the memory
takes twice the layers), or as given by hand (`0:10,10:30`). Stages go to the nodes named, or round the alive nodes,
largest memory first. A node is named by its Ray node id (or a prefix of 8+ hex digits), its node name (`ray start
--node-name`), or its IP address. A plan fails here, with the numbers, when a node is not in the cluster or the stages on
one node need more memory than Ray reports it has (Ray's `memory` resource: what the node had free at `ray start`, less
the object store)."""
from __future__ import annotations
from dataclasses import dataclass
from tg_llama.config import LlamaConfig
from tg_llama.errors import InvalidArgumentError
from tg_llama.quantize import GGUF_BLOCKS

@dataclass(frozen=True)
class StagePlan:
  start: int             # layers start..end-1
  end: int
  node: str              # Ray node id
  node_label: str        # the node as the user knows it: its name, or IP
  backend: str | None    # None: the stage's node picks (TG_LLAMA_BACKEND, DEV, else the best found there)
  nbytes: int            # weights and KV cache, estimated
  dtype: str | None = None  # the compute dtype; None: the backend's own

  @property
  def layers(self) -> str: return f"{self.start}:{self.end}"

def parse_layers(text: str, n_layers: int) -> list[tuple[int, int]]:
  """`0:10,10:30` -> [(0, 10), (10, 30)]: contiguous ranges from layer 0 to the last, none empty."""
  ranges = []
  for part in text.split(","):
    try: start, end = (int(x) for x in part.split(":"))
    except ValueError: raise InvalidArgumentError(f"--layers {text!r}: each stage is START:END (layers START..END-1), like 0:10,10:{n_layers}") from None
    ranges.append((start, end))
  expected = 0
  for start, end in ranges:
    if start != expected or end <= start:
      raise InvalidArgumentError(f"--layers {text!r}: the ranges must follow each other from layer 0, each non-empty; {start}:{end} does not")
    expected = end
  if expected != n_layers: raise InvalidArgumentError(f"--layers {text!r} ends at layer {expected}, but the model has {n_layers} layers")
  return ranges

def split_by_weight(n_layers: int, weights: list[float]) -> list[tuple[int, int]]:
  """n_layers split into len(weights) contiguous ranges, each's size proportional to its weight and at least one layer."""
  n = len(weights)
  if not 1 <= n <= n_layers: raise InvalidArgumentError(f"cannot split {n_layers} layers into {n} stages")
  total, bounds, acc = sum(weights), [0], 0.0
  for i, w in enumerate(weights[:-1]):
    acc += w
    bounds.append(min(max(round(n_layers * acc / total), bounds[-1] + 1), n_layers - (n - 1 - i)))
  return list(zip(bounds, bounds[1:] + [n_layers]))

def stage_bytes(config: LlamaConfig, shapes: dict[str, tuple[int, ...]], raw_dtypes: dict[str, str], start: int, end: int,
                itemsize: int, positions: int, slots: int) -> int:
  """Bytes a stage holds: its tensors (GGUF blocks as stored, the rest in the compute dtype) and its KV cache."""
  def held(name: str) -> bool:
    if name.startswith("model.layers."): return start <= int(name.split(".")[2]) < end
    return (name.startswith("model.embed_tokens") and start == 0) or (name.startswith(("model.norm", "lm_head")) and end == config.n_layers)
  total = 0
  for name, shape in shapes.items():
    if not held(name): continue
    numel = 1
    for d in shape: numel *= d
    total += numel * GGUF_BLOCKS[raw_dtypes[name]] // 32 if raw_dtypes.get(name) in GGUF_BLOCKS else numel * itemsize
  return total + 2 * (end - start) * slots * config.n_kv_heads * config.head_dim * positions * itemsize

def find_node(label: str, nodes: list[dict]) -> dict:
  for node in nodes:
    if label in (node["NodeID"], node.get("NodeName"), node.get("NodeManagerAddress")): return node
    if len(label) >= 8 and node["NodeID"].startswith(label.lower()): return node
  known = ", ".join(f"{_label(n)} ({n['NodeID'][:8]})" for n in nodes)
  raise InvalidArgumentError(f"node {label!r} is not in the Ray cluster; its alive nodes: {known}")

def make_plan(config: LlamaConfig, nodes: list[dict], stage_bytes_of, stages: int | None = None, layers: str | None = None,
              node_labels: list[str] | None = None, backends: list[str] | None = None, dtypes: list[str] | None = None) -> list[StagePlan]:
  """The stages of a pipeline on `nodes` (ray.nodes(), alive ones). stages or layers says how many; node_labels places
  each stage (default: round the nodes, the largest memory first); backends and dtypes give each stage's (one for all,
  or one each). stage_bytes_of(start, end) estimates a stage's memory."""
  if not nodes: raise InvalidArgumentError("the Ray cluster has no alive nodes")
  given = parse_layers(layers, config.n_layers) if layers else None
  n = len(given) if given else stages
  if n is None or n < 1: raise InvalidArgumentError(f"the number of stages must be >= 1, but is {n}")
  if given and stages is not None and stages != n: raise InvalidArgumentError(f"--stages {stages} but --layers gives {n} stages")
  for flag, what, values in (("--nodes", "nodes", node_labels), ("--stage-backends", "backends", backends), ("--stage-dtypes", "dtypes", dtypes)):
    if values is not None and len(values) not in ((n,) if flag == "--nodes" else (1, n)):
      raise InvalidArgumentError(f"{flag} names {len(values)} {what}, but there are {n} stages")
  if node_labels: placed = [find_node(label, nodes) for label in node_labels]
  else:
    ordered = sorted(nodes, key=lambda node: -_memory(node))
    placed = [ordered[i % len(ordered)] for i in range(n)]
  if given is None:  # each stage's share of its node's memory
    per_node = {node["NodeID"]: sum(p["NodeID"] == node["NodeID"] for p in placed) for node in placed}
    given = split_by_weight(config.n_layers, [max(_memory(node), 1) / per_node[node["NodeID"]] for node in placed])
  backends, dtypes = backends or [None], dtypes or [None]
  plan = [StagePlan(a, b, node["NodeID"], _label(node), backends[i % len(backends)], stage_bytes_of(a, b), dtypes[i % len(dtypes)])
          for i, ((a, b), node) in enumerate(zip(given, placed))]
  for node in {p["NodeID"]: p for p in placed}.values():
    need = sum(s.nbytes for s in plan if s.node == node["NodeID"])
    if (have := _memory(node)) and need > have:
      on = [s.layers for s in plan if s.node == node["NodeID"]]
      raise InvalidArgumentError(f"the stages on node {_label(node)} (layers {', '.join(on)}) need about {need / 1e9:.3g} GB, but Ray reports "
                                 f"{have / 1e9:.3g} GB of memory there; give that node fewer layers (--layers), or add nodes")
  return plan

def _memory(node: dict) -> float: return node.get("Resources", {}).get("memory", 0)
def _label(node: dict) -> str: return node.get("NodeName") or node.get("NodeManagerAddress") or node["NodeID"][:8]
