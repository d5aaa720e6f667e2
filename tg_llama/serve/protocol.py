"""OpenAI's shapes for /v1/chat/completions and /v1/completions: a request body checked field by field into a Job (what
the engine runs, and how to answer), the JSON that goes back, and errors as `{"error": {message, type, param, code}}`.

Unknown fields are ignored with a warning in the log, as vLLM does; fields we know but do not implement (n > 1, best_of, echo, suffix,
logit_bias, the legacy `functions`, audio) are refused with a 400 naming them, never ignored. Structured output:
`response_format` (json_object, json_schema) and `tools` with `tool_choice` (tg_llama/serve/tools.py), enforced token by
token (tg_llama/constraint.py). Extensions, as vLLM's: top_k, min_p, repetition_penalty, guided_json, guided_regex,
guided_choice, guided_grammar. Not here: several prompts or choices in one request, images."""
from __future__ import annotations
import json, logging, numbers, re, time, uuid
from dataclasses import dataclass
from tg_llama import constraint
from tg_llama.chat_template import encode_chat
from tg_llama.engine.engine import Request
from tg_llama.errors import ContextLengthError, EngineBusyError, InvalidArgumentError, TgLlamaError
from tg_llama.sampling import SamplingParams
from tg_llama.serve.tools import Tool, call_grammar, chat_messages, renders_tools
from tg_llama.tokenizer import Tokenizer

class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = "invalid_request_error",
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type, headers

  def body(self) -> dict: return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError: return ApiError(400, message, param, code)

def api_error(e: TgLlamaError) -> ApiError:
  """The HTTP error for an error of the engine."""
  if isinstance(e, ContextLengthError): return bad(str(e), "messages", "context_length_exceeded")
  if isinstance(e, InvalidArgumentError): return bad(str(e))
  if isinstance(e, EngineBusyError):
    return ApiError(503, f"the server is busy: {e}", type="server_error", code="overloaded", headers={"Retry-After": "1"})
  return ApiError(500, str(e), type="server_error")

# known fields this server does not implement, and the values that mean "not used" (null always does)
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logit_bias": ({},), "functions": ([],),
               "function_call": ("none",), "audio": (), "prediction": (), "modalities": (["text"],)}
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}

KNOWN = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
         "seed", "stop", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "stream", "stream_options", "user", "metadata",
         "store", "service_tier", "parallel_tool_calls", "response_format", "tools", "tool_choice", *GUIDED, *UNSUPPORTED}
log = logging.getLogger("tg_llama.serve")

@dataclass(frozen=True)
class Job:
  chat: bool               # /v1/chat/completions, else /v1/completions
  request: Request
  stops: tuple[str, ...]   # stop strings, never part of the answer
  stream: bool
  include_usage: bool      # a last chunk with the usage (streaming)
  logprobs: bool           # the response carries logprobs
  tools: tuple[Tool, ...] = ()  # tool calls are parsed from the answer (tool_choice other than "none")

# *** requests ***

def _get(body: dict, name: str, kinds: tuple[type, ...], what: str, default=None):
  if (v := body.get(name)) is None: return default
  if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
    raise bad(f"'{name}' must be {what}, not {type(v).__name__} {_short(v)}", name)
  return v

def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
  v = _get(body, name, (numbers.Real,), "a number", default)
  if not lo <= v <= hi: raise bad(f"'{name}' must be in [{lo}, {hi}], but is {v}", name)
  return float(v)

