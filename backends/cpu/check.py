"""Run the model on one backend and compare it with a reference; the other backends' check.py call this one.

  python backends/cpu/check.py [--model PATH] [--tokens 16]        CPU against transformers (float32, the oracle)
  python backends/cuda/check.py [--model PATH] [--dtype float32]   CUDA against the CPU backend, same for the others

Each backend runs in its own process (tinygrad's DEV is fixed per process). Passes when the prompt's next-token
logits agree (same top token, max difference within the dtype's tolerance) and the first 8 greedy tokens are equal;
prints load time, time to first token and decode speed for both. Exit status: 0 pass, 1 mismatch, 2 could not run."""
from __future__ import annotations
import argparse, json, os, pathlib, subprocess, sys, time

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMPT = "The three primary colors are"
MUST_MATCH = 8  # greedy tokens; float16 may drift later, at near-ties, without being wrong
TOLERANCE = {"float": 1e-3, "half": 5e-2, "bfloat16": 1e-1}  # max |a - b| over the largest |logit|

def worker(backend: str, model_path: str, n: int, dtype: str | None) -> dict:
  import tg_llama
  start = time.perf_counter()
  model = tg_llama.load(model_path, backend=backend, dtype=dtype, max_context=max(64, n + 32))
  loaded = time.perf_counter()
  tok = model.tokenizer
  ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(PROMPT)
  tokens, stamps = [], [time.perf_counter()]
  for t in model.generate(ids, n):  # first: the first token's time includes compiling (or finding cached) kernels
    tokens.append(t)
    stamps.append(time.perf_counter())
  logits = model.logits(ids)
  steps = sorted(b - a for a, b in zip(stamps[4:], stamps[5:]))  # after the decode graph is captured
  return {"backend": model.backend.name, "device": model.backend.device, "dtype": model.dtype.name, "ids": ids,
          "load_s": loaded - start, "first_token_s": stamps[1] - stamps[0], "decode_tok_s": 1 / steps[len(steps) // 2] if steps else None,
          "tokens": tokens, "text": tok.decode(tokens), "logits": logits.tolist()}

def run_worker(backend: str, model_path: str, n: int, dtype: str | None) -> dict:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--model", model_path, "--tokens", str(n)] + (["--dtype", dtype] if dtype else [])
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    print(f"{backend}: the run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
    sys.exit(2)
  return json.loads(proc.stdout.strip().splitlines()[-1])

def transformers_reference(model_path: str, ids: list[int], n: int) -> dict:
  """transformers reading the same GGUF, float32: logits after the prompt, greedy tokens by full forward passes."""
  import torch
  from transformers import AutoModelForCausalLM
  path = pathlib.Path(model_path)
  model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  seq = list(ids)
  with torch.no_grad():
    logits = model(torch.tensor([seq])).logits[0, -1].numpy()
    for _ in range(n): seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
  return {"backend": "transformers", "device": "torch CPU", "dtype": "float", "tokens": seq[len(ids):], "logits": logits.tolist(),
          "load_s": None, "first_token_s": None, "decode_tok_s": None}

def compare(ours: dict, ref: dict) -> bool:
  import numpy as np
  a, b = np.array(ours["logits"]), np.array(ref["logits"])
  diff = float(np.abs(a - b).max() / np.abs(b).max())
  tol = max(TOLERANCE.get(ours["dtype"], 1e-1), TOLERANCE.get(ref["dtype"], 1e-1))
  same = next((i for i, (x, y) in enumerate(zip(ours["tokens"], ref["tokens"])) if x != y), min(len(ours["tokens"]), len(ref["tokens"])))
  for r in (ours, ref):
    speed = "" if r["load_s"] is None else \
      f"  load {r['load_s']:.1f} s, first token {r['first_token_s']:.1f} s, decode {r['decode_tok_s'] or 0:.1f} tokens/s"
    print(f"{r['backend']:>12} ({r['device']}, {r['dtype']}){speed}")
  print(f"top token: {int(a.argmax())} vs {int(b.argmax())}; max logit difference {diff:.2e} of the largest (tolerance {tol:.0e})")
  print(f"greedy tokens equal for the first {same} of {len(ref['tokens'])} (needed: {min(MUST_MATCH, len(ref['tokens']))})")
  print(f"text: {ours.get('text', '')!r}")
  ok = a.argmax() == b.argmax() and diff <= tol and same >= min(MUST_MATCH, len(ref["tokens"]))
  print("PASS" if ok else "FAIL")
  return bool(ok)

def main(default_backend: str, argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=f"run the model on {default_backend} and compare it with a reference")
  p.add_argument("--model", default=None, help="a GGUF file or checkpoint directory (default: the bundled SmolLM2-135M-Instruct)")
  p.add_argument("--backend", default=default_backend, help=f"the backend to check (default {default_backend})")
  p.add_argument("--dtype", default=None, help="compute dtype on the checked backend (default: the backend's)")
  p.add_argument("--tokens", type=int, default=16, help="greedy tokens to generate")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.model is None:
    sys.path.insert(0, str(REPO))
    from tg_llama.assets import default_model_path
    args.model = str(default_model_path())
  if args.worker:
    print(json.dumps(worker(args.backend, args.model, args.tokens, args.dtype)))
    return 0
  ours = run_worker(args.backend, args.model, args.tokens, args.dtype)
  if args.backend == "cpu":
    try: ref = transformers_reference(args.model, ours["ids"], args.tokens)
    except ImportError as e:
      print(f"the reference needs the test extra (torch==2.13.0, transformers, gguf, accelerate): {e}", file=sys.stderr)
      return 2
  else: ref = run_worker("cpu", args.model, args.tokens, None)
  return 0 if compare(ours, ref) else 1

if __name__ == "__main__": sys.exit(main("cpu"))
