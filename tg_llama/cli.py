"""The `tg-llama` command: chat, generate, serve, convert, bench, tune, cache. Errors print one line, never a traceback."""
from __future__ import annotations
import argparse, pathlib, sys, threading, time
from tg_llama.errors import InvalidArgumentError, TgLlamaError

def add_model_args(p: argparse.ArgumentParser):
  p.add_argument("--model", help="a GGUF file, an HF or Meta checkpoint directory, a converted directory, or an HF repo id "
                                 "(default: the bundled SmolLM2-135M-Instruct)")
  p.add_argument("--backend", help="cpu, opencl, cuda, nv, amd, metal (default: $TG_LLAMA_BACKEND, else tinygrad's $DEV, else the best found)")
  p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default: the backend's)")
  p.add_argument("--max-context", type=int, default=None, help="KV cache size in tokens (default: the model's, at most 4096)")
  p.add_argument("--quantize", choices=["none", "int8", "int4", "gguf"], default=None,
                 help="weight-only quantization (default: gguf for a GGUF file with Q8_0/Q4_x blocks: kept as stored, "
                      "decoded in the matmul; else none)")
  p.add_argument("--devices", type=int, default=1, help="split the model tensor-parallel over this many devices of the backend (default 1)")
  g = p.add_argument_group("pipeline of layer shards on a Ray cluster (needs tg-llama[cluster])")
  g.add_argument("--stages", type=int, default=None, help="run the model as this many stages of layers, split by each node's memory")
  g.add_argument("--layers", default=None, help="the stages' layers by hand, e.g. 0:10,10:30 (layers 0-9, then 10-29)")
  g.add_argument("--cluster", metavar="ADDRESS", default=None, help="the Ray cluster to run the stages on, as `ray start --head` "
                                                                  "prints it (default: a local Ray instance started for this run)")
  g.add_argument("--nodes", default=None, help="each stage's node, comma-separated: a Ray node id, node name or IP (default: round "
                                               "the nodes, the largest memory first)")
  g.add_argument("--stage-backends", default=None, help="each stage's backend, comma-separated, e.g. cpu,opencl (default: --backend, "
                                                        "else each node's own)")
  g.add_argument("--stage-dtypes", default=None, help="each stage's compute dtype, comma-separated, e.g. float32,float16 (default: "
                                                      "--dtype, else each backend's own)")

def add_sampling_args(p: argparse.ArgumentParser, temperature: float):
  g = p.add_argument_group("sampling")
  g.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
  g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
  g.add_argument("--top-p", type=float, default=0.9 if temperature else 1.0, help="nucleus sampling: keep the smallest set with this probability")
  g.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least this fraction as likely as the best")
  g.add_argument("--repetition-penalty", type=float, default=1.05 if temperature else 1.0, help="divide the logits of tokens already seen (1: off)")
  g.add_argument("--seed", type=int, default=None, help="same seed, same text")
  g.add_argument("--max-new-tokens", type=int, default=512, help="the longest answer, in tokens")

def sampling_from(args):
  from tg_llama.sampling import SamplingParams
  try: return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty, seed=args.seed)
  except InvalidArgumentError as e:  # "top_p must be ..." -> "--top-p must be ..."
    name, _, rest = str(e).partition(" ")
    raise InvalidArgumentError(f"--{name.replace('_', '-')} {rest}") from None

def check_args(args):
  """Refuse options out of range before anything is read or loaded (api.load checks the dtype and the memory the
  context needs, from the config alone)."""
  sampling_from(args)
  for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--max-context", args.max_context, 1), ("--devices", args.devices, 1),
                           ("--stages", args.stages, 1)):
    if value is not None and value < low: raise InvalidArgumentError(f"{flag} must be >= {low}, but is {value}")
  check_stage_args(args)

def staged(args) -> bool: return args.stages is not None or args.layers is not None or args.cluster is not None

def check_stage_args(args):
  for flag, value in (("--nodes", args.nodes), ("--stage-backends", args.stage_backends), ("--stage-dtypes", args.stage_dtypes)):
    if value is not None and not staged(args): raise InvalidArgumentError(f"{flag} places or sets up stages: give --stages or --layers too")