def _int(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
  v = _get(body, name, (int,), "an integer", default)
  if v is not None and not (lo <= v and (hi is None or v <= hi)):
    raise bad(f"'{name}' must be an integer in [{lo}, {'inf' if hi is None else hi}], but is {v}", name)
  return v

def _short(v) -> str: return s if len(s := repr(v)) <= 60 else s[:57] + "..."

def parse(body, chat: bool, tokenizer: Tokenizer, model_id: str, max_context: int) -> Job:
  """Check a request body (parsed JSON) and tokenize its prompt; raises ApiError."""
  if not isinstance(body, dict): raise bad(f"the request body must be a JSON object, not {type(body).__name__}")
  if "model" not in body: raise bad("'model' is required", "model")
  if (model := _get(body, "model", (str,), "a string")) != model_id:
    raise ApiError(404, f"the model {_short(model)} does not exist; this server serves {model_id!r}", "model", "model_not_found")
  if unknown := sorted(set(body) - KNOWN): log.warning("ignoring unknown fields of a request: %s", ", ".join(map(_short, unknown[:10])))
  for name, unused in UNSUPPORTED.items():
    if body.get(name) is not None and body[name] not in unused:
      raise bad(f"'{name}' is not supported by this server (got {_short(body[name])})", name)
  tools, choice = _tools(body) if chat else ((), "none")
  prompt, where = (_chat_prompt(body, tokenizer, tools if choice != "none" else ()), "messages") if chat else (_completion_prompt(body, tokenizer), "prompt")
  if len(prompt) >= max_context:
    raise bad(f"the prompt is {len(prompt)} tokens, and the model's context is {max_context}: no room for an answer", where,
              "context_length_exceeded")
  room = max_context - len(prompt)
  max_tokens = _int(body, "max_completion_tokens", None, 1) if chat else None
  max_tokens = max_tokens if max_tokens is not None else _int(body, "max_tokens", None, 1)
  if max_tokens is not None and max_tokens > room:
    raise bad(f"the prompt is {len(prompt)} tokens, and {max_tokens} more do not fit in the model's context of {max_context} "
              f"(at most {room})", "max_tokens", "context_length_exceeded")
  stop = body.get("stop")
  stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else () if stop is None else None
  if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
    raise bad(f"'stop' must be a non-empty string or a list of at most 16 of them, not {_short(stop)}", "stop")
  if chat:
    want = _get(body, "logprobs", (bool,), "a boolean", False)
    k = _int(body, "top_logprobs", None, 0, 20)
    if k is not None and not want: raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    k = (k or 0) if want else None
  else: k = _int(body, "logprobs", None, 0, 20)
  seed = _int(body, "seed", None, -2**63, 2**64 - 1)
  try:
    sampling = SamplingParams(temperature=_number(body, "temperature", 1.0, 0, 2), top_p=_number(body, "top_p", 1.0, 0, 1),
                              top_k=_int(body, "top_k", 0, 0) if body.get("top_k") != -1 else 0, min_p=_number(body, "min_p", 0, 0, 1),
                              repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 10),
                              presence_penalty=_number(body, "presence_penalty", 0, -2, 2),
                              frequency_penalty=_number(body, "frequency_penalty", 0, -2, 2),
                              seed=None if seed is None else seed % 2**64)
  except InvalidArgumentError as e: raise bad(str(e), str(e).split(" ")[0]) from None
  stream = _get(body, "stream", (bool,), "a boolean", False)
  options = _get(body, "stream_options", (dict,), "an object", {})
  if options and not stream: raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
  usage = _get(options, "include_usage", (bool,), "a boolean", False)
  param, rule = _constraint(body, tokenizer, tools, choice)
  request = Request(tuple(prompt), max_tokens or room, sampling, tokenizer.stop_ids, k, constraint=rule)
  # calls are looked for unless there can be none: tool_choice "none", or a format the answer must have instead
  calls = choice != "none" and param in (None, "tool_choice")
  return Job(chat, request, stops, stream, usage, k is not None, tuple(tools) if calls else ())

def _tools(body: dict) -> tuple[list[Tool], str | Tool]:
  """The request's tools, and its tool_choice: "none", "auto", "required", or the one Tool it names."""
  tools = []
  for i, t in enumerate(_get(body, "tools", (list,), "a list of tools", [])):
    where = f"tools[{i}]"
    f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
    if not isinstance(f, dict): raise bad(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}, not {_short(t)}", where)
    name = f.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.match(name): raise bad(f"{where}.function.name must be 1-64 letters, digits, _ or -, not {_short(name)}", f"{where}.function.name")
    params = f.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict): raise bad(f"{where}.function.parameters must be a JSON schema object, not {_short(params)}", f"{where}.function.parameters")
    description = f.get("description") or ""
    if not isinstance(description, str): raise bad(f"{where}.function.description must be a string", f"{where}.function.description")
    if name in (t.name for t in tools): raise bad(f"two tools are named {name!r}", where)
    tools.append(Tool(name, description, params))
  choice = body.get("tool_choice")
  if choice is None: return tools, "auto" if tools else "none"
  if choice in ("none", "auto", "required"):
    if choice != "none" and not tools: raise bad(f"'tool_choice' is {choice!r}, but no 'tools' are given", "tool_choice")
    return tools, choice
  name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None
  if name is None: raise bad(f"'tool_choice' must be 'none', 'auto', 'required' or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, not {_short(choice)}", "tool_choice")
  if (named := next((t for t in tools if t.name == name), None)) is None: raise bad(f"'tool_choice' names {_short(name)}, which is not one of the 'tools'", "tool_choice")
  return tools, named

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

