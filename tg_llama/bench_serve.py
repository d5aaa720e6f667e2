"""`tg-llama bench --concurrency 1,4,8`: many streams at once through the OpenAI-compatible server, as apps use it.

Starts `tg-llama serve` on a free port of 127.0.0.1 (slots = the largest concurrency), then at each concurrency C runs
`rounds` x C streaming completions with C in flight at a time, through the official async `openai` client. Each request
asks for `gen_tokens` tokens after a prompt of about `prompt_tokens` tokens (distinct per request, so no prefix is
reused). Reported per concurrency:
  aggregate   generated tokens/s of all streams over the wall time (prefills included)
  decode      streams x tokens/s of one stream between its tokens (C / median time between tokens): the batched decode
              step's rate, which the prefills of joining requests interrupt (their stalls show in the p95 gap)
  per stream  the median stream's tokens/s over its gaps, time to first token and time between tokens (p50, p95 over
              every request and every gap)
Then the next turn of a chat: time to first token of a conversation's second message (history plus a new message, whose
history the server still holds), next to the same new message sent alone; the median of 3 conversations.

Not here: the single-stream kernels' speed (`tg-llama bench` without --concurrency), sampling other than greedy."""
from __future__ import annotations
import asyncio, json, os, socket, statistics, subprocess, sys, time, urllib.request

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]

def start_server(args, slots: int, context: int) -> tuple[subprocess.Popen, str]:
  port = free_port()
  cmd = [sys.executable, "-m", "tg_llama.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--slots", str(slots),
         "--max-context", str(context)]
  for flag in ("model", "backend", "dtype", "quantize"):
    if getattr(args, flag): cmd += [f"--{flag}", str(getattr(args, flag))]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
  while time.monotonic() < deadline:
    if proc.poll() is not None: raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
    try:
      with urllib.request.urlopen(f"{url}/health", timeout=2): return proc, url
    except OSError: time.sleep(0.5)
  proc.kill()
  raise RuntimeError("the server did not come up within 10 minutes")

def percentile(xs: list[float], q: float) -> float:
  return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))

