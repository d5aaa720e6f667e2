"""Chat templates: a conversation -> the prompt text (and ids) the model was trained on.

Templates are Jinja, rendered as transformers renders them (utils/chat_template_utils.py, v5.x): an
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loopcontrols, `raise_exception`, `strftime_now`,
`dict`, a `namespace` that refuses underscore names, and a `tojson` that leaves HTML alone. Built-in Llama 3,
Llama 2 ([INST]) and ChatML templates stand in for a model that ships none.

A template comes with the checkpoint, so it is untrusted code: one render is bounded (`_Budget`). It may run for
TIME_LIMIT seconds of its thread's CPU time, checked at every loop iteration, call, filter, operator, attribute and item lookup; no string or
list it builds may hold more than MAX_VALUE items and all of them together no more than MAX_TOTAL; no integer may
grow past MAX_INT_BITS; the prompt it writes may not pass MAX_OUTPUT characters. Sizes are checked before the
operations that multiply them (`*`, `**`, `+`, `%` and str.format widths, center/ljust/zfill/expandtabs, replace,
join, indent, wordwrap, batch, slice, sum, lipsum, tojson's indent), after the others. Each refusal is one-line
TgLlamaError naming the limit; so is RecursionError (a macro that calls itself forever) and MemoryError.
Not bounded: the time of one single C-level operation on values inside the limits (sorting 100k items, a regex
filter: striptags and urlize get at most MAX_REGEX_INPUT characters), the Python stack depth (Python's own limit),
and the size of the template source itself.

Non-goals: assistant-token masks (`{% generation %}` only renders its body), continue_final_message, converting
tool functions to JSON schemas (pass `tools` as schemas)."""
from __future__ import annotations
import functools, inspect, json, re, string, threading, time
from datetime import datetime
from typing import Callable, Iterable
import jinja2, jinja2.ext, jinja2.nodes, jinja2.utils, jinja2.visitor
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tg_llama.errors import TgLlamaError

# Meta-Llama-3-8B-Instruct's tokenizer_config.json template
LLAMA3_TEMPLATE = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
  "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
  "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 2 chat as Meta's llama/generation.py (and meta-llama/Llama-2-7b-chat-hf's template) lays it out: the system
# prompt folds into the first user turn, which is trimmed as a whole; each exchange is `<s>[INST] user [/INST] answer </s>`;
# the prompt for a reply ends at [/INST]. A SentencePiece vocab (<s>, </s>) that ships no template gets this one.
LLAMA2_TEMPLATE = (
  "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
  "{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}"
  "{% for message in messages %}"
  "{% if message['role'] == 'user' %}{% set text = message['content'] %}"
  "{% if loop.first and system is not none %}{% set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + text %}{% endif %}"
  "{{ bos_token + '[INST] ' + text | trim + ' [/INST]' }}"
  "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
  "{% else %}{{ raise_exception('the Llama 2 template has no role ' + message['role']) }}{% endif %}"
  "{% endfor %}")
CHATML_TEMPLATE = (
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_LLAMA3_NAMES, _CHATML_NAMES = {"<|start_header_id|>", "<|begin_of_text|>", "<|eot_id|>"}, {"<|im_start|>", "<|im_end|>"}

def fallback_template(special_tokens: Iterable[str]) -> str:
  """The built-in template that fits a vocabulary: Llama 3's if it has Llama 3's header (or bos/eot) tokens,
  ChatML if it has <|im_start|> (or <|im_end|>), else Llama 2's [INST]."""
  names = set(special_tokens)
  return LLAMA3_TEMPLATE if names & _LLAMA3_NAMES else CHATML_TEMPLATE if names & _CHATML_NAMES else LLAMA2_TEMPLATE

class _Generation(jinja2.ext.Extension):
  # transformers marks assistant text with {% generation %} to build training masks; here it only renders
  tags = {"generation"}
  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)
  def _render(self, caller): return caller()

class _Namespace(jinja2.utils.Namespace):
  # like transformers': a template may not store dunder (or any underscore) names on a namespace
  def __init__(*args, **kwargs):
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs: _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)
  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)
  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"): raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")

