"""The CPU backend's own code (tg_llama/cpu/) stays in its place:
- nothing of it is imported by `import tg_llama`, nor by a model loaded and run on another backend (OpenCL, on PoCL);
  on the CPU backend it is, and there our kernel choices and graph replay run;
- the model asks the backend for its layout: the CPU's own on the CPU, the plain one elsewhere;
- when tinygrad lacks an internal that the kernel choices or the graph runner rely on, that part keeps tinygrad's own
  path after exactly one warning naming it, and the model gives the same greedy tokens as on the normal path
  (transformers' own: both are checked against them).

The model runs in subprocesses (`python tests/test_cpu_seam.py run ...`): which modules a process imported, and which
heuristic tinygrad calls, are per process. A tinygrad that lacks an internal is simulated as our module sees tinygrad:
deleting the real attribute would break tinygrad itself, where a tinygrad without it would not use it."""
from __future__ import annotations
import importlib, json, os, pathlib, platform, subprocess, sys, types, warnings
import numpy as np
import pytest
from tinygrad import Tensor
from tinygrad.engine.jit import CapturedJit

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parent.parent
CPU_MODULES = ["tg_llama.cpu", "tg_llama.cpu.graph", "tg_llama.cpu.opts", "tg_llama.cpu.vectors"]

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
  """A tiny GQA model whose greedy tokens vary (one token over and over would hide a wrong step), its prompt, and
  transformers' logits after the prompt and 8 greedy tokens."""
  from tiny_models import PROMPT, hf_model, reference_greedy, reference_logits, write_hf
  model = hf_model("gqa_rope_llama3", seed=1)
  return {"path": str(write_hf(model, tmp_path_factory.mktemp("tiny") / "hf")), "prompt": PROMPT,
          "tokens": reference_greedy(model, PROMPT, 8), "logits": reference_logits(model, PROMPT)[-1]}

