"""Kernel choices searched on this machine (`tg-llama tune`): opts.py's rules, each with a few other tilings tried.

opts.py's defaults were measured on one CPU; another (more cores, AVX-512 or not, other caches) may prefer another
register tile or unroll. `tune` loads a model on the CPU backend, schedules what the engine runs (a prefill chunk, a decode
step of every batch bucket, greedy and sampled heads) and records each kernel that one of opts.py's rules claims (record),
and for each (kind, shape) times the rule's default and a few variants of the same structure (CANDIDATES: at most
MAX_CANDIDATES a kernel, with the default's thread split). A variant replaces the default only when it is more than
MIN_GAIN faster, twice, so that noise does not churn the choices. Compiling and timing are tinygrad's BEAM search's
(search.py's _try_compile, less its cap on uops, and _time_program), on zeroed buffers of the kernel's sizes: tinygrad's
CPU runtime runs a kernel's per-core parts one after another, so a time is the work of the cores on one core, compared
between candidates of the same split (graph.py's runner spreads the parts over the cores).

The table is JSON (never pickle: a cache must not run code) in `<cache root>/cpu/tuned.json`, written atomically and
only in a cache folder that is this user's alone (backend.cache_folder), read only from one. It holds a table per machine:
the CPU's model name, its features that matter (FLAGS), tinygrad's thread count and tinygrad's version; a table for
another machine is ignored. A file that is not such a table (too big, wrong types, unknown kinds or opts) is ignored
with one RuntimeWarning. Loading a model on the CPU backend uses this machine's table (tg_llama/cpu/__init__.py's
install), where an opt that no longer applies (tinygrad changed the kernel) gives way to the default; the captured-graph
cache keys include the choices in use (fingerprint), so graphs of other choices are never replayed.

One choice is made on every machine without a table, once, at the first use of the CPU backend (install): whether a
quantized product's decode batch runs upcast (each weight decoded once for every row) or as one row's code for each row,
and then whether 4-bit blocks take 4 rows at a time (opts.BATCH_LOOP, opts.BATCH_ROWS, opts.loop_opts), the three timed on
one layer, each compiled with clang's vectorizer capped at one register and not (vectors.py's CAP), in a few seconds
(probe). Which is faster differs between CPUs by 2x either way (the Intel Xeon against the AMD EPYC, Zen 4), and a
server's batches run these products all the time; the cap won by 1.5x on the AMD EPYC and was never measured elsewhere.
Its table (no kernels, the choice) is kept like a tune's; a tune probes again and tunes against the choice.

Not here: a search over every opt (tinygrad's BEAM does that, for one kernel at a time and minutes a kernel), kernels no
rule claims (tinygrad's heuristic keeps them), other backends."""
from __future__ import annotations
import contextlib, dataclasses, datetime, functools, hashlib, json, math, pathlib, platform, warnings
from typing import Callable
import tinygrad.codegen as codegen
import tinygrad.codegen.opt.heuristic as heuristic
import tinygrad.codegen.opt.postrange as postrange
import tinygrad.codegen.opt.search as search
import tinygrad.engine.realize as realize
import tinygrad.tensor as tensor
from tinygrad import Context, Tensor, dtypes
from tinygrad.codegen import to_program
from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
from tinygrad.device import CompileError
from tinygrad.helpers import NUM_CPU_THREADS, prod
from tinygrad.uop.ops import AxisType, Ops, UOp
from tg_llama import private_dir
from tg_llama.backend import cache_folder
from tg_llama.cpu import graph, opts, vectors

FORMAT = 1
KINDS = ("matvec", "decode scores", "prefill scores", "batch matvec", "batch matmul", "batch sums", "prefill matmul", "decode values",
         "prefill values", "panel pack", "block minimums")
OPS = ("THREAD", "UPCAST", "UNROLL")  # the only opts a table may hold: what CANDIDATES try
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")  # what the kernels' code depends on
MIN_GAIN = 1.03       # a variant must beat the default by this much to replace it
ROWS_AT_A_TIME = (1, 2, 4)  # a quantized decode batch's rows at a time as a loop that a table may hold (the probe times 1 and 4)
MAX_CANDIDATES = 8    # per kernel, the default included
MAX_UPCAST = 256      # the most values a candidate's upcasts and unrolls hold in registers (BEAM's BEAM_UPCAST_MAX default)
ROUNDS, RUNS = 3, 3   # every candidate timed RUNS times in each of ROUNDS rounds (interleaved, against drift): the best counts
MAX_BYTES = 1 << 20   # a larger file is not a table of ours
MAX_TABLES, MAX_KERNELS, MAX_OPTS = 16, 4096, 16

