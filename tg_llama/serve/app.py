"""The routes: /v1/chat/completions, /v1/completions, /v1/models, /health, and the chat page at /.

A handler checks the request (protocol.py), submits it to the engine, and turns the engine's outputs into text
(text.py) and JSON. The engine runs in its own thread; its outputs reach this event loop through `notify` and
`call_soon_threadsafe`. A response that ends early (a stop string, a client gone) cancels its request, which frees
its slot at the engine's next step."""
from __future__ import annotations
import asyncio, hmac, json, pathlib, threading, time
from contextlib import asynccontextmanager
from typing import AsyncIterator
from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from tg_llama.engine.engine import Engine, Output, Request
from tg_llama.errors import EngineBusyError, TgLlamaError
from tg_llama.serve.protocol import ApiError, Job, Shapes, api_error, bad, parse, usage
from tg_llama.serve.text import TextStream
from tg_llama.serve.tools import CallSplitter, parse_calls

SHUTTING_DOWN = "the server is shutting down"

class ClientGone(Exception): pass

class Outputs:
  """One request's outputs, carried from the engine thread into this event loop."""
  def __init__(self, engine: Engine, request: Request):
    loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
    def notify(out: Output):
      try: loop.call_soon_threadsafe(self.queue.put_nowait, out)
      except RuntimeError: pass  # the event loop is closed (the server stopped): nobody is left to read it
    self.handle = engine.submit(request, notify)

  async def next(self, http: HttpRequest | None = None) -> Output:
    """The next output; with `http`, raises ClientGone once its client has disconnected (checked twice a second)."""
    if http is None: return await self.queue.get()
    getter = asyncio.ensure_future(self.queue.get())
    while not (await asyncio.wait({getter}, timeout=0.5))[0]:
      if await http.is_disconnected():
        getter.cancel()
        raise ClientGone()
    return getter.result()

class Generation:
  """Outputs in, pieces of the answer out: (text, logprob entries, finish_reason); counts the tokens for the usage.
  With tools, the text from a <tool_call> on is held, and parsed into `calls` at the end (finish_reason "tool_calls")."""
  def __init__(self, job: Job, outputs: Outputs, tokenizer):
    self.job, self.outputs, self.text, self.tokens = job, outputs, TextStream(tokenizer, job.stops), 0
    self.splitter, self.calls = CallSplitter() if job.tools else None, None

  def _split(self, text: str, final: bool) -> tuple[str, bool]:
    """(the content to send, whether the answer turned out to be tool calls)"""
    if self.splitter is None: return text, False
    text = self.splitter.add(text)
    if not final: return text, False
    held, called = self.splitter.finish()
    self.calls = parse_calls(called, list(self.job.tools)) if called else None
    return text + held + ("" if self.calls or not called else called), self.calls is not None  # calls that do not parse are text

  async def pieces(self, first: Output, http: HttpRequest | None = None) -> AsyncIterator[tuple[str, list, str | None]]:
    out = first
    while True:
      if out.error is not None: raise out.error
      text, entries, finish = "", [], out.finish_reason
      if out.token is not None:
        self.tokens += 1
        if out.token in self.job.request.stop_ids: finish = "stop"  # the stop token ends the answer; it is not text
        else:
          text = self.text.add(out.token)
          entries = [(out.token, out.logprob, out.top_logprobs)] if self.job.logprobs else []
          if self.text.stopped: finish = "stop"
      if finish is not None:
        text, called = self._split(text + self.text.finish(), final=True)
        yield text, entries, "tool_calls" if called else finish
        return
      text, _ = self._split(text, final=False)
      if text or entries: yield text, entries, None
      out = await self.outputs.next(http)