def _constraint(body: dict, tokenizer: Tokenizer, tools: list[Tool], choice) -> tuple[str | None, constraint.Grammar | None]:
  """The grammar the answer must follow (a forced tool call, a response_format, or one of vLLM's guided_* fields) and
  the field that asked for it."""
  rules = {}
  if choice == "required" or isinstance(choice, Tool): rules["tool_choice"] = {"grammar": call_grammar(tools if choice == "required" else [choice])}
  fmt = _get(body, "response_format", (dict,), "an object", {"type": "text"})
  kind = fmt.get("type")
  if kind == "json_object": rules["response_format"] = {"json_schema": True}
  elif kind == "json_schema":
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
      raise bad("'response_format' json_schema must be {\"name\": ..., \"schema\": {...}}", "response_format")
    rules["response_format"] = {"json_schema": spec.get("schema", True)}
  elif kind != "text": raise bad(f"'response_format' type must be 'text', 'json_object' or 'json_schema', not {_short(kind)}", "response_format")
  for field, arg in GUIDED.items():
    if body.get(field) is not None: rules[field] = {arg: body[field]}
  if len(rules) > 1: raise bad(f"{' and '.join(map(repr, rules))} cannot be enforced together: give one", list(rules)[-1])
  if not rules: return None, None
  (param, args), = rules.items()
  try: return param, constraint.compile(tokenizer, **args)
  except InvalidArgumentError as e: raise bad(f"'{param}': {e}", param) from None

def _chat_prompt(body: dict, tokenizer: Tokenizer, tools: list[Tool]) -> list[int]:
  if "messages" not in body: raise bad("'messages' is required", "messages")
  messages = _get(body, "messages", (list,), "a list of messages")
  if not messages: raise bad("'messages' must hold at least one message", "messages")
  checked = []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict): raise bad(f"{where} must be an object, not {_short(m)}", where)
    role = _get(m, "role", (str,), "a string")
    if role not in ("system", "developer", "user", "assistant", "tool"):
      raise bad(f"{where}.role must be 'system', 'user', 'assistant' or 'tool', not {_short(role)}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):  # parts: only text ones
      if bad_part := next((p for p in content if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))), None):
        raise bad(f"{where}.content: only text parts are supported, not {_short(bad_part)}", f"{where}.content")
      content = "".join(p["text"] for p in content)
    if not isinstance(content, str) and not (content is None and role == "assistant"):
      raise bad(f"{where}.content must be a string or a list of text parts, not {_short(content)}", f"{where}.content")
    one = {"role": "system" if role == "developer" else role, "content": content or ""}
    if role == "assistant" and m.get("tool_calls"): one["tool_calls"] = _calls(m["tool_calls"], where)
    if role == "tool": one["tool_call_id"] = _get(m, "tool_call_id", (str,), "a string", "")
    checked.append(one)
  native = renders_tools(tokenizer.chat_template)
  extra = {"tools": [t.schema() for t in tools]} if tools and native else {}
  try: return encode_chat(tokenizer, chat_messages(checked, tools, native), **extra)
  except TgLlamaError as e: raise bad(f"the model's chat template failed on these messages: {e}", "messages") from None

def _calls(calls, where: str) -> list[dict]:
  """An assistant message's tool_calls: [{"name", "arguments" (an object)}]."""
  if not isinstance(calls, list): raise bad(f"{where}.tool_calls must be a list, not {_short(calls)}", f"{where}.tool_calls")
  out = []
  for j, c in enumerate(calls):
    f = c.get("function") if isinstance(c, dict) else None
    name, args = (f.get("name"), f.get("arguments")) if isinstance(f, dict) else (None, None)
    try: args = json.loads(args) if isinstance(args, str) else args
    except ValueError: args = None
    if not isinstance(name, str) or not isinstance(args, dict):
      raise bad(f"{where}.tool_calls[{j}] must be {{\"function\": {{\"name\": ..., \"arguments\": \"<JSON object>\"}}}}, not {_short(c)}", f"{where}.tool_calls")
    out.append({"name": name, "arguments": args})
  return out

