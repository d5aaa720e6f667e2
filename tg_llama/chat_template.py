"""Chat templates: a conversation -> the prompt text (and ids) the model was trained on.

Templates are Jinja, rendered as transformers renders them (utils/chat_template_utils.py, v5.x): an
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loopcontrols, `raise_exception`, `strftime_now`,
`dict`, a `namespace` that refuses underscore names, and a `tojson` that leaves HTML alone. Built-in Llama 3,
Llama 2 ([INST]) and ChatML templates stand in for a model that ships none.

Non-goals: assistant-token masks (`{% generation %}` only renders its body), continue_final_message, converting
tool functions to JSON schemas (pass `tools` as schemas)."""
from __future__ import annotations
import functools, json, re
from datetime import datetime
from typing import Iterable
import jinja2, jinja2.ext, jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tg_llama.errors import TgLlamaError

# Meta-Llama-3-8B-Instruct's tokenizer_config.json template
LLAMA3_TEMPLATE = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
  "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
  "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 2 chat as Meta's llama/generation.py lays it out: the system prompt folds into the first user turn,
# each exchange is `<s>[INST] user [/INST] answer </s>`; the prompt for a reply ends at [/INST]
LLAMA2_TEMPLATE = (
  "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
  "{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}"
  "{% for message in messages %}"
  "{% if message['role'] == 'user' %}{% set text = message['content'] | trim %}"
  "{% if loop.first and system is not none %}{% set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + text %}{% endif %}"
  "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
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

@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                     dict=_Dict(), namespace=_Namespace)
  try: return env.from_string(template)
  except jinja2.TemplateSyntaxError as e: raise TgLlamaError(f"chat template, line {e.lineno}: {e.message}") from None

def render_chat(messages: list[dict], template: str | None, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, **kwargs) -> str:
  """The prompt text for `messages` ([{"role": ..., "content": ...}]). `template` None picks a built-in one from
  the bos/eos token names. `kwargs` (tools, documents, date_string...) reach the template as variables."""
  template = template if template is not None else fallback_template([bos_token, eos_token])
  context = {"tools": None, "documents": None, **kwargs}
  try: return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=bos_token, eos_token=eos_token, **context)
  except jinja2.TemplateError as e: raise TgLlamaError(f"chat template failed: {e.message or type(e).__name__}") from None
  except (ArithmeticError, LookupError, TypeError, ValueError) as e:  # Python errors inside the template's expressions
    raise TgLlamaError(f"chat template failed: {type(e).__name__}: {e}") from None

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
