"""`tg-llama bench --stages 2`: the model as a pipeline of layer shards on Ray, next to one process, in the same run.

Loads the model in this process and as N stages (on the Ray cluster at --cluster, else a local instance started first,
its start timed apart), and times for each:
  start       load and warm-up (tg_llama/cli.py's warm_up: kernels and graphs from the caches of an earlier run)
  ttft        a --prompt-tokens prompt to its first token, after warm-up
  decode      greedy tokens/s of one stream, the median of --runs
  hops        the pipeline's time per token less the stages' own compute time per token (each stage times its steps):
              what the hops between processes cost a token (Ray calls, the hidden states, the sampled token back)
  streams     tokens/s of 2 streams per stage at once (their prompts included, after an untimed round): on stages of
              separate devices the engine keeps a group of them on each (pipeline parallelism)"""
from __future__ import annotations
import json, statistics, time
from tg_llama.bench import synthetic_prompt, timed_generate
from tg_llama.engine.engine import Request

def run_model(model, args, start_s: float, streams: int) -> dict:
  vocab = model.config.vocab_size
  timed = [timed_generate(model.generate, synthetic_prompt(args.prompt_tokens, vocab, run), args.gen_tokens) for run in range(1, args.runs + 1)]
  at_once(model, args, streams, 0)  # untimed: captures the graphs of that many rows
  return {"device": model.device, "start_s": start_s, "ttft_s": statistics.median(t for t, _ in timed),
          "decode_tok_s": statistics.median(d for _, d in timed), "decode_tok_s_runs": [d for _, d in timed],
          "streams": streams, "streams_tok_s": at_once(model, args, streams, 1)}

def at_once(model, args, n: int, seed: int) -> float:
  """Tokens/s of n greedy requests submitted together."""
  prompts = [synthetic_prompt(args.prompt_tokens, model.config.vocab_size, 100 * seed + i) for i in range(n)]
  start = time.perf_counter()
  handles = [model.engine.submit(Request(tuple(p), args.gen_tokens)) for p in prompts]
  tokens = sum(len(list(h)) for h in handles)  # iterating one runs the engine's steps for all
  return tokens / (time.perf_counter() - start)

def main(args) -> int:
  import tg_llama
  from tg_llama.cli import warm_up
  from tg_llama.cluster import connect, load
  from tg_llama.assets import resolve_model
  path, context, streams = resolve_model(args.model), args.prompt_tokens + args.gen_tokens, 2 * args.stages
  start = time.perf_counter()
  one = tg_llama.load(path, backend=args.backend, dtype=args.dtype, max_context=context, quantize=args.quantize, slots=streams)
  warm_up(one)
  single = run_model(one, args, time.perf_counter() - start, streams)
  del one
  start = time.perf_counter()
  connect(args.cluster)
  ray_s = time.perf_counter() - start
  start = time.perf_counter()
  pipe = load(path, stages=args.stages, address=args.cluster, backend=args.backend, dtype=args.dtype, max_context=context,
              quantize=args.quantize, slots=streams)
  warm_up(pipe)
  stages = run_model(pipe, args, time.perf_counter() - start, streams)
  before = pipe.runner.stage_infos()
  n = len(list(pipe.generate(synthetic_prompt(args.prompt_tokens, pipe.config.vocab_size, 99), args.gen_tokens)))
  after = pipe.runner.stage_infos()
  # the steps of the last generation: the rows of its prompt's rest, then one per token
  compute = [(a["busy_s"] - b["busy_s"]) / max(a["steps"] - b["steps"], 1) for a, b in zip(after, before)]
  stages.update(ray_start_s=ray_s, stage_ms_per_token=[1e3 * c for c in compute], hops_ms_per_token=1e3 / stages["decode_tok_s"] - 1e3 * sum(compute),
                plan=[p.layers for p in pipe.runner.plan], tokens=n)
  result = {"model": str(path), "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "runs": args.runs,
            "one_process": single, "stages": stages}
  print(json.dumps(result, indent=2) if args.json else table(result))
  return 0

def table(r: dict) -> str:
  one, st = r["one_process"], r["stages"]
  rows = [("", "start s", "ttft s", "decode tok/s", "ms/token", f"{st['streams']} streams tok/s"),
          (f"one process ({one['device']})", f"{one['start_s']:.1f}", f"{one['ttft_s']:.2f}", f"{one['decode_tok_s']:.1f}", f"{1e3 / one['decode_tok_s']:.1f}",
           f"{one['streams_tok_s']:.1f}"),
          (f"{len(st['plan'])} stages ({st['device']})", f"{st['start_s']:.1f} (x{st['start_s'] / one['start_s']:.2f})", f"{st['ttft_s']:.2f}",
           f"{st['decode_tok_s']:.1f} ({100 * st['decode_tok_s'] / one['decode_tok_s']:.0f}%)", f"{1e3 / st['decode_tok_s']:.1f}",
           f"{st['streams_tok_s']:.1f} ({100 * st['streams_tok_s'] / one['streams_tok_s']:.0f}%)")]
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
  head = f"{r['model']}: {r['prompt_tokens']}-token prompt, {r['gen_tokens']} new tokens, greedy, median of {r['runs']} runs"
  per_stage = ", ".join(f"{ms:.1f}" for ms in st["stage_ms_per_token"])
  return "\n".join([head, *lines, f"per token: stages' compute {per_stage} ms, hops {st['hops_ms_per_token']:.1f} ms; "
                    f"Ray's local start {st['ray_start_s']:.1f} s (not in the stages' start)"])