class _Dict:
  # transformers' `dict` global: a constructor and fromkeys, without dict's other class attributes
  def __call__(self, *args, **kwargs): return dict(*args, **kwargs)
  def fromkeys(self, *args, **kwargs): return dict.fromkeys(*args, **kwargs)

def _raise_exception(message): raise jinja2.exceptions.TemplateError(message)

def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

# *** the limits of one render ***

TIME_LIMIT = 2.0           # seconds of the rendering thread's own CPU time: waiting for the GIL or a busy machine is not the template's
MAX_OUTPUT = 8 * 2**20     # characters of the rendered prompt
MAX_VALUE = 8 * 2**20      # items (characters, elements) of any one string or list the template builds
MAX_TOTAL = 64 * 2**20     # items of all the strings and lists it builds, together
MAX_INT_BITS = 2**16
MAX_REGEX_INPUT = 100_000  # striptags and urlize backtrack (quadratic) on hostile text
MAX_JSON_INDENT = 64

class _Budget:
  def __init__(self): self.deadline, self.left = time.thread_time() + TIME_LIMIT, MAX_TOTAL
  def tick(self):
    if time.thread_time() > self.deadline: raise TgLlamaError(f"chat template took longer than {TIME_LIMIT:g} s of CPU")
  def size(self, n: int, what: str):
    if n > MAX_VALUE: raise TgLlamaError(f"chat template: {what} would hold {n} items, over the limit of {MAX_VALUE}")
  def charge(self, value):
    self.tick()
    if type(value) is int and value.bit_length() > MAX_INT_BITS: raise TgLlamaError(f"chat template: an integer over {MAX_INT_BITS} bits")
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
      self.size(len(value), f"a {type(value).__name__}")
      if (left := self.left - len(value)) < 0: raise TgLlamaError(f"chat template built over {MAX_TOTAL} items in all")
      self.left = left
    return value

_local = threading.local()
def _budget() -> _Budget: return getattr(_local, "budget", None) or _Budget()

def _is_int(x) -> bool: return isinstance(x, int) and not isinstance(x, bool)
def _sized(x) -> bool: return isinstance(x, (str, list, tuple))

def _check_binop(op: str, a, b):
  budget = _budget()
  if op == "*":
    if _is_int(a) and _is_int(b) and a.bit_length() + b.bit_length() > MAX_INT_BITS:
      raise TgLlamaError(f"chat template: an integer over {MAX_INT_BITS} bits")
    for seq, n in ((a, b), (b, a)):
      if _sized(seq) and isinstance(n, int): budget.size(len(seq) * n, f"{type(seq).__name__} * {n}")
  elif op == "**" and _is_int(a) and _is_int(b) and b > 0 and abs(a) > 1 and (b > MAX_INT_BITS or b * a.bit_length() > MAX_INT_BITS):
    raise TgLlamaError(f"chat template: {a} ** {b} is an integer over {MAX_INT_BITS} bits")
  elif op == "+" and _sized(a) and _sized(b): budget.size(len(a) + len(b), f"{type(a).__name__} + {type(b).__name__}")
  elif op == "%" and isinstance(a, str): _check_format(a, b if isinstance(b, tuple) else (b,), "%")

_WIDTHS = re.compile(r"\d+")
def _check_format(fmt: str, args, style: str):
  # a width or precision is written in the format (checked here) or passed with * or a nested {} (then every int is one)
  if max(map(int, _WIDTHS.findall(fmt)), default=0) > MAX_VALUE or \
     ((style == "%" and "*" in fmt) or (style == "{" and any("{" in (spec or "") for _, _, spec, _ in string.Formatter().parse(fmt)))) and \
     any(_is_int(x) and x > MAX_VALUE for x in args):
    raise TgLlamaError(f"chat template: a format width over the limit of {MAX_VALUE}")

def _check_replace(s: str, old: str, new: str, count=-1):
  hits = len(s) + 1 if not old else s.count(old)
  hits = hits if count is None or count < 0 else min(hits, count)
  _budget().size(len(s) + hits * (len(new) - len(old)), "the result of replace")

