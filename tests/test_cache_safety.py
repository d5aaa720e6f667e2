"""The caches are the user's trust domain, or not used: a new cache folder and its files are private (0700/0600); one that
another user owns, or that group or others can write, is refused with one warning and the process runs without a cache
(kernels in a private temporary folder, no graph files, the CPU's graph runner built afresh); the graph reader builds only
the classes a graph holds; `tg-llama cache --clear` deletes only the files the cache wrote, and works on a corrupt cache.db.

Every test runs on a cache folder of its own (TG_LLAMA_CACHE); "another user" is uid 65534 (the tests run as root)."""
from __future__ import annotations
import hashlib, os, pathlib, pickle, re, sqlite3, stat, subprocess, warnings
import pytest
import tinygrad.helpers as tg_helpers
from tinygrad import Tensor, TinyJit
from tg_llama import cli
from tg_llama.cpu import graph as cpu_graph
from tg_llama.backend import resolve_backend
from tg_llama.jit_cache import GraphCache, _Reader, state_buffers

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")

@pytest.fixture
def cache(monkeypatch, tmp_path, restore_backend_state) -> pathlib.Path:
  """TG_LLAMA_CACHE in tmp_path; the backend state and the CPU graph runner are as before afterwards."""
  for var in ("TG_LLAMA_BACKEND", "TG_LLAMA_GRAPH_CACHE"): monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("TG_LLAMA_CACHE", str(root := tmp_path / "cache"))
  monkeypatch.setattr(cpu_graph, "threads", lambda: 1)  # a runner loaded here starts no thread pool
  cpu_graph.runner.cache_clear()
  yield root
  cpu_graph.runner.cache_clear()

def mode(p: pathlib.Path) -> int: return stat.S_IMODE(p.stat().st_mode)

def resolve_warnings(name: str = "cpu") -> tuple[object, list[str]]:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    be = resolve_backend(name)
  return be, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]

# ---- private folders and files ----

def test_a_new_cache_is_private(cache):
  be, warned = resolve_warnings()
  assert be.cache_dir == cache / "cpu" and warned == []
  tg_helpers.diskcache_put("test_private", "k", 1)  # tinygrad's sqlite writes the database and its -wal and -shm files
  assert mode(cache) == mode(cache / "cpu") == 0o700
  files = [f for f in (cache / "cpu").iterdir() if f.name.startswith("cache.db")]
  assert {f.name for f in files} >= {"cache.db", "cache.db-wal"} and all(mode(f) == 0o600 for f in files)
  w, f, x = small_graph()
  jit = TinyJit(f)
  for _ in range(3): jit(x)
  assert GraphCache({"f": jit}, lambda: {"w": w}, lambda: cache / "cpu" / "graphs" / "g.pkl").save_new()
  assert mode(cache / "cpu" / "graphs") == 0o700 and mode(cache / "cpu" / "graphs" / "g.pkl") == 0o600

def _other_user(path: pathlib.Path): os.chown(path, NOBODY, NOBODY)
def _group_writable(path: pathlib.Path): path.chmod(mode(path) | 0o020)
def _others_writable(path: pathlib.Path): path.chmod(mode(path) | 0o002)

@needs_root
@pytest.mark.parametrize("where", ["root", "cpu", "cache.db", "graphs", "graphs/g.pkl", "graph_runner_0.so"])
@pytest.mark.parametrize("spoil", [_other_user, _group_writable, _others_writable])
def test_a_cache_others_could_write_is_not_used(cache, where, spoil):
  folder = cache / "cpu"
  (folder / "graphs").mkdir(parents=True)
  sqlite3.connect(folder / "cache.db").close()
  for name in ("graphs/g.pkl", "graph_runner_0.so"): (folder / name).write_bytes(b"x")
  spoil({"root": cache, "cpu": folder}.get(where, folder / where))
  be, warned = resolve_warnings()
  assert be.cache_dir is None and len(warned) == 1 and f"not using the cache in {folder}" in warned[0]
  assert "owned by another user" in warned[0] or "writable by" in warned[0]
  assert not tg_helpers.CACHEDB.startswith(str(cache)) and os.environ["CACHEDB"] == tg_helpers.CACHEDB  # kernels elsewhere
  assert resolve_warnings()[1] == []  # one warning, not one per resolve

