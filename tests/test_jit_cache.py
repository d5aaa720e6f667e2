"""Captured graphs on disk (tg_llama/jit_cache.py): a second process replays the first one's graphs without running any
JIT function in Python and gives the same logits, tokens and draws; the key follows the settings; a file that does not
fit or is corrupt is ignored with a warning, captured again and rewritten. In this process, on a small graph: state
buffers map onto the live ones, a graph reading any other outside buffer is never written, a pickle naming other code
is refused.

The model runs in subprocesses (`python tests/test_jit_cache.py run ...`), each on a cache folder of the test's own."""
from __future__ import annotations
import json, os, pathlib, shutil, subprocess, sys, warnings
import numpy as np
import pytest
from tinygrad import Tensor, TinyJit
from tg_llama.jit_cache import GraphCache, graphs_enabled

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parent.parent
FORCED = [5, 77, 200]  # tokens fed to decode after the prompt, one step each
EIGHT = [9, 31, 64, 101, 150, 222, 300, 383]  # tokens fed after the prompt in one step of 8 rows
JITS = ["decode1", "decode8", "greedy1", "greedy8", "prefill_half", "sample1", "sample8"]  # the graphs mode_run uses

def run(cache: pathlib.Path, path: str, context: int = 32, graph_cache: bool = True, devices: int = 1, env: dict | None = None) -> dict:
  """This file as a script: the tiny model on DEV=CPU with its caches in `cache`; its report (the last stdout line)."""
  full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE.parent)]), "DEV": "CPU", "TG_LLAMA_CACHE": str(cache),
          **(env or {})}
  from tiny_models import PROMPT
  args = [path, ",".join(map(str, PROMPT)), str(context), str(int(graph_cache)), str(devices)]
  proc = subprocess.run([sys.executable, str(HERE), "run", *args], env=full, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])

def graph_files(cache: pathlib.Path) -> list[pathlib.Path]: return sorted((cache / "cpu" / "graphs").glob("*.pkl"))

def same_answers(a: dict, b: dict):
  np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6, rtol=0)
  np.testing.assert_allclose(a["steps"], b["steps"], atol=1e-6, rtol=0)
  np.testing.assert_allclose(a["eight"], b["eight"], atol=1e-6, rtol=0)
  assert (a["greedy"], a["sampled"]) == (b["greedy"], b["sampled"])

@pytest.fixture
def own_cache(monkeypatch, tmp_path, restore_backend_state):
  """Caches in tmp_path for a load() in this process; tinygrad's kernel cache and default device restored afterwards."""
  monkeypatch.setenv("TG_LLAMA_CACHE", str(tmp_path))
  monkeypatch.delenv("TG_LLAMA_GRAPH_CACHE", raising=False)
  return tmp_path

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, np.ndarray]:
  """A tiny random model's folder and transformers' logits for the prompt and the forced tokens."""
  from tiny_models import PROMPT, hf_model, reference_logits, write_hf
  model = hf_model("gqa_tied")
  return str(write_hf(model, tmp_path_factory.mktemp("tiny") / "hf")), reference_logits(model, PROMPT + FORCED)

@pytest.fixture(scope="module")
def first(tiny, tmp_path_factory) -> tuple[pathlib.Path, dict]:
  """A first process on an empty cache: it runs and captures every graph, and saves them. Tests copy its cache folder."""
  cache = tmp_path_factory.mktemp("first")
  return cache, run(cache, tiny[0])

def copy_of(first, tmp_path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(first[0], tmp_path / "cache"))