def _check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
  budget, first = _budget(), args[0] if args else None
  if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int): budget.size(first, f"str.{name}({first})")
  elif name == "expandtabs": budget.size(len(s) + s.count("\t") * max(kwargs.get("tabsize", first if first is not None else 8), 0), "str.expandtabs")
  elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str): _check_replace(s, *args)
  elif name == "join" and args:
    items = list(first)
    budget.size(len(s) * max(len(items) - 1, 0) + sum(len(x) for x in items if isinstance(x, str)), "str.join")
    return (items, *args[1:])
  elif name in ("format", "format_map"): _check_format(s, [*args, *kwargs.values()], "{")
  return args

def _skipped(f) -> int:
  # jinja's async_variant filters take an eval context their sync function (whose signature we see) does not
  inner, pass_arg = inspect.unwrap(f), jinja2.utils._PassArg.from_obj
  return 1 if inner is not f and pass_arg(f) and not pass_arg(inner) else 0

def _bound_args(f, args, kwargs) -> dict:
  try: bound = inspect.signature(f).bind(*args[_skipped(f):], **kwargs)
  except TypeError: return {}  # the call itself will raise
  bound.apply_defaults()
  return bound.arguments

def _check_filter(name: str, f, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """Refuses a filter call that would build too much; returns its arguments, with a one-shot iterable made a list."""
  if name not in ("center", "indent", "wordwrap", "replace", "join", "format", "tojson", "batch", "slice", "sum", "striptags", "urlize"):
    return args, kwargs
  a, budget = _bound_args(f, args, kwargs), _budget()
  s = a.get("s", a.get("value", ""))
  if name == "center" and isinstance(a.get("width"), int): budget.size(a["width"], f"center({a['width']})")
  elif name == "indent" and isinstance(s, str):
    width = a.get("width", 4)
    budget.size(len(s) + (width if isinstance(width, int) else len(str(width))) * (s.count("\n") + 1), "the result of indent")
  elif name == "wordwrap" and isinstance(s, str) and _is_int(a.get("width")):
    budget.size(len(s) + len(a.get("wrapstring") or "\n") * (len(s) // max(a["width"], 1) + 1), "the result of wordwrap")
  elif name == "replace" and all(isinstance(a.get(k), str) for k in ("s", "old", "new")): _check_replace(a["s"], a["old"], a["new"], a.get("count"))
  elif name == "format" and isinstance(s, str): _check_format(s, [*a.get("args", ()), *a.get("kwargs", {}).values()], "%")
  elif name == "tojson":
    indent, seps = a.get("indent"), a.get("separators") or ()
    if (indent is not None and (indent if _is_int(indent) else len(str(indent))) > MAX_JSON_INDENT) or any(len(str(x)) > MAX_JSON_INDENT for x in seps):
      raise TgLlamaError(f"chat template: tojson indent or separators over {MAX_JSON_INDENT} characters")
  elif name in ("batch", "slice") and _is_int(n := a.get("linecount", a.get("slices"))): budget.size(n, f"{name}({n})")
  elif name in ("striptags", "urlize") and isinstance(s, str) and len(s) > MAX_REGEX_INPUT:
    raise TgLlamaError(f"chat template: {name} of {len(s)} characters, over the limit of {MAX_REGEX_INPUT}")
  elif name in ("join", "sum"):
    key = "value" if name == "join" else "iterable"
    items = a[key] = a[key] if isinstance(a.get(key), (list, tuple)) else list(a.get(key) or ())
    if name == "join" and isinstance(d := a.get("d"), str): budget.size(len(d) * max(len(items) - 1, 0), "the result of join")
    if name == "sum" and not isinstance(a.get("start", 0), (int, float)):
      # sequences: each + copies all that came before
      total = sum(len(x) for x in [*items, a["start"]] if hasattr(x, "__len__"))
      budget.size(total, "the result of sum")
      if total * len(items) > MAX_TOTAL:
        raise TgLlamaError(f"chat template: sum of {len(items)} sequences, {total} items, over the limit of {MAX_TOTAL} copies")
    return (*args[:_skipped(f)], *a.values()), {}
  return args, kwargs

def _guarded(name: str, f, check) -> Callable:
  """`f` (a filter, test or global), checked against the budget; takes the context, so jinja never runs it at compile time."""
  extra = {jinja2.utils._PassArg.context: lambda c: (c,), jinja2.utils._PassArg.eval_context: lambda c: (c.eval_ctx,),
           jinja2.utils._PassArg.environment: lambda c: (c.environment,)}.get(jinja2.utils._PassArg.from_obj(f), lambda c: ())
  @jinja2.pass_context
  def run(context, *args, **kwargs):
    budget, pre = _budget(), extra(context)
    budget.tick()
    args, kwargs = check(name, f, (*pre, *args), kwargs) if check else ((*pre, *args), kwargs)
    return budget.charge(f(*args, **kwargs))
  return run

def _bounded_concat(parts) -> str:
  # every {% set %} block, macro, caller() and {% filter %} body is joined here
  parts = list(parts)
  _budget().size(sum(map(len, parts)), "a block of template output")
  return _budget().charge("".join(parts))

class _GuardLoops(jinja2.visitor.NodeTransformer):
  # loops that call nothing would never meet the budget, and `~` joins with jinja's own str_join: route both through it
  def visit_For(self, node):
    self.generic_visit(node)
    node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("guard_iter"), [node.iter], [], None, None)
    return node
  def visit_Concat(self, node):
    self.generic_visit(node)
    return jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("guard_concat"), [jinja2.nodes.List(node.nodes)], [], None, None)

class _BoundedEnvironment(ImmutableSandboxedEnvironment):
  intercepted_binops = frozenset({"*", "**", "+", "%"})
  concat = staticmethod(_bounded_concat)

  def _parse(self, source, name, filename): return _GuardLoops().visit(super()._parse(source, name, filename))
  def call_binop(self, context, operator, left, right):
    _budget().tick()
    _check_binop(operator, left, right)
    return _budget().charge(super().call_binop(context, operator, left, right))
  def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's spelling: a keyword argument may be named self)
    _budget().tick()
    method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
    if isinstance(owner := getattr(method, "__self__", None), str): args = _check_str_method(owner, method.__name__, args, kwargs)
    return _budget().charge(ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))
  def getattr(self, obj, attribute):
    _budget().tick()
    return super().getattr(obj, attribute)
  def getitem(self, obj, argument):
    _budget().tick()
    return super().getitem(obj, argument)
  def guard_iter(self, iterable):
    budget = _budget()
    for x in iterable:
      budget.tick()
      yield x
  def guard_concat(self, items: list) -> str:
    parts = [str(x) for x in items]
    _budget().size(sum(map(len, parts)), "a ~ b")
    return "".join(parts)

