"""Backends, as far as this GPU-less machine can check them:
- names resolve to tinygrad devices, unknown and unavailable ones fail in one line, each backend has its cache folder;
- compiled kernels land in that folder, and a second process compiles nothing (tinygrad's ASSERT_COMPILE);
- OpenCL runs for real on PoCL: a tiny model's logits equal transformers', the real model's greedy tokens equal the CPU's;
- every kernel of the real model's prefill and decode compiles for NVIDIA Hopper (nvrtc to a cubin, sm_90) and for
  AMD RDNA3 (LLVM, gfx1100), and renders as Metal source, on tinygrad's NULL device.

Each device runs in its own subprocess (`python tests/test_backends.py MODE ...`), since DEV is fixed per process."""
from __future__ import annotations
import json, os, pathlib, sqlite3, subprocess, sys
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parent.parent
PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356]  # any ids below SmolLM2's vocab
LLVM_FOR_AMD = ("libLLVM-19.so", "libLLVM-20.so", "libLLVM-21.so")  # tinygrad's AMD LLVM renderer fails on LLVM 15

def start_mode(mode: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
  """This file run as a script in MODE, with `env` added to the environment."""
  full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE.parent)]), **env}
  return subprocess.Popen([sys.executable, str(HERE), mode, *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def finish(proc: subprocess.Popen, timeout: int = 300) -> dict:
  """Its last stdout line, parsed as JSON."""
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"{proc.args[2:]} failed (rc {proc.returncode}):\n{err[-3000:]}"
  return json.loads(out.strip().splitlines()[-1])

def run_mode(mode: str, *args: str, env: dict[str, str]) -> dict: return finish(start_mode(mode, *args, env=env))

# ---- resolution and cache folders (in this process) ----

@pytest.fixture
def clean_env(monkeypatch, restore_backend_state):
  """No backend settings in the environment; and resolving a backend here (it sets this process's default device
  and kernel cache) leaves the rest of the test session as it was."""
  for var in ("TG_LLAMA_BACKEND", "TG_LLAMA_CACHE", "XDG_CACHE_HOME"): monkeypatch.delenv(var, raising=False)
  return monkeypatch

@pytest.mark.parametrize("name,device,ours", [("cpu", "CPU", "cpu"), ("CPU", "CPU", "cpu"), ("opencl", "CL", "opencl"), ("cl", "CL", "opencl"),
                                              ("cuda", "CUDA", "cuda"), ("cuda:1", "CUDA:1", "cuda"), ("nv", "NV", "nv"), ("amd", "AMD", "amd"),
                                              ("hip", "HIP", "hip"), ("metal", "METAL", "metal"), ("webgpu", "WEBGPU", "webgpu")])
def test_names_map_to_devices(name, device, ours):
  from tg_llama.backend import _named_device, canonical_name
  assert (_named_device(name), canonical_name(name)) == (device, ours)

@pytest.mark.parametrize("name", ["vulkan", "gpu", "", "cuda:x"])
def test_unknown_backend_lists_the_known_ones(name):
  from tg_llama.backend import _named_device
  from tg_llama.errors import TgLlamaError
  with pytest.raises(TgLlamaError) as e: _named_device(name)
  msg = str(e.value)
  assert "\n" not in msg and repr(name) in msg
  if name != "cuda:x": assert "known: amd, cpu, cuda, hip, metal, nv, opencl, webgpu" in msg

def test_resolve_cpu_and_opencl(clean_env):
  from tinygrad import dtypes
  from tg_llama.backend import resolve_backend
  cpu, cl = resolve_backend("cpu"), resolve_backend("opencl")
  assert (cpu.name, cpu.device, cpu.dtype) == ("cpu", "CPU", dtypes.float32)
  # PoCL has no cl_khr_fp16, and tinygrad cannot lower the model in emulated half there
  assert (cl.name, cl.device, cl.dtype) == ("opencl", "CL", dtypes.float32)

def test_precedence_and_default_device(clean_env):
  from tinygrad import Device, Tensor
  from tinygrad.helpers import Context
  from tg_llama.backend import resolve_backend
  with Context(DEV="CL"): assert resolve_backend().name == "opencl"   # tinygrad's DEV (read once, at import)
  clean_env.setenv("TG_LLAMA_BACKEND", "cpu")
  assert resolve_backend().name == "cpu"                              # ours over DEV
  assert resolve_backend("opencl").name == "opencl"                   # --backend over both
  # tensors made without a device follow the backend chosen
  assert Device.DEFAULT == "CL" and Tensor.empty(3).device == "CL"

@pytest.mark.parametrize("name,doc", [("cuda", "cuda"), ("nv", "cuda"), ("amd", "amd"), ("metal", "metal")])
def test_unavailable_backend_says_what_is_available(clean_env, name, doc):
  from tg_llama.backend import BACKENDS, _probe, resolve_backend
  from tg_llama.errors import TgLlamaError
  if _probe(BACKENDS[name]) is None: pytest.skip(f"{name} works on this machine")
  with pytest.raises(TgLlamaError) as e: resolve_backend(name)
  msg = str(e.value)
  assert "\n" not in msg and f"backend {name!r}" in msg and "not available" in msg
  assert "available here: cpu, opencl" in msg and f"backends/{doc}/README.md" in msg
  assert (REPO / "backends" / doc / "README.md").is_file()

def test_cache_folders(clean_env, tmp_path):
  from tg_llama.backend import resolve_backend
  assert resolve_backend("cpu").cache_dir == pathlib.Path("~/.cache/tg-llama/cpu").expanduser()
  clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert resolve_backend("opencl").cache_dir == tmp_path / "xdg" / "tg-llama" / "opencl"
  clean_env.setenv("TG_LLAMA_CACHE", str(tmp_path / "mine"))
  assert resolve_backend("cl").cache_dir == tmp_path / "mine" / "opencl"

def _fake_cache(folder: pathlib.Path, rows: int):
  folder.mkdir(parents=True)
  with sqlite3.connect(folder / "cache.db") as conn:
    conn.execute("CREATE TABLE 'compile_x_22' (key text, val blob)")
    conn.executemany("INSERT INTO 'compile_x_22' VALUES (?, ?)", [(str(i), b"k" * 100) for i in range(rows)])

def test_show_and_clear_caches(clean_env, tmp_path):
  from tg_llama.cache import clear_caches, list_caches, show_caches
  from tg_llama.errors import TgLlamaError
  clean_env.setenv("TG_LLAMA_CACHE", str(tmp_path))
  assert show_caches() == f"no kernel caches yet in {tmp_path}"
  _fake_cache(tmp_path / "cpu", 3); _fake_cache(tmp_path / "opencl", 5)
  (tmp_path / "notes").mkdir()  # not ours: never listed or removed
  assert [(c.backend, c.entries) for c in list_caches()] == [("cpu", 3), ("opencl", 5)]
  text = show_caches()
  assert "cpu" in text and "3 entries" in text and "5 entries" in text and str(tmp_path / "opencl") in text and "notes" not in text
  with pytest.raises(TgLlamaError): clear_caches("vulkan")
  assert clear_caches("cl") == [tmp_path / "opencl"] and not (tmp_path / "opencl").exists() and (tmp_path / "cpu").exists()
  assert clear_caches() == [tmp_path / "cpu"] and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]

# ---- the kernel cache, across processes ----

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[str, str, np.ndarray]:
  """A tiny random model's folder, the prompt (as the subprocesses take it) and transformers' logits for it."""
  from tiny_models import PROMPT, hf_model, reference_logits, write_hf
  model = hf_model("gqa_tied")
  return str(write_hf(model, tmp_path_factory.mktemp("tiny") / "hf")), ",".join(map(str, PROMPT)), reference_logits(model, PROMPT)

def test_kernel_cache_is_per_backend_and_reused(tiny_hf, tmp_path):
  path, prompt, _ = tiny_hf
  env = {"DEV": "CPU", "TG_LLAMA_CACHE": str(tmp_path / "tg"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
  first = run_mode("tiny", path, prompt, env=env)
  db = tmp_path / "tg" / "cpu" / "cache.db"
  from tg_llama.cache import count_entries
  assert first["cachedb"] == str(db) and count_entries(db) > 10
  # the compile workers too: tinygrad's default cache (under XDG_CACHE_HOME) stays unused
  assert not (tmp_path / "xdg" / "tinygrad").exists()
  # tinygrad raises on any compile under ASSERT_COMPILE: a second process must find every kernel in the cache
  second = run_mode("tiny", path, prompt, env={**env, "ASSERT_COMPILE": "1"})
  assert second["tokens"] == first["tokens"]

# ---- OpenCL for real, on PoCL ----

def test_opencl_tiny_model_matches_transformers(tiny_hf, tmp_path):
  path, prompt, ref = tiny_hf
  out = run_mode("tiny", path, prompt, env={"DEV": "CL", "TG_LLAMA_CACHE": str(tmp_path)})
  assert (out["device"], out["dtype"]) == ("CL", "float")
  # float32 compute, so as tight as the CPU parity tests
  np.testing.assert_allclose(np.array(out["logits"]), ref[-1], atol=1e-4, rtol=0)

@pytest.mark.slow
def test_opencl_real_model_greedy_equals_cpu(smollm2_gguf, tmp_path):
  procs = {dev: start_mode("greedy", str(smollm2_gguf), "8", env={"DEV": dev, "TG_LLAMA_CACHE": str(tmp_path)}) for dev in ("CL", "CPU")}
  cl, cpu = finish(procs["CL"]), finish(procs["CPU"])
  assert cl["device"] == "CL" and cpu["device"] == "CPU"
  assert len(cpu["tokens"]) == 8 and cl["tokens"] == cpu["tokens"]

# ---- every kernel compiled (or rendered) for GPUs, on tinygrad's NULL device ----

def nvrtc_dir() -> pathlib.Path:
  import importlib.util
  spec = importlib.util.find_spec("nvidia")
  for folder in (spec.submodule_search_locations if spec else []):
    for lib in sorted(pathlib.Path(folder).glob("cu*/lib/libnvrtc.so.*")):
      if lib.name.count(".") == 2: return lib.parent  # libnvrtc.so.13, not libnvrtc-builtins
  pytest.fail("nvrtc is missing: pip install nvidia-cuda-nvrtc (part of the test extra)")

@pytest.mark.slow
def test_cuda_compiles_every_kernel(smollm2_gguf):
  # tinygrad's library finder takes libnvrtc.so.13 from LD_LIBRARY_PATH as it is: no libnvrtc.so link needed
  out = run_mode("compile", str(smollm2_gguf), env={"DEV": "NULL:CUDA:sm_90", "LD_LIBRARY_PATH": str(nvrtc_dir())})
  assert (out["renderer"], out["compiler"], out["dtype"]) == ("CUDARenderer", "NVRTCCompiler", "half")
  assert out["kernels"] > 50 and out["elf"] == out["kernels"]   # NULL asks nvrtc for cubins (ELF): machine code for sm_90

@pytest.mark.slow
def test_amd_compiles_every_kernel(smollm2_gguf):
  found = [p for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib") for n in LLVM_FOR_AMD if (p := pathlib.Path(d) / n).is_file()]
  if not found: pytest.skip("needs LLVM 19 or newer for AMD's LLVM renderer: apt-get install -y libllvm19")
  out = run_mode("compile", str(smollm2_gguf), env={"DEV": "NULL:AMDLLVM:gfx1100", "LLVM_PATH": str(found[0])})
  assert (out["renderer"], out["compiler"], out["dtype"]) == ("AMDLLVMRenderer", "AMDLLVMCompiler", "half")
  assert out["kernels"] > 50 and out["elf"] == out["kernels"]

@pytest.mark.slow
def test_metal_renders_every_kernel(smollm2_gguf):
  out = run_mode("compile", str(smollm2_gguf), env={"DEV": "NULL:METAL", "STUB_METAL_COMPILER": "1"})
  assert (out["renderer"], out["dtype"]) == ("MetalRenderer", "half")
  assert out["kernels"] > 50 and out["metal_kernels"] == out["kernels"]

# ---- the subprocesses ----

def mode_tiny(path: str, prompt: str) -> dict:
  """The tiny model on DEV's backend through tg_llama: last-position logits of the prompt and 4 greedy tokens."""
  import tinygrad.helpers
  import tg_llama
  ids = [int(i) for i in prompt.split(",")]
  model = tg_llama.load(path, max_context=32)
  logits = model.logits(ids)
  return {"device": model.backend.device, "dtype": model.dtype.name, "cachedb": tinygrad.helpers.CACHEDB,
          "logits": logits.tolist(), "tokens": list(model.generate(ids, 4))}

def mode_greedy(path: str, n: str) -> dict:
  import tg_llama
  model = tg_llama.load(path, max_context=64)
  return {"device": model.backend.device, "tokens": list(model.generate(PROMPT_IDS, int(n)))}

def stub_metal_compiler():
  """tinygrad's Metal renderer imports the macOS compiler (libSystem.dylib): stand in for it, keeping the source."""
  import types
  from tinygrad.device import Compiler
  class MetalCompiler(Compiler):
    def __init__(self): super().__init__(None)
    def compile(self, src: str) -> bytes: return src.encode()
  sys.modules["tinygrad.runtime.ops_metal"] = types.SimpleNamespace(MetalCompiler=MetalCompiler)

def mode_compile(path: str) -> dict:
  """The real model on DEV=NULL:<renderer>:<arch>: load, prefill twice, decode three steps (run, capture, replay),
  counting what the renderer's compiler turns out. Run with PARALLEL=0 so it compiles in this process."""
  if os.environ.get("STUB_METAL_COMPILER"): stub_metal_compiler()
  from tinygrad import Device, Tensor, dtypes
  import tg_llama
  renderer = Device["NULL"].renderer
  compiler = type(renderer.compiler)
  libs: list[tuple[str, bytes]] = []
  compile_one = compiler.compile
  def counted(self, src: str) -> bytes:
    lib = compile_one(self, src)
    libs.append((src, lib))
    return lib
  compiler.compile = counted
  model = tg_llama.load(path, max_context=64)
  runner = model.runner
  runner.prefill(0, PROMPT_IDS, 0)
  runner.prefill(0, PROMPT_IDS[-1:], len(PROMPT_IDS) - 1)  # the last token again: the captured prefill graph replays
  for i in range(3): runner.decode([(0, len(PROMPT_IDS) + i, 7 + i)])
  return {"renderer": type(renderer).__name__, "compiler": compiler.__name__, "dtype": model.dtype.name, "kernels": len(libs),
          "elf": sum(lib[:4] == b"\x7fELF" for _, lib in libs), "metal_kernels": sum("#include <metal_stdlib>" in src and "kernel void" in src for src, _ in libs)}

if __name__ == "__main__":
  mode, args = sys.argv[1], sys.argv[2:]
  if mode == "compile":  # compile in this process (where compiles are counted), and every kernel afresh
    os.environ.update(PARALLEL="0", CACHELEVEL="0")  # tinygrad reads them at import, below
  print(json.dumps({"tiny": mode_tiny, "greedy": mode_greedy, "compile": mode_compile}[mode](*args)))