def test_no_cache_reads_and_writes_no_graph_files(cache, tmp_path):
  import tg_llama
  from tiny_models import PROMPT, hf_model, write_hf
  path = write_hf(hf_model("gqa_tied"), tmp_path / "hf")
  (cache / "cpu").mkdir(parents=True)
  _others_writable(cache / "cpu")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = tg_llama.load(path, max_context=16)
  assert model.backend.cache_dir is None
  for _ in range(3): list(model.generate(PROMPT, 3))
  assert model.graphs is None or (model.graphs.load() == () and not model.graphs.save_new())
  assert not (cache / "cpu" / "graphs").exists()

# ---- the graph reader builds what a graph holds, nothing else ----

def small_graph():
  w = Tensor([1.0, 2.0, 3.0, 4.0]).contiguous().realize()
  def f(x: Tensor) -> Tensor: return ((x * w).contiguous() + 1).exp2().realize()
  return w, f, Tensor([1.0, -1.0, 2.0, 0.0]).contiguous().realize()

def test_a_real_graph_loads_with_the_allowed_classes(cache, tmp_path, monkeypatch):
  import tg_llama
  from tg_llama.jit_cache import GRAPH_CLASSES, model_state
  from tiny_models import PROMPT, hf_model, write_hf
  path = write_hf(hf_model("gqa_tied"), tmp_path / "hf")
  model = tg_llama.load(path, max_context=64)
  for k in range(2):  # twice each from new prefixes: a prefill chunk, and steps of 1 row (the 12 tokens' and the answers')
    list(model.generate([(t + 40 * k) % 384 for t in PROMPT * 5], 3))  # 60 tokens: one whole chunk
    list(model.generate([(t + 40 * k + 20) % 384 for t in PROMPT], 3))                # 12: rows
  model.graphs.save_new()  # generate saves them as soon as they are captured
  assert model.graphs.path.is_file()
  asked = []
  class Recording(_Reader):
    def find_class(self, module, name):
      asked.append((module, name))
      return super().find_class(module, name)
  with open(model.graphs.path, "rb") as f: Recording(f, state_buffers(model_state(model))).load()
  assert asked and set(asked) <= GRAPH_CLASSES
  fresh = tg_llama.load(path, max_context=64)
  assert set(fresh.graphs.load()) >= {"prefill", "decode1", "greedy1"}
  from tg_llama import jit_cache
  key = jit_cache.graph_key(model)  # the CPU's kernels are built with -march=native: another CPU gets other files
  monkeypatch.setattr(cpu_graph, "cpu_features", lambda: "flags : fpu sse2")
  assert jit_cache.graph_key(model) != key

def crafted(module: str, name: str, arg: str) -> bytes:
  """A protocol-4 pickle that calls module.name(arg): protocol 4 resolves a dotted name attribute by attribute."""
  return (b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode() + pickle.SHORT_BINUNICODE + bytes([len(name)])
          + name.encode() + pickle.STACK_GLOBAL + pickle.SHORT_BINUNICODE + bytes([len(arg)]) + arg.encode() + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)

@pytest.mark.parametrize("module,name", [("tinygrad.helpers", "os.system"), ("tinygrad.helpers", "pathlib.os.system"), ("posix", "system"),
                                         ("builtins", "exec"), ("tinygrad.helpers", "getenv"), ("tinygrad.uop.ops", "UOp.__reduce__"),
                                         ("tinygrad.helpers.os", "system")])
def test_a_crafted_graph_is_refused_without_running(tmp_path, module, name):
  mark = tmp_path / "ran"
  arg = f"open({str(mark)!r}, 'w')" if name == "exec" else str(mark) if name == "getenv" else f"touch {mark}"
  (tmp_path / "g.pkl").write_bytes(crafted(module, name, arg))
  jit = TinyJit(small_graph()[1])
  with pytest.warns(RuntimeWarning, match=re.escape(f"refusing {module}.{name}: not a class that a graph holds")):
    assert GraphCache({"f": jit}, lambda: {}, lambda: tmp_path / "g.pkl").load() == ()
  assert not mark.exists() and jit.cnt == 0

