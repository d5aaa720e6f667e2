"""The per-backend caches on disk (`tg-llama cache`): what each holds, and clearing them.

A backend's folder holds tinygrad's compiled-kernel database (cache.db, with sqlite's -wal and -shm files) and the
captured JIT graphs (graphs/*.pkl, see tg_llama/jit_cache.py). Clearing one only costs the next run its compile and
capture time. tinygrad's own cache (~/.cache/tinygrad, used by tinygrad outside tg-llama) is never touched here."""
from __future__ import annotations
import contextlib, pathlib, shutil, sqlite3
from dataclasses import dataclass
from tg_llama.backend import BACKENDS, cache_root, canonical_name

@dataclass(frozen=True)
class CacheInfo:
  backend: str
  path: pathlib.Path
  size: int      # bytes, every file in the folder
  entries: int   # rows in cache.db: compiled kernels (and BEAM results, if BEAM was used)
  graphs: int = 0  # files of captured JIT graphs, one per model and settings

def list_caches() -> list[CacheInfo]:
  root = cache_root()
  if not root.is_dir(): return []
  return [CacheInfo(d.name, d, sum(f.stat().st_size for f in d.rglob("*") if f.is_file()), count_entries(d / "cache.db"),
                    len(list(d.glob("graphs/*.pkl")))) for d in sorted(root.iterdir()) if _is_backend_dir(d)]

def count_entries(db: pathlib.Path) -> int:
  if not db.is_file(): return 0
  # a plain connection (not read-only) so that rows still in the write-ahead log count too
  with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return sum(conn.execute(f"SELECT COUNT(*) FROM '{t}'").fetchone()[0] for t in tables)

def show_caches() -> str:
  caches = list_caches()
  if not caches: return f"no kernel caches yet in {cache_root()}"
  lines = [f"kernel caches in {cache_root()}:"]
  lines += [f"  {c.backend:<8} {_human(c.size):>9}  {c.entries:>6} entries  {c.graphs:>3} graphs  {c.path}" for c in caches]
  return "\n".join(lines)

def clear_caches(backend: str | None = None) -> list[pathlib.Path]:
  """Delete one backend's cache folder (or all of them); the folders removed."""
  name = canonical_name(backend) if backend else None
  removed = []
  for c in list_caches():
    if name is None or c.backend == name:
      shutil.rmtree(c.path)
      removed.append(c.path)
  return removed

def _is_backend_dir(d: pathlib.Path) -> bool:
  # only what tg-llama made: TG_LLAMA_CACHE may point at a folder that holds other things too
  return d.is_dir() and (d.name in BACKENDS or (d / "cache.db").is_file())

def _human(n: int) -> str:
  if n < 1024: return f"{n} B"
  size, unit = next((n / 1024 ** i, u) for i, u in ((3, "GB"), (2, "MB"), (1, "KB")) if n >= 1024 ** i)
  return f"{size:.1f} {unit}"
