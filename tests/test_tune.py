"""The CPU's kernel choices searched on this machine (tg_llama/cpu/tune.py, `tg-llama tune`):
- a tune of a tiny model finds kernels of several kinds, times their candidates and writes this machine's table;
- a fresh process that loads the model uses the table's choices (forced here to ones that are not the defaults, so that
  they show) and gives transformers' greedy tokens: the results are unchanged;
- a table for another CPU, thread count or tinygrad is ignored; a malformed or hostile file is ignored with one warning;
- a tuned choice that no longer applies to its kernel gives way to the default; the captured graphs' key follows the
  choices in use.

The tune and the model run in subprocesses (`python tests/test_tune.py tune|use ...`) with TG_LLAMA_CACHE in a tmp
folder: which choices tinygrad's heuristic makes is per process. The tune is cut to a kernel of each kind, two
candidates each and one round of timing, to stay fast."""
from __future__ import annotations
import copy, json, os, pathlib, platform, re, subprocess, sys, warnings
import numpy as np
import pytest
from tinygrad import Device, Tensor, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tg_llama.cpu import opts, tune, vectors

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parent.parent

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
  from tiny_models import PROMPT, hf_model, reference_greedy, write_hf
  model, prompt = hf_model("gqa_rope_llama3", seed=1), (PROMPT * 4)[:40]  # over 32 tokens: a prefill chunk, not rows of decode steps
  return {"path": str(write_hf(model, tmp_path_factory.mktemp("tiny") / "hf")), "prompt": prompt, "tokens": reference_greedy(model, prompt, 8)}

def run(mode: str, cache: pathlib.Path, *args: str) -> dict:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE.parent)]), "DEV": "CPU", "TG_LLAMA_CACHE": str(cache), "PARALLEL": "0"}
  proc = subprocess.run([sys.executable, str(HERE), mode, *args], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{mode} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}

@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory) -> dict:
  """`tg-llama tune` on the tiny model in a cache of its own; its output, and the table it wrote."""
  out = run("tune", cache := tmp_path_factory.mktemp("cache"), tiny["path"])
  return {**out, "cache": cache, "tables": tune.parse((cache / "cpu" / "tuned.json").read_bytes())}

# ---- the tune and its use ----

def test_the_tune_finds_kernels_of_several_kinds_and_writes_this_machines_table(tuned):
  [table] = tuned["tables"]
  assert table.machine == tune.machine() and len(tuned["kinds"]) >= 3 and [e.kind for e in table.entries] == tuned["kinds"]
  assert all(e.default_ms > 0 and e.chosen_ms > 0 for e in table.entries), table.entries
  assert all(0 <= i < n for i, n in tuned["chose"])  # the timed choice among n candidates (the table holds the forced one)
  changed = [e for e, (_, n) in zip(table.entries, tuned["chose"]) if n > 1]
  assert len(changed) >= 2 and all(e.opts is not None and e.opts != e.default for e in changed)
  assert f"tuning kernel 1/{len(table.entries)} (" in tuned["stderr"] and tuned["summary"].startswith("kernel ")
  batch = tune.loop_text(table.batch_loop, table.batch_rows)
  assert tune.describe(tuned["cache"] / "cpu") == f"tuned for {table.machine['cpu']} on {table.date}, {len(changed)} of " \
                                                  f"{len(table.entries)} kernels changed, a quantized decode batch {batch}"
  assert oct((tuned["cache"] / "cpu" / "tuned.json").stat().st_mode & 0o777) == "0o600"

def test_tune_again_shows_the_table_without_force(tiny, tuned, monkeypatch, capsys):
  from tg_llama import cli
  monkeypatch.setenv("TG_LLAMA_CACHE", str(tuned["cache"]))
  monkeypatch.setattr(tune, "tune", lambda *a, **k: pytest.fail("tuned again"))
  assert cli.main(["tune", "--model", tiny["path"]]) == 0
  out, err = capsys.readouterr()
  assert out == tuned["summary"] and "`tg-llama tune --force` searches again" in err

def test_a_fresh_process_uses_the_tuned_choices_and_gives_the_same_tokens(tiny, tuned):
  out = run("use", tuned["cache"], tiny["path"], ",".join(map(str, tiny["prompt"])))
  assert out["tokens"] == tiny["tokens"]  # transformers' own greedy tokens, the graphs captured and replayed
  assert out["hits"] and all(out["hits"].values()), out["hits"]  # every kernel with a tuned choice got it
  assert len({kind for kind, _ in map(tuple, out["hit_keys"])}) >= 2 and out["warnings"] == []
  assert out["fingerprint"] != ""

