"""Tool calls in OpenAI's shape, written by the model in the Hermes format that Qwen, SmolLM3 and many fine-tunes use:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A template that renders tools itself (it mentions `tools`) gets them, and the history's tool calls and results, as
transformers passes them (`tools=[...]`, assistant `tool_calls` with arguments as objects, `role: "tool"` messages). A
template that knows nothing of tools (SmolLM2's, Llama 2's) gets the tools described in the system message and the
history written out in the same format: calls as the assistant's text, results as a user turn in <tool_response> tags
that ends by asking for the answer (measured on SmolLM2-135M: without that line it repeats the result).

tool_choice "auto": the calls are parsed from what the model writes. "required" or a named function: the answer is
one call, enforced by a grammar (tg_llama/constraint.py): its name is one of the tools (or the named one) and its
arguments match that tool's parameter schema. Under "auto" an answer that is Llama 3.1/3.2's own call format, a bare
`{"name": ..., "parameters": {...}}`, is a call too. Not here: several calls enforced in one answer (a model may
still write several under "auto"), Llama 3.1's built-in tools (`<|python_tag|>`), Mistral's `[TOOL_CALLS]`."""
from __future__ import annotations
import json, re, uuid
from dataclasses import dataclass
from tg_llama.constraint import JSON_OPTIONS, closed

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)

@dataclass(frozen=True)
class Tool:
  name: str
  description: str
  parameters: dict

  def schema(self) -> dict: return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

def system_text(tools: list[Tool]) -> str:
  """The tools and the call format, for a template that does not render tools."""
  listed = "\n".join(json.dumps(t.schema(), ensure_ascii=False) for t in tools)
  return ("You may call one or more functions to assist with the user query. The functions, as JSON schemas:\n"
          f"<tools>\n{listed}\n</tools>\n"
          "To call a function, answer with its name and arguments as a JSON object within <tool_call></tool_call> tags:\n"
          f"{OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n{CLOSE}")

def call_text(name: str, arguments: dict) -> str:
  return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"

def call_grammar(tools: list[Tool]) -> str:
  """A Lark grammar (llguidance's) for exactly one call of one of `tools`, in the format above."""
  calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": closed(t.parameters)}, "required": ["name", "arguments"],
            "additionalProperties": False} for t in tools]
  schema = {"anyOf": calls, "x-guidance": JSON_OPTIONS}
  before, after = json.dumps(OPEN + "\n"), json.dumps("\n" + CLOSE)
  return f"start: {before} call {after}\ncall: %json {json.dumps(schema)}"

@dataclass(frozen=True)
class Call:
  id: str
  name: str
  arguments: str  # JSON text, as OpenAI sends it

  def json(self) -> dict: return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

def parse_calls(text: str, tools: list[Tool]) -> list[Call] | None:
  """The calls in `text` (from the first <tool_call> on, or a whole answer that is Llama 3.1's bare JSON call or a list of
  them), or None when any of them is not a call of a listed tool with an object of arguments."""
  try: objs = [json.loads(body) for body in _CALL.findall(text)] if OPEN in text else json.loads(text)
  except json.JSONDecodeError: return None
  names, calls = {t.name for t in tools}, []
  for obj in objs if isinstance(objs, list) else [objs]:
    args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
    if not (isinstance(obj, dict) and obj.get("name") in names and isinstance(args, dict)): return None
    calls.append(Call("call_" + uuid.uuid4().hex[:24], obj["name"], json.dumps(args, ensure_ascii=False)))
  return calls or None

class CallSplitter:
  """An answer's text as it streams: content is released until a <tool_call> begins (text that may be its start is
  held back), or not at all when the answer starts with "{" (Llama 3.1 writes a call as a bare JSON object); the rest
  is kept for parse_calls at the end, and is text after all if it does not parse."""
  def __init__(self):
    self.held, self.calls_text, self.in_call, self.started = "", "", False, False

  def add(self, text: str) -> str:
    if self.in_call:
      self.calls_text += text
      return ""
    self.held += text
    if not self.started:  # leading whitespace is held until the answer's first character says what it is
      if not (lead := self.held.lstrip()): return ""
      self.started = True
      if lead.startswith("{"):
        self.calls_text, self.held, self.in_call = self.held, "", True
        return ""
    if (i := self.held.find(OPEN)) >= 0:
      out, self.calls_text, self.held, self.in_call = self.held[:i], self.held[i:], "", True
      return out
    keep = next((k for k in range(min(len(self.held), len(OPEN) - 1), 0, -1) if OPEN.startswith(self.held[-k:])), 0)
    out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
    return out

  def finish(self) -> tuple[str, str]:
    """(content not yet released, the text that may be calls)"""
    out, self.held = self.held, ""
    return out, self.calls_text

def chat_messages(messages: list[dict], tools: list[Tool], native: bool) -> list[dict]:
  """Checked messages (tg_llama/serve/protocol.py's) with tool calls and results, as the template takes them: `native`
  when it renders tools itself, else written out as text (module docstring)."""
  out: list[dict] = []
  for m in messages:
    calls = m.get("tool_calls") or []
    if native:
      if calls: m = m | {"tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]}
      out.append(m)
    elif m["role"] == "tool":
      results = [*(out.pop()["results"] if out and "results" in out[-1] else []), m["content"]]
      out.append({"role": "user", "results": results, "content": "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
                  + "\n" + ("Answer with this result." if len(results) == 1 else "Answer with these results.")})
    elif calls:
      text = "\n".join([*([m["content"]] if m["content"] else []), *(call_text(c["name"], c["arguments"]) for c in calls)])
      out.append({"role": "assistant", "content": text})
    else: out.append(m)
  if tools and not native:
    if out and out[0]["role"] == "system": out[0] = out[0] | {"content": out[0]["content"] + "\n\n" + system_text(tools)}
    else: out.insert(0, {"role": "system", "content": system_text(tools)})
  return [{k: v for k, v in m.items() if k != "results"} for m in out]

def renders_tools(template: str | None) -> bool:
  """Whether a chat template renders `tools` itself (transformers' convention)."""
  return template is not None and re.search(r"\btools\b", template) is not None
