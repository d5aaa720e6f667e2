"""A model as a pipeline of layer shards on a Ray cluster (tg_llama/cluster/): a real multi-node cluster on this machine
(Ray's own ray.cluster_utils.Cluster, three nodes with their own names and resources), stages placed on different nodes,
compared with transformers and with one process; a stage killed mid-generation; the plan's errors; the server."""
import os, signal, time
import numpy as np
import pytest
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster
import tg_llama
from tg_llama.cluster import load
from tg_llama.cluster.plan import make_plan, parse_layers, split_by_weight
from tg_llama.config import LlamaConfig
from tg_llama.errors import InvalidArgumentError, TgLlamaError
from tiny_models import PROMPT, hf_model, reference_greedy, reference_logits, write_hf

GB = 1 << 30

@pytest.fixture(scope="module")
def cluster():
  c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_name": "head"})
  for name in ("node-a", "node-b"): c.add_node(num_cpus=1, node_name=name, resources={name: 1})
  ray.init(address=c.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
  yield c
  ray.shutdown()
  c.shutdown()

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = hf_model("gqa_tied")
  return model, write_hf(model, tmp_path_factory.mktemp("tiny") / "hf")

def stage_nodes(model) -> list[str]:
  return [next(n["NodeName"] for n in ray.nodes() if n["NodeID"] == info["node"]) for info in model.runner.infos]

# *** the plan (no cluster) ***

NODES = [{"NodeID": "a" * 56, "NodeName": "big", "NodeManagerAddress": "10.0.0.1", "Resources": {"memory": 96 * GB}},
         {"NodeID": "b" * 56, "NodeName": "small", "NodeManagerAddress": "10.0.0.2", "Resources": {"memory": 32 * GB}}]
LLAMA_70B = LlamaConfig.preset("llama-3-70b")

def per_layer(gb: float): return lambda a, b: int((b - a) * gb * GB)

def test_layers_split_by_memory_like_exo():
  plan = make_plan(LLAMA_70B, NODES, per_layer(1.0), stages=2)
  assert [(p.start, p.end, p.node_label) for p in plan] == [(0, 60, "big"), (60, 80, "small")]  # 96 : 32 GB = 3 : 1
  assert split_by_weight(10, [1, 1, 1]) == [(0, 3), (3, 7), (7, 10)] and split_by_weight(3, [100, 1, 1]) == [(0, 1), (1, 2), (2, 3)]

def test_plan_by_hand_and_by_node():
  plan = make_plan(LLAMA_70B, NODES, per_layer(1.0), layers="0:20,20:80", node_labels=["small", "10.0.0.1"], backends=["cpu", "cuda"])
  assert [(p.layers, p.node_label, p.backend) for p in plan] == [("0:20", "small", "cpu"), ("20:80", "big", "cuda")]

@pytest.mark.parametrize("kwargs, message", [
  (dict(layers="0:40,41:80"), "must follow each other"),
  (dict(layers="0:40,40:81"), "ends at layer 81, but the model has 80"),
  (dict(layers="0-40"), "START:END"),
  (dict(stages=2, node_labels=["big", "gpu-box"]), "node 'gpu-box' is not in the Ray cluster"),
  (dict(stages=2, dtypes=["float32"] * 3), "--stage-dtypes names 3 dtypes, but there are 2 stages"),
  (dict(stages=3, node_labels=["big", "small"]), "names 2 nodes, but there are 3 stages"),
  (dict(layers="0:10,10:80", node_labels=["big", "small"]), r"node small \(layers 10:80\) need about 75.2 GB, but Ray reports 34.4 GB"),
  (dict(stages=81), "cannot split 80 layers into 81 stages"),
])
def test_plan_errors(kwargs, message):
  with pytest.raises(InvalidArgumentError, match=message): make_plan(LLAMA_70B, NODES, per_layer(1.0), **kwargs)

def test_parse_layers():
  assert parse_layers("0:1,1:30", 30) == [(0, 1), (1, 30)]

# *** pipelines on the cluster ***

def test_two_and_three_stages_on_different_nodes_equal_transformers(cluster, tiny):
  ref_model, path = tiny
  expected = reference_greedy(ref_model, PROMPT, 12)
  for nodes in (["node-a", "node-b"], ["head", "node-a", "node-b"]):
    model = load(path, stages=len(nodes), nodes=nodes, max_context=64)
    assert stage_nodes(model) == nodes and [p.layers for p in model.runner.plan] == (["0:2", "2:3"] if len(nodes) == 2 else ["0:1", "1:2", "2:3"])
    assert list(model.generate(PROMPT, 12)) == expected
    assert [t for t in model.generate(PROMPT[:5], 12)] == reference_greedy(ref_model, PROMPT[:5], 12)  # prefix reused
    for actor in model.runner.stages: ray.kill(actor)

def test_requests_in_flight_on_every_stage_at_once(cluster, tiny):
  # the engine sends each stage a step of its own (pipeline parallelism): 4 requests in 2 groups, each group's next step
  # sent as soon as its tokens are back, so stage 1 runs one group while stage 2 runs the other
  ref_model, path = tiny
  model = load(path, stages=2, nodes=["node-a", "node-b"], max_context=64, slots=4)
  prompts = [PROMPT, PROMPT[:5], PROMPT[2:9], (PROMPT * 3)[:38]]  # the last in prefill chunks (tg_llama/engine/engine.py)
  handles = [model.engine.submit(tg_llama.engine.engine.Request(tuple(p), 24)) for p in prompts]
  assert [[o.token for o in h] for h in handles] == [reference_greedy(ref_model, p, 24) for p in prompts]
  whole = (PROMPT[::-1] * 3)[:32]  # a step of one whole chunk and no rows
  assert list(model.generate(whole, 8)) == reference_greedy(ref_model, whole, 8)
  first, last = (info["spans"] for info in model.runner.stage_infos())
  overlaps = sum(a0 < b1 and b0 < a1 for a0, a1 in first for b0, b1 in last)
  assert overlaps >= 10, f"the stages computed at the same time {overlaps} times in {len(first)} steps"
  for actor in model.runner.stages: ray.kill(actor)

class Counted:
  """An actor handle whose calls of the named methods the driver makes are counted (the actors' own calls are not)."""
  def __init__(self, handle, *methods):
    self.handle, self.calls = handle, dict.fromkeys(methods, 0)
  def __getattr__(self, name):
    method = getattr(self.handle, name)
    if name not in self.calls: return method
    counted = self
    class Method:
      def remote(self, *args, **kwargs):
        counted.calls[name] += 1
        return method.remote(*args, **kwargs)
    return Method()

def test_the_last_stage_starts_the_next_decode_step_on_the_first(cluster, tiny):
  # a token's step goes last stage -> first -> last: the driver sends the first stage no decode step while the engine's
  # steps follow each other; when they do not (a request ends, its slot is reused), the step started ahead is dropped
  ref_model, path = tiny
  model = load(path, stages=2, nodes=["node-a", "node-b"], max_context=64, slots=2)
  first, last = model.runner.stages
  model.runner.stages = [Counted(first, "rows"), Counted(last, "settle")]
  before = model.runner.stage_infos()[0]["steps"]
  assert list(model.generate(PROMPT, 12)) == reference_greedy(ref_model, PROMPT, 12)
  # the prompt's steps (in rows) come from the driver; each new token's but the first from the last stage
  assert model.runner.stage_infos()[0]["steps"] - before - model.runner.stages[0].calls["rows"] >= 11
  short, long = (model.engine.submit(tg_llama.engine.engine.Request(tuple(p), n)) for p, n in ((PROMPT[:6], 4), (PROMPT[3:], 14)))
  assert [o.token for o in short] == reference_greedy(ref_model, PROMPT[:6], 4)  # its end changes the step's rows
  assert [o.token for o in long] == reference_greedy(ref_model, PROMPT[3:], 14)
  assert model.runner.stages[1].calls["settle"] >= 1 and model.runner.stages[0].calls["rows"] >= 1
  # the slots again, their prefixes reused: where a dropped step wrote is written again before it is read
  assert list(model.generate(PROMPT[:6] + PROMPT[:3], 10)) == reference_greedy(ref_model, PROMPT[:6] + PROMPT[:3], 10)
  assert list(model.generate(PROMPT, 12)) == reference_greedy(ref_model, PROMPT, 12)
  # a step started ahead whose logits the driver reads too (log-probabilities): transformers' log-softmax
  outs = list(model.engine.submit(tg_llama.engine.engine.Request(tuple(PROMPT), 6, logprobs=1)))
  tokens = [o.token for o in outs]
  assert tokens == reference_greedy(ref_model, PROMPT, 6)
  logits = reference_logits(ref_model, PROMPT + tokens[:-1])[len(PROMPT) - 1:]
  expected = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  np.testing.assert_allclose([o.logprob for o in outs], [row[t] for row, t in zip(expected, tokens)], atol=1e-4)
  for actor in (first, last): ray.kill(actor)
  # stages on one node's CPU share its cores: the driver's work would slow the first stage as much as it saves
  model = load(path, stages=2, nodes=["node-a", "node-a"], max_context=64)
  model.runner.stages[0] = Counted(model.runner.stages[0], "rows")
  before = model.runner.stage_infos()[0]["steps"]
  assert list(model.generate(PROMPT, 8)) == reference_greedy(ref_model, PROMPT, 8)
  assert model.runner.stage_infos()[0]["steps"] - before == model.runner.stages[0].calls["rows"]
  for actor in model.runner.stages: ray.kill(actor.handle if isinstance(actor, Counted) else actor)

def test_mixed_backends_cpu_and_opencl(cluster, tiny):
  ref_model, path = tiny
  model = load(path, stages=2, nodes=["node-a", "node-b"], backends=["cpu", "opencl"], max_context=64)
  assert [info["device"] for info in model.runner.infos] == ["CPU", "CL"]
  assert list(model.generate(PROMPT, 10)) == reference_greedy(ref_model, PROMPT, 10)
  for actor in model.runner.stages: ray.kill(actor)

def test_stages_in_different_dtypes(cluster, tiny):
  # hidden states go between stages as float32, whatever a stage computes in (a float16 stage before a float32 one, as
  # a CUDA stage before a CPU stage would be)
  ref_model, path = tiny
  model = load(path, stages=2, nodes=["node-a", "node-b"], dtypes=["float16", "float32"], max_context=64)
  assert [info["dtype"] for info in model.runner.infos] == ["half", "float"]
  logits, expected = model.logits(PROMPT), reference_logits(ref_model, PROMPT)[-1]
  assert logits.argmax() == expected.argmax() and np.abs(logits - expected).max() < 2e-2
  assert list(model.generate(PROMPT, 8)) == reference_greedy(ref_model, PROMPT, 8)
  for actor in model.runner.stages: ray.kill(actor)

def test_a_killed_stage_is_restarted_and_the_request_finishes_the_same(cluster, tiny):
  ref_model, path = tiny
  model = load(path, stages=2, nodes=["node-a", "node-b"], max_context=64, slots=2)
  expected = reference_greedy(ref_model, PROMPT, 20)
  other = model.engine.submit(tg_llama.engine.engine.Request(tuple(PROMPT[:4]), 20))  # a second sequence in another slot
  got = []
  for i, token in enumerate(model.generate(PROMPT, 20)):
    got.append(token)
    if i == 6: os.kill(model.runner.infos[1]["pid"], signal.SIGKILL)  # the last stage: its KV cache and sampler state go
  assert got == expected and model.runner.recoveries == 1
  assert [o.token for o in other] == reference_greedy(ref_model, PROMPT[:4], 20)
  old_pid = model.runner.infos[0]["pid"]
  got = []
  for i, token in enumerate(model.generate(PROMPT[:7], 10)):
    got.append(token)
    if i == 2: os.kill(old_pid, signal.SIGKILL)  # the first stage this time
  assert got == reference_greedy(ref_model, PROMPT[:7], 10) and model.runner.recoveries == 2
  for actor in model.runner.stages: ray.kill(actor)

def test_a_stage_that_cannot_come_back_fails_the_request_in_bounded_time(cluster, tiny):
  _, path = tiny
  model = load(path, stages=2, nodes=["node-a", "node-b"], max_context=64, restart_timeout=20)
  assert len(list(model.generate(PROMPT, 3))) == 3
  ray.kill(model.runner.stages[1], no_restart=True)
  start = time.monotonic()
  with pytest.raises(TgLlamaError, match=r"stage 2 of 2 \(layers 2:3 on node node-b\) died and cannot be restarted"): list(model.generate(PROMPT, 5))
  assert time.monotonic() - start < 30
  ray.kill(model.runner.stages[0])

def test_plan_errors_before_any_stage_starts(cluster, tiny):
  _, path = tiny
  with pytest.raises(InvalidArgumentError, match="node 'node-z' is not in the Ray cluster; its alive nodes: "): load(path, stages=2, nodes=["node-a", "node-z"])
  with pytest.raises(InvalidArgumentError, match="ends at layer 4, but the model has 3"): load(path, layers="0:2,2:4")

# *** the default model ***

@pytest.fixture(scope="module")
def smol_pipeline(cluster, smollm2_gguf):
  model = load(smollm2_gguf, stages=2, nodes=["node-a", "node-b"], max_context=256)  # as the CLI test loads it: its graphs from the cache
  yield model
  for actor in model.runner.stages: ray.kill(actor)

def test_default_model_two_stages_equal_one_process(smol_pipeline, smollm2_gguf):
  one = tg_llama.load(smollm2_gguf, max_context=256)
  ids = one.tokenizer.encode("The three primary colors are")
  assert list(smol_pipeline.generate(ids, 16)) == list(one.generate(ids, 16))
  assert smol_pipeline.quantization["mode"] == "gguf"

def test_cli_generate_on_the_cluster(cluster, smol_pipeline):
  import subprocess, sys
  prompt = "The capital of France is"
  tok = smol_pipeline.tokenizer
  ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(prompt)
  expected = prompt + tok.decode(list(smol_pipeline.generate(ids, 8, stop_ids=frozenset({tok.eos_id}))))
  out = subprocess.run([sys.executable, "-m", "tg_llama.cli", "generate", "--stages", "2", "--cluster", cluster.address, "--nodes", "node-b,node-a",
                        "--max-context", "256", "--prompt", prompt, "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.rstrip("\n") == expected and "layers 0:15 on node-b" in out.stderr

def test_server_on_two_stages_answers_the_openai_client(smol_pipeline):  # last: the server closes the engine
  openai = pytest.importorskip("openai")
  from tg_llama.chat_template import encode_chat
  from tg_llama.serve.app import create_app
  from conftest import serving
  messages = [{"role": "user", "content": "What is 2+2?"}]
  expected = smol_pipeline.tokenizer.decode(list(smol_pipeline.generate(encode_chat(smol_pipeline.tokenizer, messages), 12,
                                                                          stop_ids=smol_pipeline.tokenizer.stop_ids)))
  smol_pipeline.engine.start()
  with serving(create_app(smol_pipeline, "smol")) as url:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected.removesuffix("<|im_end|>") and reply.usage.completion_tokens <= 12