def table_path(folder: pathlib.Path) -> pathlib.Path: return folder / "tuned.json"

@functools.cache
def machine() -> dict:
  """What the choices depend on: the CPU's model, its features that matter, the threads kernels split over, tinygrad."""
  from tg_llama.jit_cache import _tinygrad_version
  name = ""
  try:
    with open("/proc/cpuinfo") as f: name = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), "")
  except OSError: pass
  features = set(graph.cpu_features().split())
  return {"cpu": (name or platform.processor() or platform.machine() or "unknown")[:200],
          "flags": [f for f in FLAGS if f in features], "threads": NUM_CPU_THREADS.value, "tinygrad": _tinygrad_version()[:100]}

# ---- the table on disk ----

@dataclasses.dataclass(frozen=True)
class Entry:
  kind: str
  shape: tuple[int, ...]          # -1: a symbolic size (a cache length)
  default: tuple[Opt, ...]        # the rule's choice when tuned
  opts: tuple[Opt, ...] | None    # the choice that beat it; None: the default stays
  default_ms: float
  chosen_ms: float

@dataclasses.dataclass(frozen=True)
class Table:
  machine: dict
  date: str
  model: str                      # "" for a table of the probe alone
  entries: tuple[Entry, ...]
  batch_loop: bool = False        # the probe's choices (opts.BATCH_LOOP, opts.BATCH_ROWS, vectors.CAP), the entries' defaults measured under them
  batch_rows: int | None = 1      # None: a table written before the probe timed rows at a time (its loop: one at a time)
  capped: bool | None = True      # None: written before the probe timed clang's vectorizer capped and not (a tune's ran capped)

  @property
  def loop_rows(self) -> int: return self.batch_rows or 1  # what the loop runs with (opts.BATCH_ROWS)

  @property
  def stale_probe(self) -> bool: return not self.entries and (self.batch_rows is None or self.capped is None)  # probe again

  def choices(self) -> dict[tuple[str, tuple[int, ...], tuple[Opt, ...]], tuple[Opt, ...]]:
    """What opts.install takes: the changed choices by (kind, shape, the default they beat)."""
    return {(e.kind, e.shape, e.default): e.opts for e in self.entries if e.opts is not None}

def _opt_json(o: Opt) -> list: return [o.op.name, o.axis, o.arg]
def _entry_json(e: Entry) -> dict:
  return {"kind": e.kind, "shape": list(e.shape), "default": [_opt_json(o) for o in e.default],
          "opts": None if e.opts is None else [_opt_json(o) for o in e.opts], "default_ms": e.default_ms, "chosen_ms": e.chosen_ms}
def _table_json(t: Table) -> dict:
  return {"machine": t.machine, "date": t.date, "model": t.model, "kernels": [_entry_json(e) for e in t.entries], "batch_loop": t.batch_loop,
          **({} if t.batch_rows is None else {"batch_rows": t.batch_rows}), **({} if t.capped is None else {"capped": t.capped})}

class Malformed(ValueError): pass

def _check(ok: bool, what: str):
  if not ok: raise Malformed(what)

def _int(v, low: int, high: int) -> bool: return type(v) is int and low <= v <= high
def _str(v, most: int = 200) -> bool: return type(v) is str and len(v) <= most
def _fields(d, keys: set[str], what: str):
  _check(type(d) is dict and set(d) == keys, f"{what} must be an object with exactly {', '.join(sorted(keys))}")

def _opts_of(v, what: str) -> tuple[Opt, ...]:
  _check(type(v) is list and len(v) <= MAX_OPTS, f"{what} must be a list of at most {MAX_OPTS} opts")
  # arg 1 is no split (tinygrad 0.14 fails on it with a KeyError, where a wrong axis or size is a KernelOptError)
  for o in v: _check(type(o) is list and len(o) == 3 and o[0] in OPS and _int(o[1], 0, 15) and _int(o[2], 0, 4096) and o[2] != 1,
                     f"{what}: each opt must be [{'|'.join(OPS)}, axis 0-15, int arg 0 or 2-4096], not {str(o)[:80]}")
  return tuple(Opt(OptOps[op], axis, arg) for op, axis, arg in v)