# ---- the table on disk ----

def table(machine: dict, kernels: list | None = None) -> dict:
  return {"machine": machine, "date": "2026-01-01", "model": "m", "kernels": [] if kernels is None else kernels}

KERNEL = {"kind": "prefill matmul", "shape": [64, 192, 576], "default": [["THREAD", 1, 2], ["UPCAST", 1, 8], ["UPCAST", 0, 4], ["UNROLL", 0, 8]],
          "opts": [["THREAD", 1, 2], ["UPCAST", 1, 16], ["UPCAST", 0, 4], ["UNROLL", 0, 4]], "default_ms": 1.0, "chosen_ms": 0.5}

def write(folder: pathlib.Path, data) -> pathlib.Path:
  folder.mkdir(mode=0o700, parents=True, exist_ok=True)
  path = folder / "tuned.json"
  path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
  path.chmod(0o600)
  return path

def loaded(folder: pathlib.Path) -> tuple[dict, list[str]]:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    choices = tune.load(folder)
    tune.load(folder)  # twice: still one warning
  return choices, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]

def test_this_machines_table_is_used_and_another_machines_ignored(tmp_path):
  mine = tune.machine()
  others = [{**mine, "cpu": "Another CPU"}, {**mine, "tinygrad": "0.0.1"}, {**mine, "threads": mine["threads"] + 1},
            {**mine, "flags": [f for f in tune.FLAGS if f not in mine["flags"]][:1]}]
  write(tmp_path, {"format": tune.FORMAT, "tables": [table(m, [KERNEL]) for m in others]})
  assert loaded(tmp_path) == ({}, []) and tune.describe(tmp_path).startswith("defaults")
  write(tmp_path, {"format": tune.FORMAT, "tables": [table(m, [KERNEL]) for m in [*others, mine]]})
  default = (Opt(OptOps.THREAD, 1, 2), Opt(OptOps.UPCAST, 1, 8), Opt(OptOps.UPCAST, 0, 4), Opt(OptOps.UNROLL, 0, 8))
  assert loaded(tmp_path) == ({("prefill matmul", (64, 192, 576), default): (Opt(OptOps.THREAD, 1, 2), Opt(OptOps.UPCAST, 1, 16),
                                                                             Opt(OptOps.UPCAST, 0, 4), Opt(OptOps.UNROLL, 0, 4))}, [])
  assert tune.describe(tmp_path).endswith("1 of 1 kernels changed, a quantized decode batch upcast")  # a table from before the probe

def test_writing_keeps_other_machines_tables(tmp_path):
  other = tune.parse(json.dumps({"format": tune.FORMAT, "tables": [table({**tune.machine(), "cpu": "Another CPU"}, [KERNEL])]}).encode())[0]
  tune.write(other, tmp_path)
  mine = tune.Table(tune.machine(), "2026-01-02", "m", ())
  tune.write(mine, tmp_path)
  assert tune.parse((tmp_path / "tuned.json").read_bytes()) == [other, mine] and not list(tmp_path.glob(".tmp-*"))

def hostile() -> dict:
  ok = lambda **kernel: {"format": tune.FORMAT, "tables": [table(tune.machine(), [{**KERNEL, **kernel}])]}
  return {
    "not json": b"\x00\xffnot json", "truncated": json.dumps(ok())[:-5].encode(), "huge": b" " * (tune.MAX_BYTES + 1) + b"{}",
    "deeply nested": b"[" * 100000 + b"]" * 100000, "a list": b"[]", "another format": {"format": 2, "tables": []},
    "an extra key": {**ok(), "run": "os.system('x')"}, "unknown kind": ok(kind="exec"), "a shape of strings": ok(shape=["64", "192"]),
    "a bool in a shape": ok(shape=[True, 2]), "a nested shape": ok(shape=[[64], 2]), "an unknown op": ok(opts=[["os.system", 0, 0]]),
    "a tensor core opt": ok(opts=[["TC", 0, 0]]), "a float arg": ok(opts=[["UPCAST", 0, 4.0]]), "an arg of 1": ok(opts=[["UNROLL", 0, 1]]),
    "a huge arg": ok(opts=[["UPCAST", 0, 1 << 40]]), "an object opt": ok(opts=[{"op": "UPCAST"}]),
    "nan time": json.dumps(ok()).encode().replace(b'"default_ms": 1.0', b'"default_ms": NaN'),
    "too many tables": {"format": tune.FORMAT, "tables": [table(tune.machine())] * (tune.MAX_TABLES + 1)},
    "a batch_loop not a bool": {"format": tune.FORMAT, "tables": [{**table(tune.machine(), [KERNEL]), "batch_loop": "yes"}]},
    "batch_rows of 3": {"format": tune.FORMAT, "tables": [{**table(tune.machine(), [KERNEL]), "batch_rows": 3}]},
    "batch_rows true": {"format": tune.FORMAT, "tables": [{**table(tune.machine(), [KERNEL]), "batch_rows": True}]},
    "capped 1": {"format": tune.FORMAT, "tables": [{**table(tune.machine(), [KERNEL]), "capped": 1}]},
    "an extra key in a table": {"format": tune.FORMAT, "tables": [{**table(tune.machine(), [KERNEL]), "batch_looop": True}]},
  }

