"""Time to first token of a fresh process, with and without the per-backend caches (compiled kernels, captured graphs).

Runs three processes one after the other, on a cache folder of their own (the user's is never touched):
  cold          nothing cached: every kernel compiles, prefill and decode are captured at their first call (graphs saved)
  kernels       compiled kernels cached, graph cache off (TG_LLAMA_GRAPH_CACHE=0): still scheduled and captured
  kernels+jit   both cached: the captured graphs load with the model and replay from the first call
Each process loads the model, then answers two prompts greedily; it times the load, the first prompt's first token and
all of its tokens, and the second prompt's first token (replayed from the graphs the first one captured or loaded).
A benchmark, not a test. Usage: DEV=CPU python examples/coldwarm.py [--model PATH] [--tokens 16] [--cache-dir DIR]"""
import argparse, json, os, pathlib, shutil, subprocess, sys, tempfile, time

RUNS = (("cold", "1"), ("kernels", "0"), ("kernels+jit", "1"))  # name, TG_LLAMA_GRAPH_CACHE
PROMPTS = ("The capital of France is", "Tinygrad is a")

def child(model_path: str | None, n: int) -> dict:
  start = time.perf_counter()
  import tg_llama
  from tg_llama.assets import resolve_model
  t = {"import": time.perf_counter() - start}
  model = tg_llama.load(resolve_model(model_path))
  t["load"] = time.perf_counter() - start - t["import"]
  tok, answers = model.tokenizer, []
  for i, prompt in enumerate(PROMPTS):
    ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(prompt)
    began, out = time.perf_counter(), []
    for token in model.generate(ids, n):
      if not out:
        t[f"first{i}"] = time.perf_counter() - began
        if i == 0: t["since_start"] = time.perf_counter() - start
      out.append(token)
    t[f"all{i}"] = time.perf_counter() - began
    answers.append(out)
  return {"times": t, "answers": answers, "graphs_loaded": list(model.graphs.loaded) if model.graphs else [], "device": model.backend.device}

def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
  p.add_argument("--tokens", type=int, default=16, help="tokens per answer (default 16)")
  p.add_argument("--cache-dir", default=None, help="the cache folder to use, emptied first (default: a new temporary one)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args.model, args.tokens)))
    return 0
  cache = pathlib.Path(args.cache_dir or tempfile.mkdtemp(prefix="tg-llama-coldwarm-"))
  if cache.exists() and any(cache.iterdir()): shutil.rmtree(cache)
  try: return compare(args, cache)
  finally:
    if args.cache_dir is None: shutil.rmtree(cache, ignore_errors=True)

def compare(args, cache: pathlib.Path) -> int:
  results = {}
  for name, graphs in RUNS:
    env = {**os.environ, "TG_LLAMA_CACHE": str(cache), "TG_LLAMA_GRAPH_CACHE": graphs}
    cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens)] + (["--model", args.model] if args.model else [])
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
      print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
      return 1
    results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    results[name]["wall"] = time.perf_counter() - began
  print(f"time to first token on {results['cold']['device']}, {args.tokens} tokens per answer")
  print(f"{'run':<12} {'import':>7} {'load':>6} {'1st token':>10} {'answer 1':>9} {'2nd prompt 1st':>15} {'start->1st':>11} {'process':>8}  graphs loaded")
  for name, r in results.items():
    t = r["times"]
    print(f"{name:<12} {t['import']:>6.2f}s {t['load']:>5.2f}s {t['first0']:>9.2f}s {t['all0']:>8.2f}s {t['first1']:>14.2f}s "
          f"{t['since_start']:>10.2f}s {r['wall']:>7.2f}s  {','.join(r['graphs_loaded']) or '-'}")
  same = len({json.dumps(r["answers"]) for r in results.values()}) == 1
  print(f"same greedy tokens in every run: {'yes' if same else 'NO'}")
  return 0 if same else 1

if __name__ == "__main__": sys.exit(main())