def _completion_prompt(body: dict, tokenizer: Tokenizer) -> list[int]:
  if "prompt" not in body: raise bad("'prompt' is required", "prompt")
  p = body["prompt"]
  if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)): p = p[0]  # a batch of one
  if isinstance(p, str):
    ids = ([tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []) + tokenizer.encode(p)
    if not ids: raise bad("'prompt' is empty", "prompt")
    return ids
  if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
    if (bad_id := next((t for t in p if not 0 <= t < tokenizer.vocab_size), None)) is not None:
      raise bad(f"'prompt' has token id {bad_id}, outside the vocabulary [0, {tokenizer.vocab_size})", "prompt")
    return p
  if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
    raise bad("several prompts in one request are not supported", "prompt")
  raise bad(f"'prompt' must be a string or a list of token ids, not {_short(p)}", "prompt")

# *** responses ***

def usage(job: Job, completion_tokens: int, cached: int) -> dict:
  n = len(job.request.prompt)
  return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached}}

class Shapes:
  """The JSON of one response: its id, its kind (chat or completion), the chunks of its stream."""
  def __init__(self, job: Job, model_id: str, tokenizer: Tokenizer):
    self.job, self.model_id, self.tokenizer = job, model_id, tokenizer
    self.id, self.created = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
    self.offset = 0  # completions' text_offset: characters of token text so far

  def _head(self, kind: str) -> dict: return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

  def logprobs(self, entries: list[tuple[int, float, tuple]]) -> dict | None:
    """entries: (token, logprob, ((token, logprob), ...) the most likely) for each token of this piece."""
    if not self.job.logprobs: return None
    s, b = self.tokenizer.token_str, self.tokenizer.token_bytes
    if self.job.chat:
      one = lambda t, lp: {"token": s(t), "logprob": lp, "bytes": list(b(t))}
      return {"content": [one(t, lp) | {"top_logprobs": [one(u, ulp) for u, ulp in top]} for t, lp, top in entries]}
    offsets = []
    for t, _, _ in entries:
      offsets.append(self.offset)
      self.offset += len(s(t))
    return {"tokens": [s(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{s(u): ulp for u, ulp in top} for _, _, top in entries], "text_offset": offsets}

  def response(self, text: str, entries: list, finish: str, usage: dict, calls: list | None = None) -> dict:
    lp = self.logprobs(entries)
    message = {"role": "assistant", "content": text or None, "tool_calls": [c.json() for c in calls]} if calls else {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message} if self.job.chat else {"index": 0, "text": text}
    return self._head("chat.completion" if self.job.chat else "text_completion") | {
      "choices": [choice | {"logprobs": lp, "finish_reason": finish}], "usage": usage}

  def chunk(self, text: str, entries: list, finish: str | None, role: bool = False) -> dict:
    """role: the first chunk of a chat stream, which says who speaks."""
    lp = self.logprobs(entries) if entries else None
    if self.job.chat: choice = {"index": 0, "delta": ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})}
    else: choice = {"index": 0, "text": text}
    kind = "chat.completion.chunk" if self.job.chat else "text_completion"
    out = self._head(kind) | {"choices": [choice | {"logprobs": lp, "finish_reason": finish}]}
    return out | ({"usage": None} if self.job.include_usage else {})

  def call_chunks(self, calls: list) -> list[dict]:
    """The stream's tool-call deltas: for each call its id and name, then its arguments."""
    out = []
    for i, c in enumerate(calls):
      for delta in ({"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}, {"index": i, "function": {"arguments": c.arguments}}):
        out.append(self._head("chat.completion.chunk") | {"choices": [{"index": 0, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None}]}
                   | ({"usage": None} if self.job.include_usage else {}))
    return out

  def usage_chunk(self, usage: dict) -> dict:
    return self._head("chat.completion.chunk" if self.job.chat else "text_completion") | {"choices": [], "usage": usage}