@pytest.mark.parametrize("name", list(hostile()))
def test_a_malformed_or_hostile_table_is_ignored_with_one_warning(tmp_path, name):
  write(tmp_path, hostile()[name])
  choices, caught = loaded(tmp_path)
  assert choices == {} and len(caught) == 1 and caught[0].startswith(f"ignoring the tuned kernel choices in {tmp_path / 'tuned.json'} ("), caught

def test_a_table_others_may_write_is_ignored_with_one_warning(tmp_path):
  write(tmp_path, {"format": tune.FORMAT, "tables": [table(tune.machine(), [KERNEL])]}).chmod(0o666)
  choices, caught = loaded(tmp_path)
  assert choices == {} and len(caught) == 1 and "writable by group and others" in caught[0]

# ---- the hook ----

def test_a_tuned_choice_that_no_longer_applies_falls_back_to_the_default(monkeypatch):
  from tg_llama.linear import lanes_matvec
  rng = np.random.default_rng(0)
  x, w = Tensor(rng.standard_normal((1, 1, 128)).astype(np.float32)).realize(), Tensor(rng.standard_normal((96, 128)).astype(np.float32)).realize()
  [kernel] = tune.record(lambda: lanes_matvec(x, w, 16).realize())  # rows x (K/A) x A: scheduled and lowered to the heuristic, not run
  assert (kernel.kind, kernel.shape) == ("matvec", (96, 8, 16))
  default, other = tune.candidates(kernel)[:2]
  monkeypatch.setattr(opts, "TUNED", {})
  assert opts.cpu_optimizations(kernel.k).applied_opts == list(default)
  opts.TUNED[("matvec", (96, 8, 16), default)] = other
  assert opts.cpu_optimizations(kernel.k).applied_opts == list(other) != list(default)
  opts.TUNED[("matvec", (96, 8, 16), default)] = (Opt(OptOps.UPCAST, 5, 4),)  # no such axis: tinygrad refuses it
  assert opts.cpu_optimizations(kernel.k).applied_opts == list(default)

def test_a_prefill_chunks_product_reads_its_weight_in_panels_under_the_prefill_tile():
  # linear.matmul in the CPU's layout writes the weight out in panels of 16 rows first: its product is the kernel the
  # "prefill matmul" rule claims, and it computes numpy's x @ w.T
  from tg_llama.linear import matmul
  rng = np.random.default_rng(0)
  xs, ws = rng.standard_normal((64, 128)).astype(np.float32), rng.standard_normal((96, 128)).astype(np.float32)
  x, w = Tensor(xs).realize(), Tensor(ws).realize()
  [kernel] = tune.record(lambda: matmul(x, w).realize())
  assert (kernel.kind, kernel.shape) == ("prefill matmul", (6, 64, 16, 128))
  np.testing.assert_allclose(matmul(x, w).numpy(), xs @ ws.T, atol=1e-4, rtol=1e-5)