def _check_lipsum(name, f, args, kwargs):
  a = _bound_args(f, args, kwargs)
  if _is_int(a.get("n")) and _is_int(a.get("max")): _budget().size(a["n"] * max(a["max"], 0) * 16, "lipsum")
  return args, kwargs

@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.filters = {name: _guarded(name, f, _check_filter) for name, f in env.filters.items()}
  env.tests = {name: _guarded(name, f, None) for name, f in env.tests.items()}
  env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                     dict=_Dict(), namespace=_Namespace, lipsum=_guarded("lipsum", env.globals["lipsum"], _check_lipsum))
  try: return env.from_string(template)
  except jinja2.TemplateSyntaxError as e: raise TgLlamaError(f"chat template, line {e.lineno}: {e.message}") from None

def _render(template: jinja2.Template, **context) -> str:
  out, n = [], 0
  for piece in template.generate(**context):
    if (n := n + len(piece)) > MAX_OUTPUT: raise TgLlamaError(f"chat template output is over {MAX_OUTPUT} characters")
    out.append(piece)
  return "".join(out)

def render_chat(messages: list[dict], template: str | None, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, **kwargs) -> str:
  """The prompt text for `messages` ([{"role": ..., "content": ...}]). `template` None picks a built-in one from
  the bos/eos token names. `kwargs` (tools, documents, date_string...) reach the template as variables."""
  template = template if template is not None else fallback_template([bos_token, eos_token])
  context = {"tools": None, "documents": None, **kwargs}
  _local.budget = _Budget()
  try: return _render(_compile(template), messages=messages, add_generation_prompt=add_generation_prompt,
                      bos_token=bos_token, eos_token=eos_token, **context)
  except jinja2.TemplateError as e: raise TgLlamaError(f"chat template failed: {e.message or type(e).__name__}") from None
  except RecursionError: raise TgLlamaError("chat template recursed deeper than Python allows") from None
  except MemoryError: raise TgLlamaError("chat template ran out of memory") from None
  except (ArithmeticError, LookupError, TypeError, ValueError) as e:  # Python errors inside the template's expressions
    if isinstance(e, TgLlamaError): raise
    raise TgLlamaError(f"chat template failed: {type(e).__name__}: {e}") from None
  finally: _local.budget = None

