"""`tg-llama bench`: prefill and decode speed, time to first token, peak memory and memory bandwidth, in one
table, optionally next to Hugging Face transformers and llama.cpp running the same weights on the same machine, each
in a process of its own (its memory its own, and a crash of its native code one line of the table: a llama.cpp built for
another CPU dies of an illegal instruction).

What is measured, on a synthetic prompt of `--prompt-tokens` ids (the speed does not depend on the text):
  ttft cold   the first generate() of this process: prefill + first token, JIT capture and kernel compiles
              included (compiled kernels come from tinygrad's disk cache when an earlier run left them there)
  ttft warm   the same after warm-up (one more untimed run, replaying the graphs the cold one captured); prefill tokens/s =
              prompt tokens / ttft warm
  decode      (gen tokens - 1) / time from the first token to the last, greedy; the median of `--runs`
  bandwidth   bytes read per decoded token (every weight but the embedding table, one embedding row, and the
              KV cache at the mean position) x decode tokens/s, next to a large numpy copy's (read + write) rate
  peak RSS    the process's highest resident memory over the model's runs (greedy and sampled), next to its bound:
              1.25 x (the checkpoint's bytes + the KV cache's); a GGUF's blocks are kept as read from the file, so a second
              copy of the weights would break it. The constrained runs' peak is shown apart: a JSON matcher's tables grow
              with the vocabulary, not the model (llguidance's, 60 MB for a 128k vocabulary)
  sampled     decode with the chat's default sampling (`tg-llama chat`'s temperature, top-p, repetition penalty)
  constrained decode under a JSON schema that cannot end within the run (an array of 1000+ objects), and the
              matcher's time per token (mask + advance), from replaying the first run's tokens through a fresh matcher
Speeds vary by 30% or more between runs on a shared machine: compare rows of one run, not across runs.

Not here: text quality (see the tests), batching, sampling other than greedy, timing assertions."""
from __future__ import annotations
import argparse, json, multiprocessing, pathlib, resource, signal, statistics, time
import numpy as np

# the native build crashes (illegal instruction) on CPUs that report AMX: name the features, AMX off (~8 min on 2 cores)
LLAMA_CPP_INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
                     '-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON '
                     '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python')

def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="tg-llama bench", description=__doc__.split("\n\n")[0])
  which = p.add_mutually_exclusive_group()
  which.add_argument("--model", help="a GGUF file or a checkpoint directory (default: the bundled SmolLM2-135M-Instruct)")
  which.add_argument("--synthetic", metavar="PRESET", help="instead: a model of a published size (llama-3.2-1b, llama-2-7b, ...: "
                                                          "tg_llama/config.py's presets) with random Q4_1 weights, its GGUF written "
                                                          "once into the cache folder (tg_llama/synthetic.py)")
  p.add_argument("--backend", help="cpu, opencl, cuda, ... (default: $TG_LLAMA_BACKEND, else tinygrad's $DEV)")
  p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default: the backend's)")
  p.add_argument("--quantize", choices=["none", "int8", "int4", "gguf"], default=None,
                 help="weight-only quantization (gguf: keep a GGUF file's Q8_0/Q4_0/Q4_1 blocks as stored; "
                      "default: gguf for such a file, else none)")
  p.add_argument("--prompt-tokens", type=int, default=256)
  p.add_argument("--gen-tokens", type=int, default=128)
  p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (the median is reported)")
  p.add_argument("--compare", action="append", choices=tuple(PEERS), default=[], help="also time this peer (repeatable)")
  p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of a table")
  p.add_argument("--concurrency", type=_levels, default=None, metavar="1,4,8",
                 help="instead: streams at once through `tg-llama serve` (aggregate tokens/s, time to first token and between tokens)")
  p.add_argument("--rounds", type=int, default=2, help="with --concurrency: requests per stream slot at each level (default 2)")
  p.add_argument("--stages", type=int, default=None, help="instead: the model as this many layer-shard stages on Ray, next to one "
                                                          "process (start-up, decode, the hops' cost per token; needs tg-llama[cluster])")
  p.add_argument("--cluster", metavar="ADDRESS", default=None, help="with --stages: the Ray cluster (default: a local instance)")
  args = p.parse_args(argv)
  for name in ("prompt_tokens", "gen_tokens", "runs", "rounds", "stages"):
    if getattr(args, name) is not None and getattr(args, name) < 1: p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
  if args.gen_tokens < 2: p.error(f"--gen-tokens must be at least 2 to time decoding, got {args.gen_tokens}")
  return args