def test_a_panel_product_loads_vectors_as_wide_as_the_cpus_registers(monkeypatch):
  # tg_llama/cpu/vectors.py: the CPU's kernels fold contiguous loads up to the register's width (tinygrad's own: 4), the same
  # numbers as numpy's; another device's renderer, or tinygrad's folding, keeps vectors of 4
  import tinygrad.codegen as codegen
  from tinygrad.uop.ops import Ops
  from tg_llama.cpu import vectors
  from tg_llama.linear import matmul
  assert [vectors.widest(f) for f in ("flags : fpu sse2 avx avx2 fma", "flags : avx2 avx512f avx512bw", "Features : fp asimd", "")] == [8, 16, 4, 4]
  def widths(rows: int) -> set[int]:  # the vector widths of the loads of a (64, 128) x (rows, 128).T product, in its C source
    x, w = Tensor(xs).realize(), Tensor(ws[:rows]).realize()
    [kernel] = tune.record(lambda: matmul(x, w).realize())
    _, program = tune._compile((0, opts.applied(kernel.k, kernel.default), None))
    [source] = [u.arg for u in program.toposort() if u.op is Ops.SOURCE]
    np.testing.assert_allclose(matmul(x, w).numpy(), xs @ ws[:rows].T, atol=1e-4, rtol=1e-5)
    return {int(n) for n in re.findall(r"\(\(float(\d+)\*\)", source)}
  rng = np.random.default_rng(2)
  xs, ws = rng.standard_normal((64, 128)).astype(np.float32), rng.standard_normal((96, 128)).astype(np.float32)
  monkeypatch.setattr(codegen, "memory_coalescing", vectors.memory_coalescing)  # as the CPU backend's install() leaves it
  assert max(widths(96)) == min(16, vectors.width())
  monkeypatch.setattr(codegen, "memory_coalescing", vectors.coalesce.memory_coalescing)  # another kernel: tinygrad caches programs
  assert max(widths(80)) == 4
  opencl = type("Renderer", (), {"target": type("Target", (), {"device": "CL"})(), "supports_float4": True})()
  seen = []
  monkeypatch.setattr(vectors, "tinygrads", lambda: lambda sink, ctx: seen.append(ctx) or sink)
  assert vectors.memory_coalescing("sink", opencl) == "sink" and seen == [opencl]  # another device: tinygrad's own

def test_a_weight_over_the_panel_budget_is_packed_and_multiplied_in_pieces(monkeypatch):
  # each piece of its output rows packed just before its product: the memory held packed is one piece's, not the weight's
  import tg_llama.linear as linear
  monkeypatch.setattr(linear, "PANEL_BYTES", 50 * 128 * 4)  # 50 rows' worth: 144 rows as 3 pieces of 48 (whole panels)
  rng = np.random.default_rng(1)
  xs, ws = rng.standard_normal((64, 128)).astype(np.float32), rng.standard_normal((144, 128)).astype(np.float32)
  x, w = Tensor(xs).realize(), Tensor(ws).realize()
  kernels = tune.record(lambda: linear.matmul(x, w).realize())
  assert [(k.kind, k.shape) for k in kernels] == [("prefill matmul", (3, 64, 16, 128))]  # recorded once a shape
  np.testing.assert_allclose(linear.matmul(x, w).numpy(), xs @ ws.T, atol=1e-4, rtol=1e-5)

def test_a_q4_weight_is_decoded_into_panels_under_the_pack_rule():
  # a Q4 layer's prefill product: its blocks decoded into the chunk's panels (the "panel pack" kernel, the panel's rows one
  # vector), then the "prefill matmul"; the same numbers as numpy's dequantized x @ w.T
  from tg_llama.quantize import Int4Linear
  rng = np.random.default_rng(0)
  layer = Int4Linear(128, 96)
  for name, t in Int4Linear.quantize(Tensor(rng.standard_normal((96, 128)).astype(np.float32))).items(): setattr(layer, name, t.contiguous().realize())
  xs = rng.standard_normal((1, 64, 128)).astype(np.float32)
  x = Tensor(xs).realize()
  kernels = tune.record(lambda: layer(x).realize())
  assert [(k.kind, k.shape) for k in kernels] == [("panel pack", (6, 4, 2, 16, 16)), ("prefill matmul", (6, 64, 16, 128))]
  lo, hi = layer.weight.numpy() & 15, layer.weight.numpy() >> 4
  dequant = (np.concatenate([lo, hi], -1) * layer.scale.numpy()[..., None] + layer.min.numpy()[..., None]).reshape(96, 128)
  np.testing.assert_allclose(layer(x).numpy(), xs @ dequant.T, atol=1e-4, rtol=1e-5)

def test_a_tuned_choice_against_another_default_is_not_used(monkeypatch):
  # the rule's default changed since the table was made (a new tg-llama): its choice was measured against something else
  from tg_llama.linear import lanes_matvec
  rng = np.random.default_rng(0)
  x, w = Tensor(rng.standard_normal((1, 1, 128)).astype(np.float32)).realize(), Tensor(rng.standard_normal((96, 128)).astype(np.float32)).realize()
  [kernel] = tune.record(lambda: lanes_matvec(x, w, 16).realize())
  default, other = tune.candidates(kernel)[:2]
  monkeypatch.setattr(opts, "TUNED", {("matvec", (96, 8, 16), other): other})
  assert opts.cpu_optimizations(kernel.k).applied_opts == list(default)