def load_model(args, slots: int = 1):
  from tg_llama.assets import resolve_model
  path = resolve_model(args.model)
  start = time.perf_counter()
  if staged(args):
    if args.devices != 1: raise InvalidArgumentError("--devices splits one process's model; with --stages each stage runs on one device")
    from tg_llama.cluster import load
    split = lambda v: [x.strip() for x in v.split(",")] if v else None
    model = load(args.model, stages=args.stages if args.stages is not None or args.layers else 1, layers=args.layers, nodes=split(args.nodes),
                 backends=split(args.stage_backends), address=args.cluster, backend=args.backend, dtype=args.dtype, dtypes=split(args.stage_dtypes),
                 max_context=args.max_context, slots=slots, quantize=args.quantize, progress=True)
  else:
    from tg_llama.api import load
    model = load(path, backend=args.backend, dtype=args.dtype, max_context=args.max_context, progress=True, devices=args.devices,
                 quantize=args.quantize, slots=slots)
  print(f"loaded {path.name} on {model.device} ({model.dtype.name}{f', {slots} slots' if slots > 1 else ''}) in "
        f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
  return model

COMPILING = "compiling kernels (fast after the first run on this backend)..."

def warm_up(model, sampling=None, quiet: bool = False):
  """Compile and capture what a first request runs, now, so that it is not slow (kernels and captured graphs are cached on
  disk afterwards): a short prompt's prefill and decode, or with `sampling` (the chat's) what a chat's first turn runs."""
  start = time.perf_counter()
  if not quiet: print(COMPILING, end="", file=sys.stderr, flush=True)
  if sampling is not None and model.max_context > 48:
    # a chat's first turn (system message and question: 20-60 tokens) runs a half prefill chunk, a step of 8 rows (its
    # last tokens, and then the sample of its first token) and steps of 1: captured here where they are not loaded, rather
    # than after the question, where a first answer after an install or an upgrade stalled 30-40 s without a word; else
    # set up by this run. A later turn's last rows run in the step of 8 (the runner's rows_capture, set here), so nothing
    # else is needed: with nothing cached, without the greedy 2-token runs below, the chat's warm-up 82.7 / 88.7 -> 71.1 /
    # 80.6 s (AMD EPYC, 2 cores, the two versions in turn)
    model.runner.rows_capture = True
    list(model.generate([(2 + i) % model.config.vocab_size for i in range(40)], 2, sampling))
  else:
    # a 2-token prompt runs as steps of 1 row (the runner's step_rows), as a short prompt and its answer do. A graph is
    # captured at its first call and set up at its first replay (a second run); one loaded from disk replays at once, and
    # one run sets it up. Each run's prompt starts with another token, a new prefix. Other batch sizes and the prefill
    # chunks are set up when a request first needs them (setting them all up here would slow every start)
    loaded = model.graphs.load() if model.graphs is not None else getattr(model.runner, "graphs_loaded", lambda: ())()
    runs = 1 if {"decode1", "greedy1"} <= set(loaded) else 2
    for i in range(runs): list(model.generate([i % model.config.vocab_size] * 2, 3))
  if not quiet: print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)

def warm_up_while_typing(model, sampling):
  """warm_up in a thread while a person types the first message (after an install it takes about a minute on 2 cores);
  the returned function waits for it, saying so when it is still running. The model is used by one thread at a time: the
  chat calls the function before each answer. An Event, not Thread.join: a join that Ctrl-C interrupts can leave
  is_alive() False while the thread runs (Python before 3.13)."""
  start, done = time.perf_counter(), threading.Event()
  def run():
    try: warm_up(model, sampling, quiet=True)
    except Exception: pass  # the answer meets the same failure, and reports it as answers do
    finally: done.set()
  threading.Thread(target=run, name="tg-llama-warm-up", daemon=True).start()
  def wait():
    if not done.is_set():
      print(COMPILING, end="", file=sys.stderr, flush=True)
      done.wait()
      print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
  return wait

def warm_up_batches(model, slots: int):
  """Capture what a server also runs: sampled decoding, and every batch size up to `slots` sequences at once. A prompt's rows
  take only the steps that are ready or that generating needs (the runner's step_rows): the prompts enter one or two rows a
  step while the first ones generate, so each request generates long enough (2 tokens a slot) for all of them to generate
  at once."""
  from tg_llama.engine.engine import Request
  from tg_llama.sampling import SamplingParams
  handles = [model.engine.submit(Request((model.config.bos_id or 0,) * 2, 2 * slots + 2, SamplingParams(temperature=1.0, seed=i)))
             for i in range(slots)]
  for h in handles: list(h)

def cmd_chat(args) -> int:
  check_args(args)
  from tg_llama.chat import ChatSession, run_chat
  model = load_model(args)
  session = ChatSession(model, system=args.system, sampling=sampling_from(args), max_new_tokens=args.max_new_tokens)
  if sys.stdin.isatty(): return run_chat(model, session, show_stats=args.stats, ready=warm_up_while_typing(model, session.sampling))
  warm_up(model, session.sampling)
  return run_chat(model, session, show_stats=args.stats)