def _time_ok(v) -> bool: return type(v) in (int, float) and math.isfinite(v) and v >= 0

def _parse_entry(d) -> Entry:
  _fields(d, {"kind", "shape", "default", "opts", "default_ms", "chosen_ms"}, "a kernel")
  _check(d["kind"] in KINDS, f"unknown kernel kind {str(d['kind'])[:40]!r}")
  _check(type(d["shape"]) is list and 1 <= len(d["shape"]) <= 8 and all(_int(s, -1, 1 << 31) for s in d["shape"]),
         "a shape must be a list of 1-8 ints (-1: symbolic)")
  _check(_time_ok(d["default_ms"]) and _time_ok(d["chosen_ms"]), "times must be numbers >= 0")
  return Entry(d["kind"], tuple(d["shape"]), _opts_of(d["default"], "default"), None if d["opts"] is None else _opts_of(d["opts"], "opts"),
               float(d["default_ms"]), float(d["chosen_ms"]))

def _parse_table(d) -> Table:
  # batch_loop may be missing: a table written before the probe was (its choices measured against the upcast batch); batch_rows
  # too: written before the probe timed 4 rows at a time; capped: before it timed clang's vectorizer capped and not
  _check(type(d) is dict and set(d) - {"batch_loop", "batch_rows", "capped"} == {"machine", "date", "model", "kernels"},
         "a table must be an object with exactly date, kernels, machine, model (and batch_loop, batch_rows, capped)")
  _check(type(d.get("batch_loop", False)) is bool and type(d.get("capped", False)) is bool, "batch_loop and capped must be true or false")
  _check("batch_rows" not in d or (d["batch_rows"] in ROWS_AT_A_TIME and type(d["batch_rows"]) is int),
         f"batch_rows must be one of {', '.join(map(str, ROWS_AT_A_TIME))}")
  m = d["machine"]
  _fields(m, {"cpu", "flags", "threads", "tinygrad"}, "a machine")
  _check(_str(m["cpu"]) and _str(m["tinygrad"], 100) and _int(m["threads"], 1, 1 << 16) and type(m["flags"]) is list
         and len(m["flags"]) <= len(FLAGS) and all(f in FLAGS for f in m["flags"]), "a machine's fields have the wrong types")
  _check(_str(d["date"], 40) and _str(d["model"], 400), "date and model must be short strings")
  _check(type(d["kernels"]) is list and len(d["kernels"]) <= MAX_KERNELS, f"kernels must be a list of at most {MAX_KERNELS}")
  entries = tuple(_parse_entry(e) for e in d["kernels"])
  # a tune's table without the field was tuned with the bundles capped (what every process ran then)
  return Table(m, d["date"], d["model"], entries, d.get("batch_loop", False), d.get("batch_rows"), d.get("capped", True if entries else None))

def parse(text: bytes) -> list[Table]:
  """The tables of a file's bytes; raises Malformed (a ValueError) for anything else."""
  _check(len(text) <= MAX_BYTES, f"larger than {MAX_BYTES} bytes")
  try: d = json.loads(text)
  except (ValueError, RecursionError) as e: raise Malformed(f"not JSON ({type(e).__name__})") from None
  _fields(d, {"format", "tables"}, "the file")
  _check(d["format"] == FORMAT and type(d["format"]) is int, f"format {str(d['format'])[:20]}, not {FORMAT}")
  _check(type(d["tables"]) is list and len(d["tables"]) <= MAX_TABLES, f"tables must be a list of at most {MAX_TABLES}")
  return [_parse_table(t) for t in d["tables"]]

@functools.cache
def _ignored(path: str, why: str):
  warnings.warn(f"ignoring the tuned kernel choices in {path} ({why}); using the defaults (`tg-llama tune --force` writes it anew)",
                RuntimeWarning, stacklevel=4)

def read_tables(folder: pathlib.Path | None = None) -> list[Table]:
  """Every machine's table in the file, or none: no file, no cache folder of this user's own, or a file that is not
  a table file (one warning)."""
  if (folder := folder or cache_folder("cpu")) is None or not (path := table_path(folder)).is_file(): return []
  try:
    if (why := private_dir.problem(path)) is not None: raise PermissionError(why)
    if path.stat().st_size > MAX_BYTES: raise Malformed(f"larger than {MAX_BYTES} bytes")
    with open(path, "rb") as f: return parse(f.read(MAX_BYTES + 1))
  except (OSError, Malformed) as e:
    _ignored(str(path), str(e))
    return []