def test_the_graph_key_follows_the_choices_in_use(monkeypatch):
  monkeypatch.setattr(opts, "TUNED", {})
  monkeypatch.setattr(opts, "BATCH_LOOP", True)
  loop = tune.fingerprint()
  opts.BATCH_LOOP = False
  assert tune.fingerprint() == "" != loop
  opts.TUNED[("matvec", (96, 8, 16), ())] = (Opt(OptOps.UPCAST, 0, 2),)
  first = tune.fingerprint()
  opts.TUNED[("matvec", (96, 8, 16), ())] = (Opt(OptOps.UPCAST, 0, 4),)
  assert "" != first != tune.fingerprint() != ""

# ---- the probe ----

@pytest.fixture
def cap_kept():
  """Whether clang's vectorizer is capped in this process (vectors.CAP, the CPU renderer's compiler), as it was before the test."""
  was = vectors.CAP
  yield
  vectors.CAP = was
  vectors.cap_bundles(Device["CPU"].renderer.compiler, was)

def compiler_capped() -> bool: return vectors.is_capped(Device["CPU"].renderer.compiler)

@pytest.fixture
def own_table(tmp_path, monkeypatch, cap_kept):
  """tune.install() in this test keeps its table in tmp_path, and what it sets (opts' choices, the cap) is as it was after."""
  monkeypatch.setattr(opts, "TUNED", {})
  monkeypatch.setattr(opts, "BATCH_LOOP", opts.BATCH_LOOP)
  monkeypatch.setattr(opts, "BATCH_ROWS", opts.BATCH_ROWS)
  monkeypatch.setattr(tune, "cache_folder", lambda name: tmp_path)
  return tmp_path

def test_a_machine_without_a_table_is_probed_once_and_keeps_the_probes_table(tmp_path, monkeypatch, own_table):
  probed, probe = [], tune.probe
  monkeypatch.setattr(tune, "probe", lambda: probed.append(probe()) or probed[-1])
  tune.install()
  [(loop, rows, capped, times)] = probed
  # all three ways timed, compiled with clang's vectorizer capped and not
  assert set(times) == {(c, n) for c in (True, False) for n in (4, 8)} and all(len(ts) == 3 and all(t > 0 for t in ts) for ts in times.values())
  # the choices follow the times (capped where its best beats the uncapped best at both sizes; then 4 rows at a time where
  # they beat one at both sizes, the loop where it beats the upcast)
  assert capped == all(min(times[(False, n)]) > min(times[(True, n)]) * tune.MIN_GAIN for n in (4, 8))
  chosen = [ts for (c, _), ts in times.items() if c == capped]
  assert rows == (4 if all(one > four * tune.MIN_GAIN for _, one, four in chosen) else 1)
  assert loop == all(upcast > (four if rows == 4 else one) * tune.MIN_GAIN for upcast, one, four in chosen)
  [table] = tune.read_tables(tmp_path)
  assert (table.machine, table.model, table.entries, table.batch_loop, table.batch_rows, table.capped) == (tune.machine(), "", (), loop, rows, capped)
  assert (opts.BATCH_LOOP, opts.BATCH_ROWS, vectors.CAP) == (loop, rows, capped)
  assert compiler_capped() == (capped and platform.machine().lower() in ("x86_64", "amd64") and vectors.width() > 4)
  assert opts.TUNED == {} and tune.describe(tmp_path).startswith(f"defaults, a quantized decode batch {tune.loop_text(loop, rows)} (probed on ")
  tune.install()
  assert len(probed) == 1  # the table is this machine's now

def test_a_probe_is_announced_where_the_caller_listens(tmp_path, monkeypatch, own_table):
  # `tg-llama chat|generate|serve` load with progress: the first start on a machine says why it pauses, once
  from tg_llama.backend import resolve_backend
  monkeypatch.setattr(tune, "probe", lambda: (True, 4, True, {}))
  heard = []
  resolve_backend("cpu", heard.append)
  resolve_backend("cpu", heard.append)  # its table is kept: no probe
  assert heard == [tune.PROBING]
  (tmp_path / "tuned.json").unlink()
  resolve_backend("cpu")  # a caller that does not listen hears nothing, and the probe runs all the same
  assert tune.this_machines(tune.read_tables(tmp_path)) is not None