def read_constraint(args) -> dict:
  """--json-schema / --grammar: the file's text, read before the model loads (the tokenizer compiles it later)."""
  given = {k: v for k, v in (("json_schema", args.json_schema), ("grammar", args.grammar)) if v is not None}
  if len(given) > 1: raise InvalidArgumentError("give --json-schema or --grammar, not both")
  for k, path in given.items():
    try: given[k] = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e: raise InvalidArgumentError(f"--{k.replace('_', '-')} {path}: {getattr(e, 'strerror', None) or e}") from None
  return given

def cmd_generate(args) -> int:
  check_args(args)
  rule = read_constraint(args)
  model = load_model(args)
  tok = model.tokenizer
  if args.chat:
    from tg_llama.chat_template import encode_chat
    ids = encode_chat(tok, [{"role": "user", "content": args.prompt}])
  else: ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(args.prompt)
  start, n = time.perf_counter(), 0
  if not args.chat and not rule: sys.stdout.write(args.prompt)  # constrained output alone, for a parser to read
  for chunk in model.stream(ids, args.max_new_tokens, sampling_from(args), None if args.chat else frozenset({tok.eos_id} - {None}), **rule):
    n += 1
    sys.stdout.write(chunk.text)
    sys.stdout.flush()
  sys.stdout.write("\n")
  if args.stats: print(f"[{n} tokens in {time.perf_counter() - start:.2f} s]", file=sys.stderr)
  return 0

def cmd_serve(args) -> int:
  import os
  for flag, value, low in (("--max-context", args.max_context, 1), ("--devices", args.devices, 1), ("--slots", args.slots, 1), ("--stages", args.stages, 1),
                           ("--port", args.port, 0), ("--max-waiting", args.max_waiting, 0)):
    if value is not None and value < low: raise InvalidArgumentError(f"{flag} must be >= {low}, but is {value}")
  check_stage_args(args)
  try: from tg_llama.serve.server import run
  except ImportError as e:
    raise TgLlamaError(f"tg-llama serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'tg-llama[serve]'") from None
  model = load_model(args, args.slots)
  model.engine.max_waiting = args.max_waiting
  warm_up(model)
  warm_up_batches(model, args.slots)
  if model.backend is not None and model.backend.name == "cpu":  # batches' speed depends on them most (tg_llama/cpu/tune.py)
    from tg_llama.cpu import tune, vectors
    print(f"CPU kernel choices: {tune.describe()}; {vectors.describe()}", file=sys.stderr)
  path = model.checkpoint.path
  model_id = args.model_id or (path.stem if path.is_file() else path.name)
  return run(model, args.host, args.port, model_id, args.api_key or os.environ.get("TG_LLAMA_API_KEY") or None)

def cmd_convert(args) -> int:
  from tinygrad import dtypes
  from tg_llama.convert import convert_checkpoint
  done = [0]
  def progress(name):
    done[0] += 1
    print(f"\rwrote {done[0]} tensors ({name})".ljust(80), end="", file=sys.stderr, flush=True)
  out = convert_checkpoint(args.src, args.dst, dtype={"float32": dtypes.float32, "float16": dtypes.float16, "bfloat16": dtypes.bfloat16}[args.dtype],
                           on_tensor=progress, force=args.force)
  print(f"\nconverted {args.src} -> {out}", file=sys.stderr)
  return 0

