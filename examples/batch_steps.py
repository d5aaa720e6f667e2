"""What a decode step of 1, 2, 4 and 8 sequences costs, ours next to llama.cpp's on the same GGUF file, in one run.

The engine's aggregate decode at 8 streams is 8 / (a step of 8 rows) against 1 / (a step of 1 row). Where a step reads
the weights once for every row and the reading dominates, 8 rows cost little more than one; where the arithmetic
dominates (on a few CPU cores), they cost several times as much. This times each engine's batched step directly:
8 sequences each hold a prompt of --context tokens, then steps of n rows (one new token each, greedy for ours; logits
for llama.cpp, through llama-cpp-python's low-level batch API) are timed, the median of --steps. Each engine runs in a
process of its own (ours leaves threads napping after its steps, which would slow the other), rounds alternating.
A benchmark, not a test. Usage: DEV=CPU python examples/batch_steps.py [--model PATH] [--context 64] [--steps 40]"""
import argparse, importlib.util, multiprocessing, statistics, time
from concurrent.futures import ProcessPoolExecutor

ROWS = (1, 2, 4, 8)

def ours(path: str, context: int):
  import tg_llama
  from tg_llama.cli import warm_up
  from tg_llama.transfer import read
  model = tg_llama.load(path, max_context=context + 128, slots=8)
  warm_up(model)
  runner = model.runner
  for s in range(8): read(runner.prefill(s, [100 + (i * 7 + s) % 1000 for i in range(context)], 0))
  def step(n: int, k: int):
    runner.sample(runner.decode([(s, context + k, 200 + s) for s in range(n)]), list(range(n)), True)
  return step

def llama_cpp_steps(path: str, context: int):
  import llama_cpp as L
  from tinygrad.helpers import NUM_CPU_THREADS
  L.llama_backend_init()
  model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
  params = L.llama_context_default_params()
  params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 8 * (context + 128), 8 * context, 8 * context, 8
  params.n_threads = params.n_threads_batch = NUM_CPU_THREADS.value  # the threads our CPU runner uses
  ctx = L.llama_init_from_model(model, params)
  batch = L.llama_batch_init(8 * context, 0, 8)
  def run(entries):  # (token, position, sequence)
    batch.n_tokens = len(entries)
    for i, (t, p, s) in enumerate(entries):
      batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, 1
      batch.seq_id[i][0] = s
    if L.llama_decode(ctx, batch) != 0: raise RuntimeError("llama_decode failed")
    L.llama_synchronize(ctx)  # decoding is asynchronous: without this the clock stops early
  run([(100 + (i * 7 + s) % 1000, i, s) for s in range(8) for i in range(context)])
  def step(n: int, k: int):
    if k == 0:  # a round starts again where the prompts end
      for s in range(8): L.llama_memory_seq_rm(L.llama_get_memory(ctx), s, context, -1)
    run([(200 + s, context + k, s) for s in range(n)])
  return step

def timed(step, n: int, steps: int) -> float:
  times = []
  for k in range(steps):
    start = time.perf_counter()
    step(n, k)
    times.append(time.perf_counter() - start)
  return statistics.median(times[2:]) * 1e3

def measure(engine: str, path: str, context: int, steps: int) -> dict[int, float]:
  step = (ours if engine == "tg-llama" else llama_cpp_steps)(path, context)
  for n in ROWS: timed(step, n, 4)  # ours captures each row count's graph here
  return {n: timed(step, n, steps) for n in ROWS}

def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default=None, help="a GGUF file (default: the bundled SmolLM2-135M-Instruct)")
  p.add_argument("--context", type=int, default=64, help="tokens each sequence holds before the timed steps (default 64)")
  p.add_argument("--steps", type=int, default=40, help="steps timed for each row count and round (default 40)")
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args()
  from tg_llama.assets import resolve_model
  path = str(resolve_model(args.model))
  engines = ["tg-llama"]
  if importlib.util.find_spec("llama_cpp") is not None: engines.append("llama.cpp")
  else: print("llama.cpp: not installed (pip install ../shared/wheels/llama_cpp_python-*.whl), timing ours only")
  ms = {name: {n: [] for n in ROWS} for name in engines}
  for _ in range(args.rounds):
    for name in engines:
      with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for n, v in pool.submit(measure, name, path, args.context, args.steps).result().items(): ms[name][n].append(v)
  print(f"{path}: a decode step of n sequences ({args.context} tokens each before), ms, median of {args.rounds} rounds")
  print(f"{'':10}" + "".join(f"{f'{n} rows':>10}" for n in ROWS) + f"{'8 streams / 1':>16}")
  for name in engines:
    med = {n: statistics.median(ms[name][n]) for n in ROWS}
    print(f"{name:10}" + "".join(f"{med[n]:10.2f}" for n in ROWS) + f"{f'x{8 * med[1] / med[8]:.2f}':>16}")

if __name__ == "__main__": main()