def test_a_probe_that_fails_leaves_the_defaults_with_one_warning(tmp_path, monkeypatch):
  monkeypatch.setattr(opts, "TUNED", {})
  monkeypatch.setattr(opts, "BATCH_LOOP", True)
  monkeypatch.setattr(tune, "cache_folder", lambda name: tmp_path)
  monkeypatch.setattr(tune, "probe", lambda: 1 / 0)
  with pytest.warns(RuntimeWarning, match=r"probing this CPU's decode batch failed \(ZeroDivisionError: division by zero\); using the defaults"):
    tune.install()
  assert opts.BATCH_LOOP is False and tune.read_tables(tmp_path) == []  # nothing kept: probed again next time

def test_the_probe_times_the_cpus_kernels_whatever_tinygrads_default_device():
  # with DEV unset where OpenCL is installed, tinygrad's default device is CL: the probe's layer was made there and failed
  # ("all buffers must be on the same device"), and every first start used the defaults with a warning
  from tinygrad import Context
  was = compiler_capped()
  with Context(DEV="NULL"): loop, rows, capped, times = tune.probe()
  assert len(times) == 4 and all(len(ts) == 3 and all(t > 0 for t in ts) for ts in times.values())
  assert compiler_capped() == was  # the probe compiles uncapped only while it times that

def test_the_probe_times_two_compiles_of_a_batch(cap_kept):
  # capped and uncapped, clang compiles a decode batch's 4 rows at a time differently (bundles of 64 floats, or of one
  # register); tinygrad's own cache of programs (by kernel, not by flags) must not hand the probe the same program twice
  from tinygrad.uop.ops import Ops
  from tg_llama.quantize import Int4Linear
  if not (platform.machine().lower() in ("x86_64", "amd64") and vectors.width() > 4): pytest.skip("the cap is for x86 CPUs with AVX2 or AVX-512")
  compiler = Device["CPU"].renderer.compiler
  vectors.cap_bundles(compiler, True)
  key = compiler.cachekey
  with vectors.compiling(compiler, False):
    assert not compiler_capped() and compiler.cachekey != key
  assert compiler_capped() and compiler.cachekey == key  # as it was
  other = copy.copy(compiler)
  other.args = ["-O2", "-mllvm", "-some-other-flag=1"]  # uncapping takes away our pair only
  vectors.cap_bundles(other, True)
  vectors.cap_bundles(other, False)
  assert other.args == ["-O2", "-mllvm", "-some-other-flag=1"]
  layer = Int4Linear(*tune.PROBE, scale_dtype=dtypes.half)
  [kernel] = [k for k in tune.record(lambda: layer(Tensor.empty(4, 1, tune.PROBE[0])).realize()) if k.kind == "batch matvec"]
  four = opts.applied(kernel.k, [o for o in kernel.default if o.op is OptOps.THREAD] + opts.loop_opts(kernel.k, 4))
  binary = lambda capped: [u.arg for u in tune._compile((0, four, capped))[1].toposort() if u.op is Ops.BINARY][0]
  assert binary(True) != binary(False) and binary(None) == binary(True)