def test_first_process_captures_and_saves(tiny, first):
  cache, out = first
  from tiny_models import PROMPT
  assert out["loaded"] == [] and out["calls"] == {name: 1 for name in JITS}  # captured at the first call, replayed after
  assert len(graph_files(cache)) == 1 and out["warnings"] == []
  np.testing.assert_allclose(out["logits"], tiny[1][len(PROMPT) - 1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["steps"], tiny[1][len(PROMPT):], atol=1e-4, rtol=0)
  # no weights on disk: the file is the kernels and the graph's structure, not a byte run of any weight
  from safetensors.numpy import load_file
  held = graph_files(cache)[0].read_bytes()
  for name, w in load_file(pathlib.Path(tiny[0]) / "model.safetensors").items():
    assert w.astype(np.float32).tobytes()[:64] not in held, name

def test_second_process_replays_without_capture(first, tmp_path):
  cache = copy_of(first, tmp_path)
  before = {f: f.stat().st_ino for f in graph_files(cache)}
  second = run(cache, first[1]["path"])
  assert second["loaded"] == JITS and all(second["cnt"][name] >= 2 for name in JITS)
  assert second["calls"] == {}  # no JIT function ran in Python: nothing was scheduled or captured
  assert second["tinygrad_replays"] == 0  # every loaded graph ran on the CPU's runner from its first call
  same_answers(second, first[1])
  assert {f: f.stat().st_ino for f in graph_files(cache)} == before and second["warnings"] == []  # not rewritten: nothing new

def test_settings_change_the_key_and_other_buffers_are_refused(first, tmp_path):
  cache = copy_of(first, tmp_path)
  other = run(cache, first[1]["path"], context=48)
  assert other["loaded"] == [] and len(graph_files(cache)) == 2 and other["warnings"] == []
  np.testing.assert_allclose(other["logits"], first[1]["logits"], atol=1e-5, rtol=0)
  # the max_context=32 graphs under the max_context=48 name: the KV caches' sizes differ, so the loader refuses them
  small = cache / "cpu" / "graphs" / pathlib.Path(first[1]["file"]).name
  (large,) = [f for f in graph_files(cache) if f != small]
  shutil.copy(small, large)
  again = run(cache, first[1]["path"], context=48)
  assert again["loaded"] == [] and len(again["warnings"]) == 1 and "in the model" in again["warnings"][0]
  assert set(again["calls"]) == set(JITS) and large.read_bytes() != small.read_bytes()  # captured again and rewritten
  same_answers(again, other)

def test_a_corrupt_file_is_captured_again(first, tmp_path):
  cache = copy_of(first, tmp_path)
  (f,) = graph_files(cache)
  f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
  again = run(cache, first[1]["path"])
  assert again["loaded"] == [] and len(again["warnings"]) == 1 and "capturing them again" in again["warnings"][0]
  same_answers(again, first[1])
  assert run(cache, first[1]["path"])["loaded"] == JITS  # the rewritten file is whole

def test_opt_out_by_environment(first, tmp_path):
  cache = copy_of(first, tmp_path)
  before = {f: f.stat().st_ino for f in graph_files(cache)}
  out = run(cache, first[1]["path"], env={"TG_LLAMA_GRAPH_CACHE": "0"})
  assert out["loaded"] is None and set(out["calls"]) == set(JITS)
  same_answers(out, first[1])
  assert {f: f.stat().st_ino for f in graph_files(cache)} == before

def test_opt_out_by_argument(tiny, own_cache):
  import tg_llama
  assert tg_llama.load(tiny[0], max_context=16).graphs is not None
  assert tg_llama.load(tiny[0], max_context=16, graph_cache=False).graphs is None

def test_split_over_two_devices(tiny, first, tmp_path):
  cache = copy_of(first, tmp_path)
  out = run(cache, tiny[0], devices=2)
  assert out["loaded"] == [] and len(graph_files(cache)) == 2
  again = run(cache, tiny[0], devices=2)
  assert again["loaded"] == JITS and again["calls"] == {}
  same_answers(again, out)
  np.testing.assert_allclose(again["logits"], first[1]["logits"], atol=1e-5, rtol=0)

def test_enabled(monkeypatch):
  monkeypatch.delenv("TG_LLAMA_GRAPH_CACHE", raising=False)
  assert graphs_enabled() and not graphs_enabled(False)
  monkeypatch.setenv("TG_LLAMA_GRAPH_CACHE", "0")
  assert not graphs_enabled()

# ---- the file format, in this process, on a small graph ----

def small_graph():
  w, bias = Tensor([1.0, 2.0, 3.0, 4.0]).contiguous().realize(), Tensor([0.5, 0.5, 0.5, 0.5]).contiguous().realize()
  # intermediates that several kernels share: the memory planner puts them in one arena buffer, referenced many times
  def f(x: Tensor) -> Tensor: return (((x * w).contiguous() + 1).contiguous().exp2() * (x - bias).contiguous() + bias).realize()
  x = Tensor([1.0, -1.0, 2.0, 0.0]).contiguous().realize()
  return w, bias, f, x

def test_round_trip_maps_state_onto_live_buffers(tmp_path):
  w, bias, f, x = small_graph()
  jit = TinyJit(f)
  for _ in range(3): want = jit(x).numpy()
  state = lambda: {"w": w, "bias": bias}
  assert GraphCache({"f": jit}, state, lambda: tmp_path / "g.pkl").save_new()
  assert (tmp_path / "g.pkl").stat().st_size < 50_000
  replay = TinyJit(f)
  assert GraphCache({"f": replay}, state, lambda: tmp_path / "g.pkl").load() == ("f",) and replay.cnt == 2
  np.testing.assert_allclose(replay(x).numpy(), want, rtol=1e-6)
  w.assign(Tensor([2.0, 2.0, 2.0, 2.0])).realize()  # the loaded graph reads the live weight, not a copy
  np.testing.assert_allclose(replay(x).numpy(), f(x).numpy(), rtol=1e-6)
  other = TinyJit(f)  # a model without those buffers: refused
  with pytest.warns(RuntimeWarning, match="no buffer 'bias'"):
    assert GraphCache({"f": other}, lambda: {"w": w}, lambda: tmp_path / "g.pkl").load() == ()
  assert other.cnt == 0

def test_never_writes_a_graph_that_reads_other_buffers(tmp_path):
  w, bias, f, x = small_graph()
  jit = TinyJit(f)
  for _ in range(3): jit(x)
  with pytest.warns(RuntimeWarning, match="not the model's state"):
    assert not GraphCache({"f": jit}, lambda: {"w": w}, lambda: tmp_path / "g.pkl").save_new()  # bias would load as zeros
  assert not (tmp_path / "g.pkl").exists()

def test_prune_keeps_the_recently_used(tmp_path):
  from tg_llama.jit_cache import _prune
  for i, name in enumerate("abcd"):
    (tmp_path / f"{name}.pkl").write_bytes(b"x")
    os.utime(tmp_path / f"{name}.pkl", ns=(i * 10**9, i * 10**9))
  os.utime(tmp_path / "a.pkl")  # just loaded
  (tmp_path / ".tmp-x.tmp").write_bytes(b"x")  # a file being written
  _prune(tmp_path, 2)
  assert sorted(f.name for f in tmp_path.iterdir()) == [".tmp-x.tmp", "a.pkl", "d.pkl"]

class Evil:
  def __init__(self, mark: pathlib.Path): self.mark = mark
  def __reduce__(self): return os.system, (f"touch {self.mark}",)

def test_a_pickle_naming_other_code_is_not_run(tmp_path):
  import pickle
  mark = tmp_path / "ran"
  (tmp_path / "g.pkl").write_bytes(pickle.dumps({"format": 1, "graphs": {"f": Evil(mark)}}))
  jit = TinyJit(small_graph()[2])
  with pytest.warns(RuntimeWarning, match=r"refusing (posix|os)\.system"):
    assert GraphCache({"f": jit}, lambda: {}, lambda: tmp_path / "g.pkl").load() == ()
  assert not mark.exists() and jit.cnt == 0

# ---- the subprocess ----

def mode_run(path: str, prompt: str, context: str, graph_cache: str, devices: str) -> dict:
  import tg_llama
  from tg_llama.jit_cache import model_jits
  from tg_llama.sampling import SamplingParams
  PROMPT = [int(i) for i in prompt.split(",")]
  model = tg_llama.load(path, max_context=int(context), graph_cache=graph_cache == "1", devices=int(devices))
  from tinygrad.engine.jit import CapturedJit
  replays, replay = [], CapturedJit.__call__  # tinygrad's own replay, one kernel at a time from Python (not the CPU runner's)
  CapturedJit.__call__ = lambda self, *a, **kw: replays.append(1) or replay(self, *a, **kw)
  jits, calls = model_jits(model), {}
  for name, jit in jits.items():  # a capture calls the function in Python; a replay never does
    jit.fxn = lambda *a, _f=jit.fxn, _name=name, **kw: calls.update({_name: calls.get(_name, 0) + 1}) or _f(*a, **kw)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded = None if model.graphs is None else list(model.graphs.load())
    cnt = {name: jit.cnt for name, jit in jits.items()}
    # every graph used runs at least twice (captured, then replayed) before the engine's last step saves them: the prefill
    # chunk and a step of 8 rows here, and each request starts a new prefix, so its 12 prompt tokens run as two steps of 8
    # rows (the last 4 padded to the step of 8, whose graph is ready: the runner's step_rows)
    for _ in range(2): model.runner.prefill(0, PROMPT, 0)
    eight = [model.runner.decode([(0, len(PROMPT) + i, t) for i, t in enumerate(EIGHT)]).numpy().tolist() for _ in range(2)][-1]
    new_prefix = lambda k: [(t + 40 * k) % 384 for t in PROMPT]
    logits = [model.logits(new_prefix(k)) for k in range(2)][0]
    greedy = [list(model.generate(new_prefix(k), 4)) for k in (2, 3)][-1]
    sampled = [list(model.generate(new_prefix(k), 4, SamplingParams(temperature=1.0, seed=7))) for k in (4, 5)][-1]
    model.runner.prefill(0, PROMPT, 0)
    steps = [model.runner.decode([(0, len(PROMPT) + i, t)]).numpy()[0].tolist() for i, t in enumerate(FORCED)]
  return {"path": path, "loaded": None if loaded is None else sorted(loaded), "cnt": cnt, "calls": dict(sorted(calls.items())),
          "tinygrad_replays": len(replays),
          "logits": logits.tolist(), "greedy": greedy, "sampled": sampled, "steps": steps, "eight": eight,
          "file": None if model.graphs is None else str(model.graphs.path),
          "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}

if __name__ == "__main__":
  print(json.dumps({"run": mode_run}[sys.argv[1]](*sys.argv[2:])))

def test_warm_up_saves_the_graphs_a_first_turn_runs(tiny, own_cache, capsys):
  import tg_llama
  from tg_llama.cli import warm_up
  warm_up(tg_llama.load(tiny[0], max_context=32))
  # a new start finds every graph the warm-up runs: a 2-token prompt and its answer in 1-row steps (no graph of the
  # prompt's own: the runner's step_rows)
  loaded = set(tg_llama.load(tiny[0], max_context=32).graphs.load())
  assert {"decode1", "greedy1"} <= loaded and not {"decode2", "greedy2"} & loaded, loaded

def test_a_chats_warm_up_saves_what_its_first_turn_runs(tiny, own_cache, capsys):
  import tg_llama
  from tg_llama.cli import warm_up
  from tg_llama.sampling import SamplingParams
  warm_up(tg_llama.load(tiny[0], max_context=64), SamplingParams(temperature=0.2, top_p=0.9, repetition_penalty=1.05))
  # a half prefill chunk and its last 8 tokens as a step of 8 rows (a chat's rows may capture theirs: the runner's
  # rows_capture), then steps of 1, each sampled; no greedy 2-row step
  loaded = set(tg_llama.load(tiny[0], max_context=64).graphs.load())
  assert {"prefill_half", "decode8", "sample8", "decode1", "sample1"} <= loaded and not {"decode2", "greedy2"} & loaded, loaded
