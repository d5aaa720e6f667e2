"""Folders and files that only this user can write: what the caches may trust, checked the way ssh checks ~/.ssh.

A cache holds code in all but name (compiled kernels, pickled graphs, a shared library), so a folder or file in it is
used only when this user owns it and neither its group nor others may write it. Folders made here are 0700, files 0600,
whatever the umask.

Not defended: root, and other processes of this user; a folder swapped for another between its check and its use by
someone who may write its parent (the parents of the cache root are not checked)."""
from __future__ import annotations
import atexit, contextlib, functools, os, pathlib, shutil, stat, tempfile

def problem(path: pathlib.Path) -> str | None:
  """Why `path` (symlinks followed) may hold what another user wrote; None when it is this user's alone, or missing."""
  try: st = path.stat()
  except FileNotFoundError: return None
  if st.st_uid != os.geteuid(): return f"{path} is owned by another user (uid {st.st_uid})"
  if st.st_mode & 0o022:
    return f"{path} is writable by {' and '.join(w for bit, w in ((0o020, 'group'), (0o002, 'others')) if st.st_mode & bit)} (mode {stat.S_IMODE(st.st_mode):o})"
  return None

def first_problem(paths) -> str | None: return next((why for p in paths if (why := problem(p)) is not None), None)

def make(folder: pathlib.Path) -> pathlib.Path:
  """`folder` and its missing parents, each made 0700 (an existing folder is left as it is)."""
  missing = [p for p in (folder, *folder.parents) if not p.exists()]
  for p in reversed(missing):
    with contextlib.suppress(FileExistsError): p.mkdir(mode=0o700)  # another process may make it first
  return folder

def touch(path: pathlib.Path) -> pathlib.Path:
  """`path` as an empty 0600 file if it is missing: sqlite gives its -wal and -shm files the database file's mode."""
  with contextlib.suppress(FileExistsError): os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
  return path

@contextlib.contextmanager
def replacing(path: pathlib.Path, prefix: str, suffix: str, mode: str = "wb", **kwargs):
  """A new 0600 file in `path`'s folder, named prefix...suffix, to write in the block; when the block ends without an error
  it replaces `path` in one rename (a reader sees the old file or the whole new one, also when two processes write it),
  else it is removed."""
  with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=prefix, suffix=suffix, delete=False, **kwargs) as f:
    try: yield f
    except BaseException:
      os.unlink(f.name)
      raise
  os.replace(f.name, path)

@functools.cache
def temp_folder(purpose: str) -> pathlib.Path:
  """A 0700 folder of this process's own in the system's temporary folder, removed at exit."""
  path = pathlib.Path(tempfile.mkdtemp(prefix=f"tg-llama-{purpose}-"))
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path