@pytest.mark.parametrize("batch_loop, rows, capped", [(False, 1, True), (True, 1, True), (True, 4, True), (True, 4, False)])
def test_a_quantized_decode_batch_is_numpys_product_as_a_loop_or_upcast(batch_loop, rows, capped, monkeypatch, cap_kept):
  # every way the probe may choose to run a decode batch's product of Q4_1 and Q8_0 blocks (clang's vectorizer capped or not)
  # gives numpy's x @ dequantized w.T; a product of float weights (the sampler's sums) keeps the upcast either way
  from tg_llama.linear import lanes_matvec
  from tg_llama.quantize import Int4Linear, Int8Linear
  monkeypatch.setattr(opts, "TUNED", {})
  monkeypatch.setattr(opts, "BATCH_LOOP", opts.BATCH_LOOP)
  monkeypatch.setattr(opts, "BATCH_ROWS", opts.BATCH_ROWS)
  opts.install({}, batch_loop, rows, capped)
  rng = np.random.default_rng(0)
  K = 128 + 64 * (batch_loop + (rows > 1) + (not capped))  # a kernel of its own for each: a compiled kernel of the same AST would be reused
  xs, ws = rng.standard_normal((4, 1, K)).astype(np.float32), rng.standard_normal((96, K)).astype(np.float32)
  x = Tensor(xs).realize()
  for cls, dequant in ((Int4Linear, lambda p: (np.concatenate([p["weight"] & 15, p["weight"] >> 4], -1) * p["scale"][..., None] + p["min"][..., None]).reshape(96, K)),
                       (Int8Linear, lambda p: (p["weight"].reshape(96, K // 32, 32) * p["scale"][..., None]).reshape(96, K))):
    layer = cls(K, 96, **({"group_size": 32} if cls is Int8Linear else {}))
    params = {name: t.contiguous().realize() for name, t in cls.quantize(Tensor(ws), **({"group_size": 32} if cls is Int8Linear else {})).items()}
    for name, t in params.items(): setattr(layer, name, t)
    [kernel] = [k for k in tune.record(lambda: layer(x).realize()) if k.kind == "batch matvec"]
    loop = opts.loop_opts(kernel.k)  # `rows` at a time (int8 blocks only capped); int8 blocks one row at a time take 3 blocks a step
    at_a_time = 1 if cls is Int8Linear and not capped else rows
    assert loop == [Opt(OptOps.UPCAST, 0, 4)] * (at_a_time == 4) + [Opt(OptOps.UNROLL, 1, 0)] + \
                   [Opt(OptOps.UNROLL, 0, 3)] * (cls is Int8Linear and at_a_time == 1 and K // 32 % 3 == 0)
    assert (kernel.default[-len(loop):] == loop) == batch_loop, kernel.default
    np.testing.assert_allclose(layer(x).numpy(), xs @ dequant({n: t.numpy() for n, t in params.items()}).T, atol=1e-3, rtol=1e-4)
  [kernel] = tune.record(lambda: lanes_matvec(x, Tensor(ws), 16).realize())
  assert kernel.kind == "batch matvec" and any(o.op is OptOps.UPCAST for o in kernel.default)

def test_a_one_token_q4_product_is_numpys_under_each_block_minimums_candidate(monkeypatch):
  # quantize.py's Int4Linear sums one token's product as scale * sum(x * q) + min * sum(x) per block, the second in a kernel
  # the "block minimums" rule claims; with the default and with each of tune's variants for it, numpy's x @ dequantized w.T
  from tg_llama.quantize import Int4Linear
  monkeypatch.setattr(opts, "TUNED", {})
  rng = np.random.default_rng(1)
  N, seen = 128, []
  for i in range(tune.MAX_CANDIDATES):
    K = 64 * (i + 2)  # a kernel of its own for each candidate: a compiled kernel of the same AST would be reused
    xs, ws = rng.standard_normal((1, 1, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32)
    layer, x = Int4Linear(K, N), Tensor(xs).realize()
    p = {name: t.contiguous().realize() for name, t in Int4Linear.quantize(Tensor(ws)).items()}
    for name, t in p.items(): setattr(layer, name, t)
    [kernel] = [k for k in tune.record(lambda: layer(x).realize()) if k.kind == "block minimums"]
    assert kernel.shape == (N, K // 32)
    if i >= len(choices := tune.candidates(kernel)): continue
    opts.TUNED[("block minimums", kernel.shape, choices[0])] = choices[i]
    seen.append(choices[i])
    p = {name: t.numpy() for name, t in p.items()}
    w = (np.concatenate([p["weight"] & 15, p["weight"] >> 4], -1) * p["scale"][..., None] + p["min"][..., None]).reshape(N, K)
    np.testing.assert_allclose(layer(x).numpy()[0, 0], xs[0, 0] @ w.T, atol=1e-3, rtol=1e-4, err_msg=tune.label(choices[i]))
  assert len(set(seen)) >= 4, seen

def test_the_top_p_searches_take_the_batch_sums_rule():
  # test_sampling.py checks these kernels' results against transformers
  from tg_llama.sampling import SamplingParams, candidate_mask, pack
  for rows, shape in ((1, (3, 64, 768)), (4, (4, 3, 64, 768))):  # 49,152 tokens in 64 lanes, 3 candidates a pass
    logits = Tensor.empty(rows, 49152)
    kernels = tune.record(lambda: candidate_mask(logits, pack([SamplingParams(1.0, top_p=0.9)] * rows), top_k=False).realize())
    assert [k.shape for k in kernels if k.kind == "batch sums"] == [shape]

def test_a_tables_batch_loop_is_read_and_written(tmp_path):
  tune.write(tune.Table(tune.machine(), "2026-01-02", "", (), True, 4), tmp_path)
  t = tune.this_machines(tune.read_tables(tmp_path))
  assert t.batch_loop and t.batch_rows == 4 and tune.describe(tmp_path).startswith("defaults, a quantized decode batch as a loop, 4 rows at a time")

def test_a_table_written_before_batch_rows_runs_its_loop_one_row_at_a_time_or_is_probed_again(tmp_path, monkeypatch, own_table):
  monkeypatch.setattr(tune, "probe", lambda: (True, 4, True, {}))
  write(tmp_path, {"format": tune.FORMAT, "tables": [{**table(tune.machine(), [KERNEL]), "batch_loop": True}]})  # a tune's
  tune.install()
  assert (opts.BATCH_LOOP, opts.BATCH_ROWS) == (True, 1) and tune.this_machines(tune.read_tables(tmp_path)).batch_rows is None
  write(tmp_path, {"format": tune.FORMAT, "tables": [{**table(tune.machine(), []), "batch_loop": True}]})  # a probe's
  tune.install()
  assert (opts.BATCH_LOOP, opts.BATCH_ROWS) == (True, 4) and tune.this_machines(tune.read_tables(tmp_path)).batch_rows == 4

def test_a_table_written_before_the_cap_was_probed(tmp_path, monkeypatch, own_table):
  # a tune's table ran capped (every process did then); a probe's is probed again, and its choice kept
  monkeypatch.setattr(tune, "probe", lambda: (True, 4, False, {}))
  write(tmp_path, {"format": tune.FORMAT, "tables": [{**table(tune.machine(), [KERNEL]), "batch_loop": True, "batch_rows": 4}]})
  tune.install()
  assert tune.this_machines(tune.read_tables(tmp_path)).capped is True and vectors.CAP
  write(tmp_path, {"format": tune.FORMAT, "tables": [{**table(tune.machine(), []), "batch_loop": True, "batch_rows": 1}]})
  tune.install()
  assert tune.this_machines(tune.read_tables(tmp_path)).capped is False and not vectors.CAP and not compiler_capped()
  assert (opts.BATCH_LOOP, opts.BATCH_ROWS) == (True, 4)

# ---- the subprocesses ----

def mode_tune(path: str) -> dict:
  """`tg-llama tune` on the model, cut short: a kernel of each kind, two candidates, one round of timing. Each timed choice
  is recorded, and the second candidate forced instead (so that a process using the table shows it)."""
  import contextlib, io
  from tg_llama import cli
  record, choose, chose, kinds = tune.record, tune.choose, [], []
  def one_of_each_kind(run):
    kernels = record(run)
    kinds.extend(dict.fromkeys(k.kind for k in kernels))
    return [next(k for k in kernels if k.kind == kind) for kind in kinds]
  def forced(kernel, choices):
    i, default, best = choose(kernel, choices)
    chose.append((i, len(choices)))
    return min(1, len(choices) - 1), default, best
  def probe():  # the probe's own kernels, recorded in full
    tune.record = record
    try: return real_probe()
    finally: tune.record = one_of_each_kind
  real_probe = tune.probe
  tune.record, tune.choose, tune.probe, tune.MAX_CANDIDATES, tune.ROUNDS = one_of_each_kind, forced, probe, 2, 1
  with contextlib.redirect_stdout(out := io.StringIO()): assert cli.main(["tune", "--model", path]) == 0
  return {"summary": out.getvalue(), "chose": chose, "kinds": kinds}

def mode_use(path: str, prompt: str) -> dict:
  """The model loaded on the CPU with the cache's table; 8 greedy tokens (twice: the second replays the graphs), whether
  each kernel with a tuned choice got it (compiled in this process: PARALLEL=0), the RuntimeWarnings."""
  import tg_llama
  hits: dict[str, bool] = {}
  ours = opts.cpu_optimizations
  def counting(k):
    out = ours(k)
    if (rule := opts.rule(k)) is not None and (choice := opts.TUNED.get((rule[0], key := opts.shape_key(k), tuple(rule[1])))) is not None:
      hits[json.dumps((rule[0], key))] = out is not None and out.applied_opts == list(choice)
    return out
  opts.cpu_optimizations = counting  # hand_coded_optimizations looks it up at each call
  ids = [int(t) for t in prompt.split(",")]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = tg_llama.load(path, backend="cpu", max_context=64, graph_cache=False)
    tokens, again = list(model.generate(ids, 8)), list(model.generate(ids, 8))
  return {"tokens": tokens if tokens == again else [tokens, again], "hits": hits, "hit_keys": [json.loads(k) for k in hits],
          "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)], "fingerprint": tune.fingerprint()}

if __name__ == "__main__":
  print(json.dumps({"tune": mode_tune, "use": mode_use}[sys.argv[1]](*sys.argv[2:])))