def test_a_graph_file_others_can_write_is_not_read(tmp_path):
  w, f, x = small_graph()
  jit = TinyJit(f)
  for _ in range(3): jit(x)
  assert GraphCache({"f": jit}, lambda: {"w": w}, lambda: tmp_path / "g.pkl").save_new()
  _others_writable(tmp_path / "g.pkl")
  replay = TinyJit(f)
  with pytest.warns(RuntimeWarning, match="writable by others"):
    assert GraphCache({"f": replay}, lambda: {"w": w}, lambda: tmp_path / "g.pkl").load() == ()
  assert replay.cnt == 0

# ---- the CPU graph runner ----

PLANTED = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) { close(open("%s", O_CREAT | O_WRONLY, 0600)); }
"""

@needs_root
def test_a_planted_runner_in_a_cache_of_another_user_is_not_loaded(cache, tmp_path):
  folder, mark = cache / "cpu", tmp_path / "ran"
  folder.mkdir(parents=True)
  (c := tmp_path / "planted.c").write_text(PLANTED % mark)
  src = cpu_graph._source()
  # under the names the runner has had: its source's hash, and the source, compiler and CPU's hash
  names = [hashlib.sha256(src.encode()).hexdigest()[:16]] + ([cpu_graph.runner_key(src)] if hasattr(cpu_graph, "runner_key") else [])
  for key in names: subprocess.run(["clang", "-shared", "-fPIC", str(c), "-o", str(folder / f"graph_runner_{key}.so")], check=True)
  _other_user(folder)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dll = cpu_graph.runner()
  assert not mark.exists() and dll.tg_run is not None
  assert [f.name for f in folder.iterdir() if f.name.startswith(".tmp")] == []

def test_the_runner_is_kept_per_compiler_and_cpu(cache, monkeypatch):
  src = cpu_graph._source()
  key = cpu_graph.runner_key(src)
  cpu_graph.runner()
  assert (lib := cache / "cpu" / f"graph_runner_{key}.so").is_file() and mode(lib) == 0o600
  monkeypatch.setattr(cpu_graph, "cpu_features", lambda: "flags : fpu sse2")
  assert cpu_graph.runner_key(src) != key
  clang = subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout
  monkeypatch.setattr(cpu_graph.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(a, 0, clang + "another build", ""))
  assert cpu_graph.runner_key(src) != key

# ---- tg-llama cache ----

def fill(folder: pathlib.Path) -> dict[str, bytes]:
  """A cache folder with the cache's own files, and the user's files beside them (what must survive a clear)."""
  (folder / "graphs").mkdir(parents=True)
  with sqlite3.connect(folder / "cache.db") as conn: conn.execute("CREATE TABLE 'compile_x_22' (key text, val blob)")
  for name in ("graphs/a.pkl", "graphs/.tmp-x.tmp", "graph_runner_0123.so"): (folder / name).write_bytes(b"ours")
  theirs = {"notes.txt": b"mine", "data/model.bin": b"weights", "graphs/readme.md": b"mine too", "cache.db.bak": b"backup"}
  for name, data in theirs.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
  return theirs

def test_clear_deletes_only_what_the_cache_wrote(cache, capsys):
  theirs = fill(cache / "cpu")
  (cache / "project").mkdir(parents=True)
  (cache / "project" / "cache.db").write_bytes(b"the user's own database")  # not named like a backend: not a cache
  assert cli.main(["cache", "--clear"]) == 0
  assert capsys.readouterr().out.strip() == f"cleared {cache / 'cpu'} (kept what tg-llama did not write there)"
  left = {str(f.relative_to(cache / "cpu")): f.read_bytes() for f in (cache / "cpu").rglob("*") if f.is_file()}
  assert left == theirs and (cache / "project" / "cache.db").read_bytes() == b"the user's own database"
  (cache / "opencl").mkdir()
  sqlite3.connect(cache / "opencl" / "cache.db").close()
  assert cli.main(["cache", "--clear", "--backend", "opencl"]) == 0
  assert capsys.readouterr().out.strip() == f"removed {cache / 'opencl'}" and not (cache / "opencl").exists()

def test_a_corrupt_cache_db_is_shown_and_cleared(cache, capsys):
  (cache / "cpu").mkdir(parents=True)
  (cache / "cpu" / "cache.db").write_bytes(os.urandom(4096))
  assert cli.main(["cache"]) == 0
  assert "cache.db unreadable" in capsys.readouterr().out
  assert cli.main(["cache", "--clear"]) == 0
  assert capsys.readouterr().out.strip() == f"removed {cache / 'cpu'}" and not (cache / "cpu").exists()