def cmd_tune(args) -> int:
  from tg_llama.assets import resolve_model
  from tg_llama.backend import cache_folder
  from tg_llama.cpu import tune
  if (folder := cache_folder("cpu")) is None:
    raise TgLlamaError("the CPU backend's cache folder is not yours alone, so no tuned table can be kept there (see the warning)")
  if not args.force and (old := tune.this_machines(tune.read_tables(folder))) is not None and old.entries:  # not the probe's alone
    print(tune.summary(old))
    print(f"{tune.describe(folder)}; `tg-llama tune --force` searches again", file=sys.stderr)
    return 0
  path, start = resolve_model(args.model), time.perf_counter()
  table = tune.tune(path, lambda line: print(line, file=sys.stderr, flush=True), quantize=args.quantize)
  written = tune.write(table, folder)
  print(tune.summary(table))
  print(f"tuned in {time.perf_counter() - start:.0f} s: {tune.describe(folder)}; wrote {written}", file=sys.stderr)
  return 0

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="tg-llama", description="Llama-family models on any tinygrad backend.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("chat", help="multi-turn streaming chat (default model: SmolLM2-135M-Instruct)",
                     description="Chat in the terminal. /reset clears the history, /exit or end of input quits, Ctrl-C stops an answer. "
                                 "Reads stdin, so it can be scripted: echo 'What is 2+2?' | tg-llama chat")
  add_model_args(p); add_sampling_args(p, temperature=0.2)
  p.add_argument("--system", default=None, help="a system prompt (default: the template's own, if any)")
  p.add_argument("--stats", action="store_true", help="print tokens/s after each answer")
  p.set_defaults(func=cmd_chat)
  p = sub.add_parser("generate", help="one raw completion of --prompt, printed (for scripts)")
  add_model_args(p); add_sampling_args(p, temperature=0.0)
  p.add_argument("--prompt", required=True, help="the text to continue")
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template and answer it")
  p.add_argument("--stats", action="store_true", help="print the token count and time")
  p.add_argument("--json-schema", metavar="FILE", help="answer only JSON that matches this JSON schema (printed without the prompt)")
  p.add_argument("--grammar", metavar="FILE", help="answer only text of this grammar: Lark (llguidance's, from `start:`) or "
                                                   "llama.cpp's GBNF (from `root ::=`)")
  p.set_defaults(func=cmd_generate)
  p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a chat page (needs tg-llama[serve])",
                     description="Serve the model over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models), "
                                 "with /health and a chat page at /. SIGTERM or Ctrl-C ends open streams and exits.")
  add_model_args(p)
  p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
  p.add_argument("--port", type=int, default=8000, help="default 8000")
  p.add_argument("--slots", type=int, default=4, help="sequences generated at once, a KV cache slot each (default 4)")
  p.add_argument("--max-waiting", type=int, default=64, help="requests queued for a slot before new ones get 503 (default 64)")
  p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes (default: $TG_LLAMA_API_KEY, else none)")
  p.add_argument("--model-id", default=None, help="the model's name in the API (default: the model file's or folder's name)")
  p.set_defaults(func=cmd_serve)
  p = sub.add_parser("convert", help="write any checkpoint as an HF-layout directory (config.json + model.safetensors)")
  p.add_argument("src", help="a GGUF file, an HF or Meta checkpoint directory")
  p.add_argument("dst", help="the directory to write (written beside it first, moved into place when complete)")
  p.add_argument("--force", action="store_true", help="replace a non-empty dst (never one that overlaps src)")
  p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16", help="the stored dtype (default float16)")
  p.set_defaults(func=cmd_convert)
  p = sub.add_parser("bench", help="prefill/decode speed, time to first token, memory, bandwidth (see tg-llama bench --help)", add_help=False)
  p.set_defaults(func=None)
  p = sub.add_parser("tune", help="search the CPU backend's kernel choices on this machine (a few minutes, once)",
                     description="Time a few tilings of each kernel kind the CPU backend chooses itself (matrix products, attention) "
                                 "for a model, and keep the fastest in the cache for this CPU and tinygrad version; models loaded on "
                                 "the CPU use them from then on (the defaults without it). Prints a table of what it chose.")
  p.add_argument("--model", help="the model whose kernels to tune (default: the bundled SmolLM2-135M-Instruct)")
  p.add_argument("--quantize", choices=["none", "int8", "int4", "gguf"], default=None, help="as the model will be run (default: as for chat)")
  p.add_argument("--force", action="store_true", help="search again though this machine has a table")
  p.set_defaults(func=cmd_tune)
  p = sub.add_parser("cache", help="show or clear the per-backend kernel caches")
  p.add_argument("--clear", action="store_true", help="delete them (only the files tg-llama wrote)")
  p.add_argument("--backend", default=None, help="only this backend's")
  p.set_defaults(func=cmd_cache)
  return parser

def cmd_cache(args) -> int:
  from tg_llama import cache
  if args.clear:
    for path in cache.clear_caches(args.backend): print(f"removed {path}" if not path.exists() else f"cleared {path} (kept what tg-llama did not write there)")
  else: print(cache.show_caches())
  return 0

def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "bench":
    from tg_llama.bench import main as bench_main
    return run_guarded(lambda: bench_main(argv[1:]))
  args = build_parser().parse_args(argv)
  return run_guarded(lambda: args.func(args))

def run_guarded(fn) -> int:
  try: return fn() or 0
  except TgLlamaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except FileNotFoundError as e:
    if e.filename == "clang" or "clang" in str(e):
      print("error: the CPU backend compiles kernels with clang, which is not installed: apt-get install -y clang", file=sys.stderr)
      return 1
    raise
  except KeyboardInterrupt:
    print("", file=sys.stderr)
    return 130

if __name__ == "__main__": sys.exit(main())
