"""The per-backend caches on disk (`tg-llama cache`): what each holds, and clearing them.

A backend's folder holds tinygrad's compiled-kernel database (cache.db, with sqlite's -wal and -shm files), the
captured JIT graphs (graphs/*.pkl, see tg_llama/jit_cache.py) and, for the CPU, its graph runner (graph_runner_*.so).
Clearing one only costs the next run its compile and capture time. TG_LLAMA_CACHE may point at a folder that holds other
things too: only those file names (backend.CACHE_FILES) are counted or deleted, and a folder only once it is empty.
tinygrad's own cache (~/.cache/tinygrad, used by tinygrad outside tg-llama) is never touched here."""
from __future__ import annotations
import contextlib, pathlib, sqlite3
from dataclasses import dataclass
from tinygrad import Device
from tg_llama import private_dir
from tg_llama.backend import BACKENDS, CACHE_FILES, PARTIAL_FILES, cache_root, canonical_name

@dataclass(frozen=True)
class CacheInfo:
  backend: str
  path: pathlib.Path
  size: int           # bytes, every file of ours in the folder
  entries: int | None  # rows in cache.db: compiled kernels (and BEAM results, if BEAM was used); None: not a database
  graphs: int = 0     # files of captured JIT graphs, one per model and settings
  problem: str | None = None  # why the cache is not used (not this user's alone), if it is not

def list_caches() -> list[CacheInfo]:
  root = cache_root()
  if not root.is_dir(): return []
  return [CacheInfo(d.name, d, sum(f.stat().st_size for f in own_files(d)), count_entries(d / "cache.db"), len(list(d.glob("graphs/*.pkl"))),
                    private_dir.first_problem([root, d, *own_files(d)])) for d in sorted(root.iterdir()) if _is_backend_dir(d)]

def own_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The files that tg-llama (or tinygrad for it) wrote in a backend's folder, found by their names."""
  patterns = [p for p in CACHE_FILES + PARTIAL_FILES if "/" not in p or not (folder / "graphs").is_symlink()]  # a link leads elsewhere
  return [f for pattern in patterns for f in folder.glob(pattern) if f.is_file() or f.is_symlink()]

def count_entries(db: pathlib.Path) -> int | None:
  """Rows in the database; 0 without one, None when the file is not a database (it is still cleared)."""
  if not db.is_file(): return 0
  try:
    # a plain connection (not read-only) so that rows still in the write-ahead log count too
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
      tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
      return sum(conn.execute(f"SELECT COUNT(*) FROM '{t}'").fetchone()[0] for t in tables)
  except sqlite3.DatabaseError: return None

def show_caches() -> str:
  caches = list_caches()
  if not caches: return f"no kernel caches yet in {cache_root()}"
  lines = [f"kernel caches in {cache_root()}:"]
  for c in caches:
    entries = f"{c.entries:>6} entries" if c.entries is not None else "cache.db unreadable"
    lines.append(f"  {c.backend:<8} {_human(c.size):>9}  {entries}  {c.graphs:>3} graphs  {c.path}" + (f"  (not used: {c.problem})" if c.problem else ""))
  return "\n".join(lines)

def clear_caches(backend: str | None = None) -> list[pathlib.Path]:
  """Delete the files of ours in one backend's cache folder (or in every one), then the folder if nothing else is left
  in it; the folders cleared."""
  name = canonical_name(backend) if backend else None
  cleared = []
  for c in list_caches():
    if name is None or c.backend == name:
      for f in own_files(c.path): f.unlink(missing_ok=True)
      for d in (c.path / "graphs", c.path):
        with contextlib.suppress(OSError): d.rmdir()  # fails unless empty: what else is there is not ours
      cleared.append(c.path)
  return cleared

def _is_backend_dir(d: pathlib.Path) -> bool:
  # named like a backend: ours, or a tinygrad device that has no name of ours (DEV=PYTHON's cache is "python")
  return d.is_dir() and (d.name in BACKENDS or d.name.upper() in Device._devices)

def _human(n: int) -> str:
  if n < 1024: return f"{n} B"
  size, unit = next((n / 1024 ** i, u) for i, u in ((3, "GB"), (2, "MB"), (1, "KB")) if n >= 1024 ** i)
  return f"{size:.1f} {unit}"