def this_machines(tables: list[Table]) -> Table | None: return next((t for t in tables if t.machine == machine()), None)

def load(folder: pathlib.Path | None = None) -> dict[tuple[str, tuple[int, ...], tuple[Opt, ...]], tuple[Opt, ...]]:
  """This machine's tuned choices (for opts.install), or none: the defaults."""
  return t.choices() if (t := this_machines(read_tables(folder))) is not None else {}

PROBING = "timing this CPU's decode kernels, once for this machine (a few seconds)..."

def install(say: Callable[[str], None] | None = None) -> None:
  """opts.install with this machine's table, probing the machine first (and keeping the probe's table in the CPU's
  cache folder) where it has none, or only a probe's from before the probe timed what it times today; `say` hears of
  the probe before it runs."""
  opts.install()
  t = this_machines(read_tables(folder := cache_folder("cpu")))
  if (t is None or t.stale_probe) and folder is not None:
    if say: say(PROBING)
    try: loop, rows, capped, _ = probe()
    except Exception as e:  # a bug of ours or a tinygrad change: the defaults serve, slower on some CPUs
      warnings.warn(f"probing this CPU's decode batch failed ({type(e).__name__}: {e}); using the defaults", RuntimeWarning, stacklevel=2)
      return
    write(t := Table(machine(), datetime.date.today().isoformat(), "", (), loop, rows, capped), folder)
  if t is not None: opts.install(t.choices(), t.batch_loop, t.loop_rows, t.capped is not False)

def write(table: Table, folder: pathlib.Path) -> pathlib.Path:
  """The file with `table` in place of this machine's old one (other machines' kept), written whole or not at all."""
  others = [t for t in read_tables(folder) if t.machine != table.machine][-(MAX_TABLES - 1):]
  text = json.dumps({"format": FORMAT, "tables": [_table_json(t) for t in [*others, table]]}, indent=1)
  private_dir.make(folder)
  with private_dir.replacing(path := table_path(folder), ".tmp-tuned-", ".json", "w", encoding="utf-8") as f: f.write(text)
  return path

def fingerprint() -> str:
  """The choices in use in this process (opts.TUNED, opts.BATCH_LOOP, opts.BATCH_ROWS), for the captured graphs' cache key: ""
  for the defaults."""
  if not opts.TUNED and not opts.BATCH_LOOP: return ""
  return hashlib.sha256(repr((sorted(opts.TUNED.items()), opts.BATCH_LOOP, opts.BATCH_ROWS)).encode()).hexdigest()[:16]

def describe(folder: pathlib.Path | None = None) -> str:
  """The kernel choices a model loaded on the CPU backend uses here, in words (the bench prints it)."""
  if (t := this_machines(read_tables(folder))) is None: return "defaults (run `tg-llama tune` to search this CPU's)"
  batch = f"a quantized decode batch {loop_text(t.batch_loop, t.loop_rows)}"
  if not t.entries: return f"defaults, {batch} (probed on {t.date}; run `tg-llama tune` to search this CPU's)"
  return f"tuned for {t.machine['cpu']} on {t.date}, {sum(e.opts is not None for e in t.entries)} of {len(t.entries)} kernels changed, {batch}"

def loop_text(batch_loop: bool, batch_rows: int) -> str:
  return ("as a loop" + (f", {batch_rows} rows at a time" if batch_rows > 1 else "")) if batch_loop else "upcast"