def create_app(model, model_id: str, api_key: str | None = None) -> FastAPI:
  """The app serving `model` (a tg_llama.api.Model) as `model_id`; with api_key, /v1 routes need `Authorization: Bearer <key>`."""
  engine, tokenizer = model.engine, model.tokenizer
  page = (pathlib.Path(__file__).parent / "page.html").read_text().replace("__MODEL_ID__", json.dumps(model_id).replace("<", "\\u003c"))
  page = page.replace("__NEEDS_KEY__", json.dumps(api_key is not None))

  @asynccontextmanager
  async def lifespan(app: FastAPI):
    engine.start()
    yield
    shut_down(app)

  app = FastAPI(title="tg-llama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
  app.state.closing, app.state.engine = False, engine

  @app.exception_handler(ApiError)
  async def on_api_error(_, e: ApiError): return JSONResponse(e.body(), e.status, headers=e.headers)

  @app.exception_handler(HTTPException)
  async def on_http_error(_, e: HTTPException):  # unknown routes and methods, in OpenAI's shape too
    return JSONResponse(ApiError(e.status_code, str(e.detail), type="invalid_request_error").body(), e.status_code, headers=e.headers)

  def check_key(http: HttpRequest):
    if api_key is None: return
    scheme, _, given = http.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
      raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>", type="invalid_request_error", code="invalid_api_key")

  @app.get("/", response_class=HTMLResponse)
  async def chat_page(): return page

  @app.get("/health")
  async def health():
    return JSONResponse({"status": "shutting down" if app.state.closing else "ok", **engine.stats()}, 503 if app.state.closing else 200)

  @app.get("/v1/models", dependencies=[Depends(check_key)])
  async def models():
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "tg-llama",
                                        "max_model_len": model.max_context}]}

  async def complete(http: HttpRequest, chat: bool):
    try: body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e: raise bad(f"the request body is not valid JSON: {e}") from None
    job = await run_in_threadpool(parse, body, chat, tokenizer, model_id, model.max_context)  # templates and tokenizing take a while
    if app.state.closing: raise api_error(EngineBusyError(SHUTTING_DOWN))
    try: outputs = Outputs(engine, job.request)
    except TgLlamaError as e: raise api_error(e) from None
    shapes, gen, streaming = Shapes(job, model_id, tokenizer), Generation(job, outputs, tokenizer), False
    try:
      first = await outputs.next(http)  # before any byte is sent: an error now is a plain JSON response
      if first.error is not None: raise api_error(first.error)
      if job.stream:
        streaming = True  # the response's generator cancels the request from now on
        return StreamingResponse(stream(job, shapes, gen, first), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
      text, entries, finish = [], [], None
      async for piece, lp, finish in gen.pieces(first, http):
        text.append(piece)
        entries += lp
      return shapes.response("".join(text), entries, finish, usage(job, gen.tokens, outputs.handle.cached_tokens), gen.calls)
    except TgLlamaError as e: raise api_error(e) from None
    except ClientGone: return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    finally:
      if not streaming: outputs.handle.cancel()  # nothing if it finished; after a stop string, or a client gone, frees the slot

  async def stream(job: Job, shapes: Shapes, gen: Generation, first: Output) -> AsyncIterator[str]:
    try:
      if job.chat: yield _event(shapes.chunk("", [], None, role=True))
      async for text, entries, finish in gen.pieces(first):
        if gen.calls:  # the end of an answer with tool calls: its last text, the calls, then the finish_reason
          if text or entries: yield _event(shapes.chunk(text, entries, None))
          for chunk in shapes.call_chunks(gen.calls): yield _event(chunk)
          text, entries = "", []
        yield _event(shapes.chunk(text, entries, finish))
      if job.include_usage: yield _event(shapes.usage_chunk(usage(job, gen.tokens, gen.outputs.handle.cached_tokens)))
    except TgLlamaError as e: yield _event(api_error(e).body())  # after the first chunk, an error can only be an event
    finally: gen.outputs.handle.cancel()  # a client that went away (the generator is closed) frees its slot
    yield "data: [DONE]\n\n"

  @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
  async def chat_completions(http: HttpRequest): return await complete(http, chat=True)

  @app.post("/v1/completions", dependencies=[Depends(check_key)])
  async def completions(http: HttpRequest): return await complete(http, chat=False)

  return app

def _event(obj: dict) -> str: return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

def shut_down(app: FastAPI):
  """Stop admitting requests (they get 503), and end the open ones with an error (streams get an error event)."""
  if app.state.closing: return
  app.state.closing = True
  # not joined here: the engine may be inside a step (a first compile takes seconds), and the open streams need this
  # event loop to send their error events
  threading.Thread(target=app.state.engine.close, args=(EngineBusyError(SHUTTING_DOWN),), name="tg-llama-close", daemon=True).start()