def run(tiny: dict, backend: str, module: str = "", alias: str = "", name: str = "") -> dict:
  """mode_run in a subprocess of its own, on DEV=`backend`'s device; its output, checked against transformers'."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE.parent)]), "DEV": {"cpu": "CPU", "opencl": "CL"}[backend]}
  args = [tiny["path"], ",".join(map(str, tiny["prompt"])), backend, module, alias, name]
  proc = subprocess.run([sys.executable, str(HERE), "run", *args], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{args[2:]} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  if "skip" not in out:
    assert out["tokens"] == tiny["tokens"]
    np.testing.assert_allclose(out["logits"], tiny["logits"], atol=1e-4, rtol=0)  # float32 compute, as the parity tests
  return out

# ---- imported only on the CPU ----

def test_import_and_another_backend_leave_the_cpu_package_alone(tiny):
  out = run(tiny, "opencl")
  assert out["after_import"] == []
  if "skip" in out: pytest.skip(f"OpenCL does not open here: {out['skip']}")
  assert out["device"] == "CL" and out["after_run"] == []

def test_the_cpu_backend_imports_it_and_runs_it(tiny):
  out = run(tiny, "cpu")
  assert out["after_import"] == [] and out["device"] == "CPU" and set(CPU_MODULES) <= set(out["after_run"])
  assert out["our_heuristic"] and out["our_pool"] and out["our_vectors"] and out["graph"] == "ThreadedJit" and out["warnings"] == []
  assert out["vectors_said"].startswith("loads up to ") and "tinygrad's" not in out["vectors_said"]  # what the bench says
  # clang's vectorizer bundles at most a register of floats on an x86 CPU with AVX2 or AVX-512 where the probe chose that
  # (vectors.py), and says so
  assert out["capped"] == (out["x86_wide"] and out["cap_chosen"]) and ("vectorizer capped" in out["vectors_said"]) == out["capped"]

def test_the_layout_is_the_backends():
  from tg_llama import cpu
  from tg_llama.backend import KernelLayout, kernel_layout
  assert kernel_layout("CPU") == kernel_layout(("CPU:0", "CPU:1")) == cpu.LAYOUT != KernelLayout()
  assert kernel_layout("CL") == kernel_layout("CUDA:1") == KernelLayout()
  assert (KernelLayout().dot_lanes, KernelLayout().matvec_lanes, KernelLayout().even_groups, KernelLayout().panel) == (1, 1, False, 0)

# ---- a tinygrad without an internal we rely on ----

def without(module: types.ModuleType, name: str | None) -> types.ModuleType:
  """A copy of `module`, as a tinygrad that lacks `name` would show it to our code."""
  fake = types.ModuleType(module.__name__)
  fake.__dict__.update({k: v for k, v in vars(module).items() if k != name})
  return fake

@pytest.mark.parametrize("module,alias,name", [("tg_llama.cpu.opts", "heuristic", "hand_coded_optimizations"),
                                               ("tg_llama.cpu.graph", "realize", "get_runtime"),
                                               ("tg_llama.cpu.vectors", "coalesce", "memory_coalescing")])
def test_a_missing_internal_falls_back_with_one_warning(tiny, module, alias, name):
  out = run(tiny, "cpu", module, alias, name)  # the same tokens as transformers', as on the normal path above
  assert len(out["warnings"]) == 1 and f"tinygrad's own path: this tinygrad has no {out['missing']}.{name}" in out["warnings"][0], out["warnings"]
  if alias == "heuristic": assert not out["our_heuristic"] and not out["our_pool"] and not out["our_vectors"] and out["graph"] == "ThreadedJit"
  elif alias == "realize": assert out["our_heuristic"] and out["our_pool"] and out["our_vectors"] and out["graph"] == "CapturedJit"
  else: assert out["our_heuristic"] and out["our_pool"] and not out["our_vectors"] and not out["capped"] and out["graph"] == "ThreadedJit" and "(tinygrad's)" in out["vectors_said"]

def test_lengths_not_as_we_know_them_keep_tinygrads_folding_with_one_warning(monkeypatch):
  # another tinygrad whose memory_coalescing chooses its vector lengths otherwise: we do not rewrite it
  from tg_llama import cpu
  from tg_llama.cpu import vectors
  monkeypatch.setattr(vectors, "THEIRS", "lengths = [4,2]  # another tinygrad's")
  monkeypatch.setattr(vectors.codegen, "memory_coalescing", vectors.coalesce.memory_coalescing)  # as before any install()
  vectors.wide_coalescing.cache_clear()
  cpu.fall_back.cache_clear()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      vectors.install()
      vectors.install()
    assert [str(w.message) for w in caught] == ["folding the CPU's loads into vectors uses tinygrad's own path: this tinygrad has no "
                                               "'lengths = [4,2]  # another tinygrad's' in memory_coalescing"]
    assert vectors.codegen.memory_coalescing is vectors.coalesce.memory_coalescing
  finally:
    vectors.wide_coalescing.cache_clear()
    cpu.fall_back.cache_clear()

@pytest.mark.parametrize("alias,name", [("heuristic", "hand_coded_optimizations"), ("worker", "_init_worker"),
                                        ("realize", "get_worker_pool"), ("search", "get_worker_pool")])
def test_each_internal_the_kernel_choices_rebind_is_checked(monkeypatch, alias, name):
  from tg_llama import cpu
  from tg_llama.cpu import opts
  for a in ("heuristic", "realize", "search", "worker"):  # copies, for install() to write to if it wrongly did
    monkeypatch.setattr(opts, a, without(getattr(opts, a), name if a == alias else None))
  # as tinygrad has them before any install(): an earlier test in this process may have installed ours in the real modules
  for a, attr, theirs in (("heuristic", "hand_coded_optimizations", opts._theirs), ("realize", "get_worker_pool", opts.worker.get_worker_pool),
                          ("search", "get_worker_pool", opts.worker.get_worker_pool)):
    if (a, attr) != (alias, name) and hasattr(getattr(opts, a), attr): setattr(getattr(opts, a), attr, theirs)
  cpu.fall_back.cache_clear()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opts.install()
    opts.install()
  assert [str(w.message) for w in caught] == \
         [f"choosing the CPU's kernels uses tinygrad's own path: this tinygrad has no {getattr(opts, alias).__name__}.{name}"]
  assert getattr(opts.heuristic, "hand_coded_optimizations", None) is not opts.hand_coded_optimizations  # nothing rebound
  assert getattr(opts.realize, "get_worker_pool", None) is not opts.get_worker_pool
  cpu.fall_back.cache_clear()

@pytest.mark.parametrize("name", ["get_runtime", "get_call_arg_uops"])
def test_each_internal_the_graph_runner_reads_is_checked(monkeypatch, name):
  from tg_llama import cpu
  from tg_llama.cpu import graph
  from tg_llama.engine.runner import Jit
  monkeypatch.setattr(graph, "realize", without(graph.realize, name))
  cpu.fall_back.cache_clear()
  w = Tensor.randn(24, 16).realize()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for k in (1, 2):  # two graphs, one warning
      jit = Jit(lambda x: (w @ x * k).realize())
      for _ in range(3): out = jit(x := Tensor.randn(16).realize())
      assert type(jit.captured) is CapturedJit  # tinygrad's replay
      np.testing.assert_allclose(out.numpy(), k * (w.numpy() @ x.numpy()), atol=1e-5)
  assert [str(m.message) for m in caught] == \
         [f"replaying captured graphs on the CPU uses tinygrad's own path: this tinygrad has no tinygrad.engine.realize.{name}"]
  cpu.fall_back.cache_clear()

# ---- the subprocess ----

def mode_run(path: str, prompt: str, backend: str, module: str, alias: str, name: str) -> dict:
  """The tiny model on `backend`, with tinygrad's `alias` module lacking `name` as our `module` sees it (none: as it is).
  Which tg_llama.cpu modules are imported after `import tg_llama` (and its backend, engine and model modules) and after the
  run, the RuntimeWarnings, the prompt's logits, 8 greedy tokens (generated twice: the second replays the captured graphs),
  and whether our heuristic and compile pool and our graph replay were used."""
  import tg_llama, tg_llama.api, tg_llama.backend, tg_llama.engine.runner, tg_llama.jit_cache, tg_llama.models.blocks  # noqa: F401
  ours = lambda: sorted(m for m in sys.modules if m == "tg_llama.cpu" or m.startswith("tg_llama.cpu."))
  out: dict = {"after_import": ours()}
  from tg_llama.backend import BACKENDS, _probe
  if (why := _probe(BACKENDS[backend])) is not None: return {**out, "skip": why}
  if module:
    owner = importlib.import_module(module)
    out["missing"] = getattr(owner, alias).__name__
    setattr(owner, alias, without(getattr(owner, alias), name))
  ids = [int(t) for t in prompt.split(",")]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = tg_llama.load(path, backend=backend, max_context=64, graph_cache=False)
    logits = model.logits(ids)
    tokens = list(model.generate(ids, 8))
    again = list(model.generate(ids, 8))
  out.update(device=model.backend.device, after_run=ours(), warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
             logits=np.asarray(logits).reshape(-1).tolist(), tokens=tokens if again == tokens else [tokens, again],
             graph=type(model.runner.decode_jits[1].captured).__name__)
  if backend == "cpu":
    import tinygrad.codegen.opt.heuristic as heuristic
    import tinygrad.engine.realize as realize
    import tinygrad.codegen as codegen
    from tinygrad import Device
    from tg_llama.cpu import opts, vectors
    out.update(our_heuristic=heuristic.hand_coded_optimizations is opts.hand_coded_optimizations, our_pool=realize.get_worker_pool is opts.get_worker_pool,
               our_vectors=codegen.memory_coalescing is vectors.memory_coalescing, vectors_said=vectors.describe(),
               capped=vectors.is_capped(Device["CPU"].renderer.compiler),
               x86_wide=platform.machine().lower() in ("x86_64", "amd64") and vectors.width() > 4, cap_chosen=vectors.CAP)
  return out

if __name__ == "__main__":
  print(json.dumps(mode_run(*sys.argv[2:])))