_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters around a message index

def chat_parts(messages: list[dict], template: str | None, bos_token: str, eos_token: str,
               add_generation_prompt: bool = True, **kwargs) -> list[tuple[str, bool]]:
  """render_chat's text cut into (text, from_template) parts, so that special-token strings a user typed in a
  message stay plain text while the template's own become special tokens. Found by rendering again with each
  message's content swapped for a marker; a template that does more to contents than trim them, or that branches
  on them, gets one part from the template: everything parsed, as transformers does."""
  text = render_chat(messages, template, bos_token, eos_token, add_generation_prompt, **kwargs)
  marked = [dict(m, content=f"\ue000{i}\ue001") if isinstance(m.get("content"), str) else m for i, m in enumerate(messages)]
  try: pieces = _MARK.split(render_chat(marked, template, bos_token, eos_token, add_generation_prompt, **kwargs))
  except TgLlamaError: return [(text, True)]
  parts, pos = [], 0
  for i, piece in enumerate(pieces):
    if i % 2 == 0: candidates, from_template = (piece,), True
    else:
      content = messages[int(piece)]["content"]
      candidates, from_template = (content, content.strip(), content.lstrip(), content.rstrip()), False
    if (found := next((c for c in candidates if text.startswith(c, pos)), None)) is None: return [(text, True)]
    parts.append((found, from_template))
    pos += len(found)
  return [p for p in parts if p[0]] if pos == len(text) else [(text, True)]

def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, template: str | None = None,
                **kwargs) -> list[int]:
  """Prompt ids for `messages` with the tokenizer's template (or `template`, or a built-in one). Special tokens
  typed in messages stay text. BOS comes from the template; it is prepended only if the tokenizer wants one and
  the template wrote none."""
  template = template or tokenizer.chat_template or fallback_template(tokenizer.special_tokens)
  name = lambda i: tokenizer.token_str(i) if i is not None else ""
  parts = chat_parts(messages, template, name(tokenizer.bos_id), name(tokenizer.eos_id), add_generation_prompt, **kwargs)
  text, spans, pos = "".join(p for p, _ in parts), [], 0
  for p, from_template in parts:
    if from_template: spans.append((pos, pos + len(p)))
    pos += len(p)
  # cut only at the template's special tokens, and encode what lies between whole: text is split into the same
  # pieces as when every special token is parsed (transformers), so ids match it wherever users typed none
  ids, last = [], 0
  for m in _alternation(frozenset(tokenizer.special_tokens)).finditer(text) if tokenizer.special_tokens else ():
    if any(a <= m.start() and m.end() <= b for a, b in spans):
      ids += tokenizer.encode(text[last:m.start()]) + [tokenizer.special_tokens[m.group()]]
      last = m.end()
  ids += tokenizer.encode(text[last:])
  return [tokenizer.bos_id] + ids if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id] else ids

@functools.lru_cache(maxsize=4)
def _alternation(names: frozenset[str]) -> re.Pattern:
  # longest first, so a token that is a prefix of another never wins
  return re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))))
