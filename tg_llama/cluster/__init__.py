"""A model too big for one machine, run as a pipeline of layer shards (stages) on a Ray cluster, as one model.

`tg_llama.cluster.load(source, stages=2)` plans the stages (tg_llama/cluster/plan.py), starts one Ray actor per stage on
its node (tg_llama/cluster/stage.py: each reads only its layers' tensors, on its own backend), and returns a
tg_llama.api.Model whose engine drives the pipeline (tg_llama/cluster/pipeline.py): generate, stream, the chat and the
server run on it as on one process. Ray is an optional extra (`pip install 'tg-llama[cluster]'`), imported only here."""
from __future__ import annotations
import logging, pathlib, sys, time
from tg_llama.errors import InvalidArgumentError, TgLlamaError

def connect(address: str | None = None):
  """Ray, connected: to the cluster at `address` (as `ray start --head` prints it, or "auto"), else to a local instance
  started for this process (unless this process is connected already)."""
  try: import ray
  except ImportError: raise TgLlamaError("running a model as stages needs Ray: pip install 'tg-llama[cluster]'") from None
  if not ray.is_initialized():
    try: ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as e:
      raise TgLlamaError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         " (start one with `ray start --head`, or leave out --cluster for a local one)") from None
  return ray

def load(source: str | pathlib.Path | None = None, stages: int | None = None, layers: str | None = None, nodes: list[str] | None = None,
         backends: list[str] | None = None, address: str | None = None, backend: str | None = None, dtype: str | None = None,
         dtypes: list[str] | None = None, max_context: int | None = None, slots: int = 1, quantize: str | None = None,
         graph_cache: bool = True, progress: bool = False, max_restarts: int = 3, timeout: float = 600, restart_timeout: float = 300):
  """The model at `source` (a path every node can read at the same place, an HF repo id, or None: the default model) as
  a pipeline: `stages` stages split by memory, or `layers` ("0:10,10:30") by hand; `nodes` places each stage (Ray node
  id, node name or IP); `backends` gives each stage's backend (one for all, or one each; default `backend`, else each
  node's own), `dtypes` each stage's compute dtype (likewise; default `dtype`, else each backend's own). Everything is
  checked (the plan against the cluster's nodes and memory) before any weights are read.
  A stage that dies is restarted up to `max_restarts` times; one that is not back within `restart_timeout` seconds fails
  the requests it was running."""
  import tinygrad
  from tg_llama.api import DTYPES, Model
  from tg_llama.assets import resolve_model
  from tg_llama.cluster.pipeline import PipelineRunner
  from tg_llama.cluster.plan import make_plan, stage_bytes
  from tg_llama.cluster.stage import Stage
  from tg_llama.convert import open_checkpoint
  dtypes = dtypes or ([dtype] if dtype else None)
  for d in dtypes or []:
    if d not in DTYPES: raise InvalidArgumentError(f"unknown dtype {d!r}; choose one of {', '.join(DTYPES)}")
  if slots < 1: raise InvalidArgumentError(f"slots must be >= 1, but is {slots}")
  path = resolve_model(None if source is None else str(source))
  ckpt = open_checkpoint(path)  # the config, the tokenizer and the tensors' shapes: no weights are read here
  context = min(ckpt.config.max_context, 4096) if max_context is None else max_context
  if context < 1: raise InvalidArgumentError(f"max_context must be >= 1, but is {context}")
  ray = connect(address)
  alive = [n for n in ray.nodes() if n.get("Alive")]
  # a backend's own dtype is known on its node only: the larger
  itemsize = max(DTYPES[d or "float32"].itemsize for d in dtypes or [None])
  plan = make_plan(ckpt.config, alive, lambda a, b: stage_bytes(ckpt.config, ckpt.shapes, ckpt.raw_dtypes, a, b, itemsize, context + 64, slots),
                   stages, layers, nodes, backends or ([backend] if backend else None), dtypes)
  from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
  remote = ray.remote(Stage)
  # each node reads the file at the same path (or its own default model)
  spec = None if source is None else str(path.absolute()) if pathlib.Path(str(source)).expanduser().exists() else str(source)
  started = time.perf_counter()
  actors = [remote.options(num_cpus=0, max_restarts=max_restarts, max_task_retries=0, name=None,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(p.node, soft=False))
            .remote(spec, p.start, p.end, p.backend, p.dtype, context, slots, quantize, graph_cache,
                    shares_node=sum(q.node == p.node for q in plan) > 1) for p in plan]
  infos = []
  for i, (actor, p) in enumerate(zip(actors, plan)):
    try: infos.append(ray.get(actor.info.remote(), timeout=timeout))
    except Exception as e:
      for a in actors: ray.kill(a)
      cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
      if isinstance(cause, TgLlamaError): raise type(cause)(f"stage {i + 1} (layers {p.layers} on node {p.node_label}): {cause}") from None
      raise TgLlamaError(f"stage {i + 1} (layers {p.layers} on node {p.node_label}) did not start: {type(cause).__name__}: "
                         f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}") from None
    if progress: print(f"stage {i + 1}/{len(plan)}: layers {p.layers} on {p.node_label} ({infos[-1]['device']}, "
                       f"{infos[-1]['load_s']:.1f} s)", file=sys.stderr)
  runner = PipelineRunner(actors, plan, infos, ckpt.config, context, slots, timeout=timeout, restart_timeout=restart_timeout)
  runner.start_s = time.perf_counter() - started
  return Model(runner, ckpt, None, getattr(tinygrad.dtypes, infos[-1]["dtype"]), quantization={"mode": infos[0]["quantize"]})