def summary(table: Table) -> str:
  """A line per kernel: kind, shape, the default's time and the chosen one's, the speed-up."""
  rows = [("kernel", "shape", "default ms", "chosen ms", "speed-up", "chosen")]
  for e in table.entries:
    timed = e.default_ms > 0 and e.chosen_ms > 0  # 0: not measured (the default did not compile)
    rows.append((e.kind, shape_text(e.shape), f"{e.default_ms:.3f}" if timed else "-", f"{e.chosen_ms:.3f}" if timed else "-",
                 f"{e.default_ms / e.chosen_ms:.2f}x" if timed else "-", "default" if e.opts is None else label(e.opts)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

def shape_text(shape: tuple[int, ...]) -> str: return "x".join("n" if s == -1 else str(s) for s in shape)
def label(choice: tuple[Opt, ...]) -> str:
  return ", ".join(f"{o.op.name.lower()} {o.axis}:{o.arg}" for o in choice if o.op is not OptOps.THREAD) or "none"

# ---- candidates ----

U, R = (lambda axis, arg: Opt(OptOps.UPCAST, axis, arg)), (lambda axis, arg: Opt(OptOps.UNROLL, axis, arg))

def _matvec(shape):  # rows x (K/A) x A: the lane axis unrolled whole, then (K/A) unrolls or 2 rows a step
  return [[R(1, 0)], [R(1, 0), R(0, 2)], [R(1, 0), R(0, 3)], [R(1, 0), R(0, 4)], [R(1, 0), U(0, 2)], [R(1, 0), U(0, 2), R(0, 2)]]

def _decode_scores(shape):  # ... x positions x (hd/A) x A: the lanes, and (hd/A) unrolled by 2, 4 or whole
  return [[R(1, 0)], [R(1, 0), R(0, 2)], [R(1, 0), R(0, 4)], [R(1, 0), R(0, 0)]]

def _prefill_scores(shape):  # ... x queries x hd: 16 or 32 queries a step, hd unrolled by 2-8, or 2 query groups (G) a key row read
  q = len(shape) - 2
  return [[U(q, 16), R(0, k)] for k in (4, 8, 2)] + [[U(q, 16), U(q, 2), R(0, 4)], [U(q, 16), U(q - 1, 2), R(0, 4)], [U(q, 16), U(q - 1, 3), R(0, 4)]]

def _batch_matvec(shape):  # batch x rows x (K/A) x A: the batch a loop, 2 or 4 rows at a time, or upcast whole times 1-8 rows
  # the batch a loop: one row's product (matvec's code) once per row, the weight's rows read again from the core's cache.
  # On the AMD EPYC (Zen 4) every upcast of the whole batch measured slower than this: clang's code for several rows at once
  # reassembles the inputs' 4-float loads with shuffles (4 x (1536x576) Q4_1 on one core 0.66 -> 0.28 ms, 8 x 1.06 -> 0.65,
  # the Q8_0 head 49152x576 8 rows 42.9 -> 27.4 ms); on the Intel Xeon, 8 rows upcast cost 3x one row. One row's code 4 rows
  # at a time beat both there for Q4_1 (opts.loop_opts)
  lanes = ([R(1, 4), R(0, 2)], [R(1, 0)], [R(1, 4), R(0, 3)])  # (K/A) by 3: Q8_0 49152x576, 8 rows, 10.5 -> 7.5 ms
  steps = [[U(0, n), R(1, 0)] for n in (4, 2) if n < shape[0] and shape[0] % n == 0]  # a few rows at a time (opts.loop_opts)
  return [[R(1, 0), R(0, 3)], [R(1, 0)]] + steps + [([U(1, r)] if r > 1 else []) + [U(0, shape[0])] + lane for r in (1, 2, 4, 8) for lane in lanes]

def _batch_matmul(shape):  # batch x rows x K: the batch times 2-8 rows in registers, K unrolled by 4 or 8
  return [[U(1, r), U(0, shape[0]), R(0, k)] for r in (4, 2, 8) for k in (4, 8)]

def _batch_sums(shape):  # [rows x] candidates x lanes x (V / lanes): 4-32 lanes times the candidates (and 2 rows), or the sum unrolled by 2-4
  lane, c = len(shape) - 2, len(shape) - 3
  out = [[U(lane, n), U(c, shape[c])] for n in (16, 8, 32, 4)] + [[U(lane, 16), U(c, shape[c]), R(0, 2)], [U(lane, 8), U(c, shape[c]), R(0, 4)]]
  return out + ([[U(lane, 8), U(c, shape[c]), U(0, 2)]] if len(shape) == 4 else [])

def _prefill_matmul(shape):  # panels x tokens x panel rows x K: the panel's rows whole times 2-8 tokens, K unrolled by 2-8
  return [[U(2, shape[2]), U(1, tokens), R(0, k)] for tokens, k in ((4, 4), (8, 4), (2, 4), (4, 2), (4, 8), (8, 2), (2, 8))]

def _panel_pack(shape):  # panels x blocks x 2 x bytes x panel rows: the rows one vector, or in 4s or 8s, with 2-4 bytes of a block
  return [[U(4, 16)], [U(4, 16), U(3, 2)], [U(4, 8)], [U(4, 4), U(3, 4)], [U(3, 4), U(4, 4)], [U(4, 8), U(3, 2)]]

def _values(shape):  # ... x hd, reduced over the positions (decode's and a prefill chunk's): the head dimension upcast in 1-4 pieces
  axis, hd = len(shape) - 2, shape[-2]
  return [[U(axis, n)] + ([U(axis, hd // n)] if hd > n else []) for n in (16, 8, 32, hd)] + [[U(axis, 16)], [U(axis, 8)]]

def _block_minimums(shape):  # rows x blocks: 4, 8 (the default), 16 or 32 rows a step, or 8 with the blocks unrolled by 2 or 4
  return [[U(0, 16)], [U(0, 8), U(0, 2)], [U(0, 4)], [U(0, 8), R(0, 2)], [U(0, 8), R(0, 4)], [U(0, 16), U(0, 2)]]

# each kind's variants (after the default's THREAD), by the kernel's shape
CANDIDATES: dict[str, Callable[[tuple[int, ...]], list[list[Opt]]]] = {
  "matvec": _matvec, "decode scores": _decode_scores, "prefill scores": _prefill_scores, "batch matvec": _batch_matvec,
  "batch matmul": _batch_matmul, "batch sums": _batch_sums, "prefill matmul": _prefill_matmul, "decode values": _values, "prefill values": _values,
  "panel pack": _panel_pack, "block minimums": _block_minimums}

def candidates(kernel: Kernel) -> list[tuple[Opt, ...]]:
  """The default first, then the kind's variants that apply to the kernel, with the default's thread split, at most
  MAX_UPCAST values in registers, MAX_CANDIDATES in all."""
  thread = [o for o in kernel.default if o.op is OptOps.THREAD]
  first = kernel.default[:1] == thread[:1]  # the thread split where the default has it: first, or after the upcasts
  out = [tuple(kernel.default)]
  for variant in CANDIDATES[kernel.kind](kernel.shape):
    if len(out) == MAX_CANDIDATES: break
    if (choice := tuple(thread + variant if first else variant + thread)) not in out and (k := opts.applied(kernel.k, choice)) is not None and upcast(k) <= MAX_UPCAST:
      out.append(choice)
  return out

def upcast(k) -> int: return prod(s for s, t in zip(k.full_shape, k.axis_types) if t in (AxisType.UPCAST, AxisType.UNROLL))

# ---- recording and timing ----

@dataclasses.dataclass(frozen=True)
class Kernel:
  kind: str
  shape: tuple[int, ...]
  k: postrange.Scheduler  # as tinygrad handed it to the heuristic, before any opt
  default: list[Opt]

class _Seen(Exception): pass  # ends a kernel's lowering once the heuristic has been handed it

def record(run: Callable[[], object]) -> list[Kernel]:
  """The kernels opts.py's rules claim (where their default applies) in what `run()` realizes, once per (kind, shape), in
  order. Nothing is run: tensor.run_linear's stand-in lowers each new kernel only as far as tinygrad's heuristic (codegen's
  full_rewrite_to_sink, stopped there), seconds where lowering and compiling the model in full takes minutes on 2 cores.
  Where tinygrad lacks one of these internals, `run()` runs as usual, compiled in this process (a compile worker would
  call the heuristic in its own)."""
  seen: dict[tuple[str, tuple[int, ...]], Kernel] = {}
  lowered: set = set()
  ours = heuristic.hand_coded_optimizations
  lower_only = not (opts.missing(tensor, "run_linear") or opts.missing(realize, "_get_call_to_compile") or
                    opts.missing(codegen, "full_rewrite_to_sink"))
  def recording(k):
    if k.ren.target.device == "CPU" and (claimed := opts.rule(k)) is not None and opts.applied(k, claimed[1]) is not None:
      seen.setdefault((claimed[0], key := opts.shape_key(k)), Kernel(claimed[0], key, k.copy(), claimed[1]))
    if lower_only: raise _Seen
    return ours(k)
  def lower(linear, *args, **kwargs):
    for call in linear.toposort():
      if call.op is Ops.CALL and (todo := realize._get_call_to_compile(call)) is not None and todo[0].op is Ops.SINK and todo[0] not in lowered:
        lowered.add(todo[0])
        with contextlib.suppress(_Seen): codegen.full_rewrite_to_sink(*todo)
  run_linear = tensor.run_linear
  heuristic.hand_coded_optimizations = recording  # looked up at each use, as opts.install relies on
  if lower_only: tensor.run_linear = lower
  try:
    with Context(PARALLEL=0, JIT=0): run()  # the JITs run their functions (a capture would lower and compile everything)
  finally: heuristic.hand_coded_optimizations, tensor.run_linear = ours, run_linear
  return list(seen.values())

def run_engine(runner) -> None:
  """What the engine runs: each prefill chunk, and for each batch bucket a decode step and its greedy and sampling heads
  (called as the runner calls them, without reading their tokens: nothing may have run)."""
  for n in runner.chunks: logits = runner.prefill(0, [1] * n, 0)
  for b in runner.buckets:
    logits = runner.decode([(0, (4 + i) % runner.max_context, 1) for i in range(b)])
    runner.greedy_jits[b](logits, runner.no_mask[b])
    for heads in (runner.sample_jits, runner.top_k_sample_jits):
      heads[b](logits, runner.no_mask[b], *[v.bind(runner.slots) for v in runner.v_sample[b]])  # the scratch row

def to_ms(seconds: float) -> float: return round(seconds * 1e3, 4) if math.isfinite(seconds) else 0.0

def _compile(job: tuple[int, postrange.Scheduler, bool | None]) -> tuple[int, UOp | None]:
  """search._try_compile's compile of a candidate (its PARAMs on the kernel's device), without its cap of BEAM_UOPS_MAX
  (3000) uops, which opts.py's defaults for 8-row batches exceed, with clang's vectorizer capped or not where the job says
  (None: as the process compiles): the program, or None where tinygrad refuses it."""
  i, k, capped = job
  try:
    with contextlib.nullcontext() if capped is None else vectors.compiling(k.ren.compiler, capped):
      ast = k.get_optimized_ast(name_override="test")
      return i, to_program(ast.substitute({p: p.replace(arg=dataclasses.replace(p.arg, device=k.ren.target.device))
                                           for p in ast.toposort() if p.op is Ops.PARAM}), k.ren)
  except (KernelOptError, CompileError, RuntimeError): return i, None

def compile_all(ks: list, capped: bool | None = None) -> list[UOp | None]:
  """Each kernel compiled (_compile), in tinygrad's compile pool where there is one, as BEAM compiles its candidates."""
  out: list = [None] * len(ks)
  pool = search.get_worker_pool()
  for i, prg in (map if pool is None else pool.imap_unordered)(_compile, [(i, k, capped) for i, k in enumerate(ks)]): out[i] = prg
  return out

def timer(kernel: Kernel, choices: list[tuple[Opt, ...]], capped: bool | None = None) -> Callable[[list[int]], list[float]]:
  """A function that times the choices of these indices (each compiled once, here, with clang's vectorizer `capped` or
  not, None: as the process compiles) as BEAM times candidates, and returns every choice's best time so far in seconds
  (inf: not timed, or it did not compile or run)."""
  bufs, var_vals = postrange.args_from_ast(kernel.k.ast, "CPU")
  for b in search._ensure_buffer_alloc(bufs): b.allocator._copyin(b._buf, memoryview(bytearray(b.nbytes)))  # zeros: no NaNs or denormals
  programs = compile_all([opts.applied(kernel.k, c) for c in choices], capped)  # each applies: candidates() checked
  best = [math.inf] * len(choices)
  def time(which: list[int]) -> list[float]:
    for _ in range(ROUNDS):  # in rounds: a slow moment of a busy machine spreads over all of them
      for i in which:
        if programs[i] is None: continue
        try: best[i] = min(best[i], *search._time_program(programs[i], var_vals, bufs, allow_test_size=False, cnt=RUNS))
        except RuntimeError: programs[i] = None
    return best
  return time

def choose(kernel: Kernel, choices: list[tuple[Opt, ...]]) -> tuple[int, float, float]:
  """The index of the best choice (0, the default, unless another beats it by MIN_GAIN, again when both are timed once
  more) and the default's and its best times in seconds (inf: it did not compile or run)."""
  best = (time := timer(kernel, choices))(list(range(len(choices))))
  if (i := min(range(len(choices)), key=lambda j: best[j])) != 0 and best[0] > best[i] * MIN_GAIN: time([0, i])
  win = i if best[0] != math.inf and best[0] > best[i] * MIN_GAIN else 0
  return win, best[0], best[win]

# ---- the probe ----

PROBE = (576, 1536)  # in, out: a Q4_1 layer of SmolLM2's MLP, with float16 scales as GGUF writes them

def probe() -> tuple[bool, int, bool, dict[tuple[bool, int], tuple[float, float, float]]]:
  """Whether a quantized product's decode batch runs faster here as one row's code for each row (opts.loop_opts) than upcast
  (opts.py's rule), the loop's rows at a time (1 or 4), whether clang's vectorizer capped at one register (vectors.py)
  makes it faster, and the three ways' times in ms by (capped, batch size) (upcast, the loop one row at a time, 4 rows at
  a time): a PROBE-shaped Q4_1 layer of 4 and of 8 rows, timed as tune times candidates, compiled capped and not (a few
  seconds). Capped where its best way beats the uncapped one's by MIN_GAIN at both sizes (uncapped, clang's own choice,
  where the cap was never measured to win); then 4 rows at a time where they beat one at both sizes by MIN_GAIN, the loop
  where it beats the upcast so."""
  from tg_llama.quantize import Int4Linear
  # made on the CPU whatever tinygrad's default device is (DEV unset where OpenCL is installed: its default is CL)
  with Context(DEV="CPU"): layer, rows = Int4Linear(*PROBE, scale_dtype=dtypes.half), (4, 8)
  batch_loop, opts.BATCH_LOOP = opts.BATCH_LOOP, False  # the rule's upcast is the default here
  try: kernels = [k for k in record(lambda: [layer(Tensor.empty(n, 1, PROBE[0], device="CPU")).realize() for n in rows]) if k.kind == "batch matvec"]
  finally: opts.BATCH_LOOP = batch_loop
  times = {}
  for cap in (True, False):
    for kernel in kernels:
      loops = [tuple([o for o in kernel.default if o.op is OptOps.THREAD] + opts.loop_opts(kernel.k, n)) for n in (1, 4)]
      times[(cap, kernel.shape[0])] = tuple(to_ms(t) for t in timer(kernel, [tuple(kernel.default), *loops], None if cap == vectors.CAP else cap)([0, 1, 2]))
  if len(times) != 2 * len(rows) or not all(t > 0 for ts in times.values() for t in ts): return False, 1, False, times
  capped = all(min(times[(False, n)]) > min(times[(True, n)]) * MIN_GAIN for n in rows)
  chosen = [times[(capped, n)] for n in rows]
  at_a_time = 4 if all(one > four * MIN_GAIN for _, one, four in chosen) else 1
  loop = all(upcast > (four if at_a_time == 4 else one) * MIN_GAIN for upcast, one, four in chosen)
  return loop, at_a_time, capped, times

def tune(source, progress: Callable[[str], None] | None = None, quantize: str | None = None, max_context: int | None = None) -> Table:
  """Search the kernel choices for `source` (a model, as tg_llama.load takes it) on this machine; the table (not written)."""
  from tg_llama.api import load
  say = progress or (lambda line: None)
  say(f"loading {source} on the CPU backend")
  model = load(source, backend="cpu", graph_cache=False, quantize=quantize, max_context=max_context)
  say("timing a quantized decode batch upcast and as a loop, clang's vectorizer capped and not")
  batch_loop, batch_rows, capped, times = probe()
  say(f"a quantized decode batch {loop_text(batch_loop, batch_rows)}, {'capped' if capped else 'uncapped'}: " + ", ".join(
      f"{n} rows{' capped' if cap else ''} {upcast:.3f} ms upcast, {one:.3f} ms as a loop, {four:.3f} ms 4 rows at a time"
      for (cap, n), (upcast, one, four) in times.items()))
  opts.install({}, batch_loop, batch_rows, capped)  # the defaults the kernels are tuned against
  say("finding its kernels (scheduling a prefill chunk and a decode step of each batch size)")
  kernels = record(lambda: run_engine(model.runner))
  say(f"found {len(kernels)} kernels to tune ({', '.join(sorted({k.kind for k in kernels}))})")
  entries = []
  for n, kernel in enumerate(kernels, 1):
    choices = candidates(kernel)
    i, default, chosen = choose(kernel, choices)
    entries.append(Entry(kernel.kind, kernel.shape, tuple(kernel.default), choices[i] if i else None, to_ms(default), to_ms(chosen)))
    say(f"tuning kernel {n}/{len(kernels)} ({kernel.kind} {shape_text(kernel.shape)}): " +
        (f"best {label(choices[i])}, {default / chosen:.2f}x" if i else "default kept") + f" ({len(choices)} candidates)")
  return Table(machine(), datetime.date.today().isoformat(), str(source)[-400:], tuple(entries), batch_loop, batch_rows, capped)