async def one_stream(client, model_id: str, prompt: str, gen_tokens: int) -> dict:
  start, times, tokens = time.perf_counter(), [], 0
  stream = await client.completions.create(model=model_id, prompt=prompt, max_tokens=gen_tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
  async for chunk in stream:
    if chunk.choices and chunk.choices[0].text: times.append(time.perf_counter())
    if chunk.usage is not None: tokens = chunk.usage.completion_tokens
  return {"ttft": times[0] - start if times else float("nan"), "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": tokens}

async def at_concurrency(client, model_id: str, c: int, rounds: int, prompt_words: int, gen_tokens: int, offset: int) -> dict:
  gate = asyncio.Semaphore(c)
  async def run(i: int):
    async with gate:  # a distinct first word per request: no request reuses another's prefix
      return await one_stream(client, model_id, f"Request {offset + i}. " + " ".join(["words"] * prompt_words), gen_tokens)
  start = time.perf_counter()
  results = await asyncio.gather(*(run(i) for i in range(rounds * c)))
  wall = time.perf_counter() - start
  tokens, gaps, ttfts = sum(r["tokens"] for r in results), [g for r in results for g in r["gaps"]], [r["ttft"] for r in results]
  return {"concurrency": c, "requests": len(results), "tokens": tokens, "wall_s": wall, "aggregate_tok_s": tokens / wall,
          "decode_tok_s": c / percentile(gaps, 50) if gaps else float("nan"),
          "per_stream_tok_s": statistics.median(len(r["gaps"]) / sum(r["gaps"]) for r in results if r["gaps"]),
          "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
          "tbt_p50_ms": 1e3 * percentile(gaps, 50), "tbt_p95_ms": 1e3 * percentile(gaps, 95)}

async def first_token(client, model_id: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int, int]:
  """Time to the first streamed token of a chat completion, its whole text, its prompt tokens and how many were reused."""
  start, ttft, text, prompt_tokens, cached = time.perf_counter(), float("nan"), [], 0, 0
  stream = await client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
  async for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
      if not text: ttft = time.perf_counter() - start
      text.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
      prompt_tokens, details = chunk.usage.prompt_tokens, chunk.usage.prompt_tokens_details
      cached = details.cached_tokens if details is not None and details.cached_tokens else 0
  return ttft, "".join(text), prompt_tokens, cached

async def chat_turns(client, model_id: str, prompt_words: int, gen_tokens: int) -> dict:
  history, alone, tokens, reused = [], [], [], []
  for i in range(3):
    first = [{"role": "user", "content": f"Conversation {i}. " + " ".join(["words"] * prompt_words)}]
    _, reply, _, _ = await first_token(client, model_id, first, gen_tokens)
    new = {"role": "user", "content": f"Thanks! Now say it again in short, number {i}."}
    ttft, _, n, cached = await first_token(client, model_id, [*first, {"role": "assistant", "content": reply}, new], 4)
    history.append(ttft)
    tokens.append(n)
    reused.append(cached)
    alone.append((await first_token(client, model_id, [new], 4))[0])
  h, a = statistics.median(history), statistics.median(alone)
  return {"history_tokens": statistics.median(tokens), "reused_tokens": statistics.median(reused), "ttft_history_s": h, "ttft_alone_s": a, "ratio": h / a}

def run(args, levels: list[int]) -> dict:
  try: import openai
  except ImportError: raise SystemExit("error: --concurrency talks to the server through the openai client: pip install 'tg-llama[serve]' openai")
  context = args.prompt_tokens + args.gen_tokens + 128  # and room for the chat template around the next-turn test
  proc, url = start_server(args, max(levels), context)
  try:
    async def main():
      client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=os.environ.get("TG_LLAMA_API_KEY", "none"), timeout=600)
      model_id = (await client.models.list()).data[0].id
      # warm-up: requests joining one after another at the highest concurrency run every batch size's graphs, twice (run,
      # then captured), so no graph is captured (or compiled) inside a timed run
      await at_concurrency(client, model_id, max(levels), 2, args.prompt_tokens, 2 * max(levels), 10**6)
      out = []
      for i, c in enumerate(levels): out.append(await at_concurrency(client, model_id, c, args.rounds, args.prompt_tokens, args.gen_tokens, 1000 * i))
      return model_id, out, await chat_turns(client, model_id, args.prompt_tokens, args.gen_tokens)
    model_id, levels_out, turns = asyncio.run(main())
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  return {"model": model_id, "prompt_words": args.prompt_tokens, "gen_tokens": args.gen_tokens, "rounds": args.rounds, "levels": levels_out,
          "chat_turns": turns}

def table(result: dict) -> str:
  rows = [("concurrency", "aggregate tok/s", "x one", "decode tok/s", "x one", "per-stream tok/s", "ttft p50 s", "ttft p95 s", "tbt p50 ms", "tbt p95 ms")]
  base = result["levels"][0]
  for r in result["levels"]:
    rows.append((str(r["concurrency"]), f"{r['aggregate_tok_s']:.1f}", f"{r['aggregate_tok_s'] / base['aggregate_tok_s']:.2f}",
                 f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}", f"{r['per_stream_tok_s']:.1f}",
                 f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p95_s']:.2f}", f"{r['tbt_p50_ms']:.1f}", f"{r['tbt_p95_ms']:.1f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  head = (f"{result['model']} through `tg-llama serve`: {result['rounds']} x C streaming completions at each concurrency C, "
          f"~{result['prompt_words']}-word prompts, up to {result['gen_tokens']} tokens each, greedy")
  t = result["chat_turns"]
  turns = (f"next chat turn: time to first token {t['ttft_history_s']:.2f} s for {t['history_tokens']:.0f} prompt tokens, "
           f"{t['reused_tokens']:.0f} of them reused from the slot; {t['ttft_alone_s']:.2f} s for the new message alone ({t['ratio']:.2f}x)")
  return "\n".join([head, *("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows), turns])

def main(args, levels: list[int]) -> int:
  result = run(args, levels)
  print(json.dumps(result, indent=2) if args.json else table(result))
  return 0