def _levels(text: str) -> list[int]:
  try: levels = [int(x) for x in text.split(",")]
  except ValueError: raise argparse.ArgumentTypeError(f"expected numbers like 1,4,8, got {text!r}") from None
  if not levels or min(levels) < 1: raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
  return levels

def synthetic_prompt(n: int, vocab: int, run: int) -> list[int]:
  """Deterministic ids; each run starts with a different token so no run reuses another's cached prefix."""
  return [(run * 7919 + i * 104729) % (vocab - 256) + 256 for i in range(n)]

def peak_rss_mb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

RSS_SLACK = 1.25  # the bound on peak memory: the checkpoint and its KV cache, plus 25% (issue 13)

def checkpoint_mb(path: pathlib.Path) -> float:
  """A GGUF file's size, or the sum of a checkpoint directory's files."""
  return (path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())) / 2**20

def memory_bound(model, path: pathlib.Path, runtime_mb: float, peak: float) -> dict:
  """The peak RSS of the model's runs against RSS_SLACK x (checkpoint + KV cache), in MB as peak_rss_mb counts them, and
  what the process held before the model loaded (`runtime_mb`: Python, numpy, tinygrad)."""
  file_mb, kv_mb = checkpoint_mb(path), model.runner.cache.nbytes() / 2**20
  return {"peak_rss_mb": peak, "checkpoint_mb": file_mb, "kv_cache_mb": kv_mb, "rss_bound_mb": RSS_SLACK * (file_mb + kv_mb),
          "rss_within_bound": peak <= RSS_SLACK * (file_mb + kv_mb), "runtime_rss_mb": runtime_mb}

def machine_copy_gb_s(nbytes: int = 256 << 20, repeats: int = 5) -> float:
  """A plain large numpy copy: (read + write) bytes per second, the best of a few."""
  a = np.ones(nbytes // 4, dtype=np.float32)
  b = np.empty_like(a)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(b, a)
    best = min(best, time.perf_counter() - start)
  return 2 * nbytes / best / 1e9

def timed_generate(generate, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
  """(time to first token, decode tokens/s after it) of one greedy generation."""
  start = time.perf_counter()
  first = end = None
  n = 0
  for _ in generate(prompt, gen_tokens):
    n += 1
    end = time.perf_counter()
    if first is None: first = end
  return first - start, (n - 1) / (end - first)

def bytes_per_token(model, context: float) -> int:
  """Weights read to decode one token: every parameter but the embedding table (one row of it), of a mixture's experts
  the share a token is routed to (tg_llama/models/mixtral.py reads no other), plus the KV cache."""
  llama, c = model.llama, model.config
  params = {id(t): (name, t) for name, t in llama.weights().items() if name != "model.embed_tokens.weight"}
  total = sum(t.nbytes() * (c.n_active_experts / c.n_experts if ".experts." in name else 1) for name, t in params.values())
  embed = llama.embed_tokens.weight
  if id(embed) not in params: total += c.dim * embed.dtype.itemsize
  kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * model.dtype.itemsize
  return int(total + kv * context)

def load_ours(args, path: pathlib.Path, max_context: int):
  import tg_llama
  return tg_llama.load(path, backend=args.backend, dtype=args.dtype, max_context=max_context, quantize=args.quantize)

def bench_ours(args, path: pathlib.Path) -> dict:
  P, G = args.prompt_tokens, args.gen_tokens
  runtime_mb = peak_rss_mb()  # Python, numpy and tinygrad: importing this package (tg_llama.api) imported them
  start = time.perf_counter()
  model = load_ours(args, path, max_context=P + G)
  load_s = time.perf_counter() - start
  vocab = model.config.vocab_size
  ttft_cold, _ = timed_generate(model.generate, synthetic_prompt(P, vocab, 0), G)
  # greedy, with the chat's sampling and under a JSON schema, a run of each in turn: their ratios not skewed by a machine
  # that gets slower or faster over the minute (measured: greedy alone 104 tokens/s, then 98 and 93 a minute later)
  from tg_llama.cli import build_parser, sampling_from
  sampling = sampling_from(build_parser().parse_args(["chat"]))
  ways = {"greedy": model.generate, "sampled": lambda prompt, n: model.generate(prompt, n, sampling)}
  if has_tokenizer(model): ways["constrained"] = lambda prompt, n: model.generate(prompt, n, json_schema=BENCH_SCHEMA)
  first = {}
  for way, generate in ways.items():  # untimed: captures; the model's peak memory before the JSON matcher's tables exist
    if way == "constrained": model_peak = peak_rss_mb()
    first[way] = list(generate(synthetic_prompt(P, vocab, args.runs + 1), G))
  timed = {way: [] for way in ways}
  for run in range(1, args.runs + 1):
    for way, generate in ways.items(): timed[way].append(timed_generate(generate, synthetic_prompt(P, vocab, run), G))
  median = lambda way, i: statistics.median(t[i] for t in timed[way])
  ttft_warm, decode = median("greedy", 0), median("greedy", 1)
  sampled = {"sampled_decode_tok_s": median("sampled", 1), "sampling": {k: getattr(sampling, k) for k in ("temperature", "top_p", "repetition_penalty")}}
  constrained = {"constrained_decode_tok_s": median("constrained", 1), "matcher_us_per_token": matcher_us(model, first["constrained"]),
                 "constrained_peak_rss_mb": peak_rss_mb()} if "constrained" in ways else {}
  nbytes = bytes_per_token(model, P + G / 2)
  dtype = {"float": "float32", "half": "float16", "__bf16": "bfloat16"}.get(model.dtype.name, model.dtype.name)
  kernels = "tinygrad's heuristic"
  if model.backend.name == "cpu":  # tg_llama.cpu is imported only on the CPU backend
    from tg_llama.cpu import tune, vectors
    kernels = f"{tune.describe()}; {vectors.describe()}"
  return {"name": "tg-llama", "device": model.device, "dtype": dtype, "quantize": model.quantization["mode"], "kernel_choices": kernels,
          "load_s": load_s, "ttft_cold_s": ttft_cold, "ttft_warm_s": ttft_warm, "prefill_tok_s": P / ttft_warm,
          "decode_tok_s": decode, "decode_tok_s_runs": [d for _, d in timed["greedy"]], **memory_bound(model, path, runtime_mb, model_peak if "constrained" in ways else peak_rss_mb()), "vocab_size": vocab,
          "bytes_per_token": nbytes, "achieved_gb_s": nbytes * decode / 1e9, **sampled, **constrained}

# objects in an array that must hold more than any run generates: structure and strings, never complete
BENCH_SCHEMA = {"type": "array", "minItems": 1000, "items": {"type": "object", "properties": {
  "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
  "required": ["name", "age", "tags"]}}

def has_tokenizer(model) -> bool:
  from tg_llama.errors import CheckpointError
  try: model.tokenizer
  except CheckpointError: return False
  return True

def matcher_us(model, tokens: list[int]) -> float:
  """BENCH_SCHEMA's matcher's microseconds per token (mask and advance) over these tokens."""
  from tg_llama import constraint
  matcher, row = constraint.compile(model.tokenizer, json_schema=BENCH_SCHEMA).matcher(), np.zeros(constraint.words(model.config.vocab_size), dtype=np.int32)
  start = time.perf_counter()
  for t in tokens:
    matcher.fill(row)
    matcher.consume(t)
  return (time.perf_counter() - start) / len(tokens) * 1e6

def bench_transformers(args, path: pathlib.Path, vocab: int) -> dict:
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError:
    return {"name": "transformers", "skipped": "not installed: pip install torch==2.13.0 transformers accelerate gguf"}
  torch.set_num_threads(2)
  start = time.perf_counter()
  if path.is_file(): hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
  elif (path / "config.json").is_file(): hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
  else: return {"name": "transformers", "skipped": f"{path} is neither a GGUF file nor an HF directory"}
  hf.eval()
  load_s = time.perf_counter() - start

  def generate(prompt, n):
    with torch.no_grad():
      out = hf(torch.tensor([prompt]), use_cache=True)
      for i in range(n):
        token = out.logits[0, -1].argmax().view(1, 1)
        yield int(token)
        if i < n - 1: out = hf(token, past_key_values=out.past_key_values, use_cache=True)
  return _peer_runs("transformers", generate, args, vocab, load_s)

def bench_llama_cpp(args, path: pathlib.Path, vocab: int) -> dict:
  try: import llama_cpp
  except ImportError: return {"name": "llama.cpp", "skipped": f"llama_cpp is not installed: {LLAMA_CPP_INSTALL}"}
  if not path.is_file(): return {"name": "llama.cpp", "skipped": f"llama.cpp runs GGUF files; {path} is a directory"}
  start = time.perf_counter()
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.prompt_tokens + args.gen_tokens + 8, n_batch=args.prompt_tokens,
                        n_threads=args.cpu_threads, verbose=False)
  load_s = time.perf_counter() - start
  ctx = llm._ctx.ctx  # the raw llama_context, for the C API below

  def generate(prompt, n):
    llm.reset()
    tokens = prompt
    for i in range(n):
      llm.eval(tokens)
      llama_cpp.llama_synchronize(ctx)  # decoding is asynchronous: without this the clock stops early
      logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(llm.n_vocab(),))
      token = int(logits.argmax())
      yield token
      tokens = [token]
  return _peer_runs("llama.cpp", generate, args, vocab, load_s)

PEERS = {"transformers": bench_transformers, "llama.cpp": bench_llama_cpp}  # what --compare may name

def _peer_process(bench, args, path: pathlib.Path, vocab: int, send):
  result = bench(args, path, vocab)
  if "skipped" not in result: result["peak_rss_mb"] = peak_rss_mb()
  send.send(result)

def run_peer(name: str, bench, args, path: pathlib.Path, vocab: int) -> dict:
  """`bench(args, path, vocab)` (a peer's bench function) in a spawned process: its result, with its process's peak RSS; or,
  where it dies, a skipped entry that says of what."""
  context = multiprocessing.get_context("spawn")  # not fork: the parent holds tinygrad's threads and compile pool
  receive, send = context.Pipe(duplex=False)
  process = context.Process(target=_peer_process, args=(bench, args, path, vocab, send))
  process.start()
  send.close()  # our copy: the child's end closes with it, so recv() ends with EOFError when it dies
  try: result = receive.recv()
  except EOFError: result = None
  process.join()
  if result is not None: return result
  code = process.exitcode
  why = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with status {code}"
  if code == -signal.SIGILL:
    why += (" (an illegal instruction: it was built for another CPU; build it on this one, `pip install --no-binary "
            f"llama-cpp-python llama-cpp-python`, or on a CPU reporting AMX: {LLAMA_CPP_INSTALL})") if name == "llama.cpp" else \
           " (an illegal instruction: it was built for another CPU)"
  return {"name": name, "skipped": f"crashed, {why}"}

def _peer_runs(name: str, generate, args, vocab: int, load_s: float) -> dict:
  P, G = args.prompt_tokens, args.gen_tokens
  ttft_cold, _ = timed_generate(generate, synthetic_prompt(P, vocab, 0), G)
  timed = [timed_generate(generate, synthetic_prompt(P, vocab, run), G) for run in range(1, args.runs + 1)]
  ttft_warm, decode = statistics.median(t for t, _ in timed), statistics.median(d for _, d in timed)
  return {"name": name, "load_s": load_s, "ttft_cold_s": ttft_cold, "ttft_warm_s": ttft_warm, "prefill_tok_s": P / ttft_warm,
          "decode_tok_s": decode, "decode_tok_s_runs": [d for _, d in timed]}

def table(result: dict) -> str:
  ours, copy = result["ours"], result["machine_copy_gb_s"]
  rows = [("", "prefill tok/s", "decode tok/s", "ttft cold s", "ttft warm s", "peak RSS MB", "decode GB/s")]
  rows.append((f"tg-llama {ours['device']} {ours['dtype']} quantize={ours['quantize']}", f"{ours['prefill_tok_s']:.1f}",
               f"{ours['decode_tok_s']:.1f}", f"{ours['ttft_cold_s']:.2f}", f"{ours['ttft_warm_s']:.2f}", f"{ours['peak_rss_mb']:.0f}",
               f"{ours['achieved_gb_s']:.2f} ({100 * ours['achieved_gb_s'] / copy:.0f}% of {copy:.1f})"))
  notes = [f"kernel choices: {ours['kernel_choices']}"]
  for peer in result["compare"]:
    if "skipped" in peer:
      notes.append(f"{peer['name']}: {peer['skipped']}")
      continue
    rows.append((f"{peer['name']} (x ours)", f"{peer['prefill_tok_s']:.1f} (x{peer['prefill_tok_s'] / ours['prefill_tok_s']:.2f})",
                 f"{peer['decode_tok_s']:.1f} (x{peer['decode_tok_s'] / ours['decode_tok_s']:.2f})",
                 f"{peer['ttft_cold_s']:.2f}", f"{peer['ttft_warm_s']:.2f}", f"{peer['peak_rss_mb']:.0f}", "-"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  head = (f"{result['model']}: {result['prompt_tokens']}-token prompt, {result['gen_tokens']} new tokens, median of {result['runs']} runs; "
          f"load {ours['load_s']:.1f} s; {ours['bytes_per_token'] / 1e6:.0f} MB read per decoded token; "
          f"numpy copy {copy:.1f} GB/s (read + write)")
  knobs = ", ".join(f"{k} {v}" for k, v in ours["sampling"].items())
  notes.append(f"tg-llama with the chat's sampling ({knobs}): {ours['sampled_decode_tok_s']:.1f} decode tok/s "
               f"({100 * ours['sampled_decode_tok_s'] / ours['decode_tok_s']:.0f}% of greedy, their runs taken in turn)")
  notes.append(f"peak RSS {ours['peak_rss_mb']:.0f} MB {'within' if ours['rss_within_bound'] else 'OVER'} the bound of "
               f"{ours['rss_bound_mb']:.0f} MB = {RSS_SLACK} x (checkpoint {ours['checkpoint_mb']:.0f} MB + KV cache {ours['kv_cache_mb']:.0f} MB); "
               f"{ours['peak_rss_mb'] - ours['runtime_rss_mb']:.0f} MB over the {ours['runtime_rss_mb']:.0f} MB the process held before the model "
               f"loaded (Python, numpy, tinygrad)")
  if "constrained_decode_tok_s" in ours: notes.append(f"tg-llama under a JSON schema: {ours['constrained_decode_tok_s']:.1f} decode tok/s "
               f"({100 * ours['constrained_decode_tok_s'] / ours['decode_tok_s']:.0f}% of unconstrained), "
               f"matcher {ours['matcher_us_per_token']:.0f} us/token (mask + advance); peak RSS {ours['constrained_peak_rss_mb']:.0f} MB "
               f"with its tables for the {ours['vocab_size']:,}-token vocabulary (llguidance's)")
  return "\n".join([head, *lines, *notes, "each peer runs in a process of its own (its peak RSS: its process's); speeds vary by 30% between runs"])

def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.synthetic:  # then run as on --model
    from tg_llama import synthetic
    args.model = str(synthetic.cached_file(args.synthetic, context=args.prompt_tokens + args.gen_tokens))
  if args.concurrency:
    from tg_llama import bench_serve
    return bench_serve.main(args, args.concurrency)
  if args.stages:
    from tg_llama import bench_cluster
    return bench_cluster.main(args)
  from tg_llama.assets import default_model_path
  path = pathlib.Path(args.model).expanduser() if args.model else default_model_path()
  ours = bench_ours(args, path)
  from tinygrad.helpers import NUM_CPU_THREADS
  args.cpu_threads = NUM_CPU_THREADS.value  # a peer computes on as many threads as our CPU runner (llama.cpp's default: 4)
  copy = machine_copy_gb_s()  # after ours: its arrays would otherwise be in our peak RSS
  result = {"model": str(path), "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "runs": args.runs,
            "machine_copy_gb_s": copy, "bandwidth_pct": 100 * ours["achieved_gb_s"] / copy, "ours": ours, "compare": []}
  for peer in dict.fromkeys(args.compare):
    result["compare"].append(run_peer(peer, PEERS[peer], args, path, ours["vocab_size"]))
  print(json.dumps(result, indent=2) if args.json else table(result))
  return 0
