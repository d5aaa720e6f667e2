"""Untrusted prompts, templates and tokenizer files: each is refused with a one-line TgLlamaError, fast and in bounded
memory, and what is legitimate still renders (against transformers' own, unbounded, jinja environment)."""
import json, resource, signal, time
import pytest
from tg_llama.chat_template import CHATML_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3_TEMPLATE, MAX_OUTPUT, MAX_VALUE, render_chat
from tg_llama.errors import CheckpointError, TgLlamaError
from tg_llama.tokenizer import Tokenizer, load_tokenizer

def vm_bytes() -> int:
  with open("/proc/self/status") as f: return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

@pytest.fixture
def bounded():
  """At most ~1 GB more address space and 20 s: an unbounded render fails the test (MemoryError, an alarm) rather than the machine."""
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 2**30, hard))
  def alarm(*_): raise TimeoutError("still running after 20 s")
  old = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(20)
  try: yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

CHAT = [{"role": "user", "content": "hi"}]
MIB = MAX_VALUE  # the per-value limit, for the messages below

# template -> the message it must be refused with
HOSTILE = {
  "{{ 'a' * 1500000000 }}": f"str \\* 1500000000 would hold 1500000000 items, over the limit of {MIB}",
  "{{ [0] * 1500000000 }}": "list \\* 1500000000 would hold",
  "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}": "took longer than 2 s",
  "{% set l = range(99999)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}": "took longer than 2 s",
  "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}": "recursed deeper than Python allows",
  "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}": "recursed deeper than Python allows",
  "{{ 9 ** (9 ** 9) }}": "integer over 65536 bits",
  "{% set ns = namespace(n=3) %}{% for i in range(99) %}{% set ns.n = ns.n * ns.n %}{% endfor %}": "integer over 65536 bits",
  "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}": "str \\+ str would hold",
  "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}": "a ~ b would hold",
  "{% set ns = namespace(l=[]) %}{% for i in range(9999) %}{% set ns.l = ns.l + ['a' * 8000000] %}{% endfor %}": "built over 67108864 items in all",
  "{{ 'a'|center(1500000000) }}": "center\\(1500000000\\)",
  "{{ ['a']|map('center', 1500000000)|list }}": "center\\(1500000000\\)",
  "{{ 'a'.ljust(1500000000) }}": "str.ljust\\(1500000000\\)",
  "{{ ('\t' * 100000).expandtabs(100000) }}": "str.expandtabs would hold",
  "{{ '{:>1500000000}'.format(1) }}": "format width over the limit",
  "{{ '{:>{}}'.format(1, 1500000000) }}": "format width over the limit",
  "{{ '%1500000000d' % 1 }}": "format width over the limit",
  "{{ '%*d'|format(1500000000, 1) }}": "format width over the limit",
  "{% set s = 'a' * 1000000 %}{{ s|replace('a', s) }}": "the result of replace would hold 1000000000000 items",
  "{% set s = 'a' * 1000000 %}{{ s.replace('a', s) }}": "the result of replace would hold 1000000000000 items",
  "{% set s = 'a' * 1000000 %}{{ s.join(range(99999)) }}": "str.join would hold",
  "{% set s = 'a' * 1000000 %}{{ range(99999)|join(s) }}": "the result of join would hold",
  "{% set s = 'a' * 8000000 %}{% for i in range(99999) %}{{ s }}{% endfor %}": f"output is over {MAX_OUTPUT} characters",
  "{% set s = 'a' * 8000000 %}{% set x %}{% for i in range(99999) %}{{ s }}{% endfor %}{% endset %}": "a block of template output would hold",
  "{% macro m() %}{% for i in range(99999) %}{{ 'a' * 8000000 }}{% endfor %}{% endmacro %}{{ m() }}": "(block of template output|items in all)",
  "{{ [1]|batch(1500000000, 0)|list }}": "batch\\(1500000000\\)",
  "{{ [1]|slice(1500000000)|list }}": "slice\\(1500000000\\)",
  "{{ lipsum(1000000, max=1000000) }}": "lipsum would hold",
  "{% set s = 'a\n' * 1000000 %}{{ s|indent(1000) }}": "the result of indent would hold",
  "{{ ('a' * 1000000)|wordwrap(1, wrapstring='b' * 1000) }}": "the result of wordwrap would hold",
  "{{ messages|tojson(indent=1000000000) }}": "tojson indent or separators over 64",
  "{{ ([[0] * 1000] * 10000)|sum(start=[]) }}": "the result of sum would hold",
  "{{ ([[0] * 10] * 100000)|sum(start=[]) }}": "sum of 100000 sequences",
  "{{ ('<' * 200000)|striptags }}": "striptags of 200000 characters, over the limit of 100000",
}

@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_template_is_refused_fast(bounded, template):
  start = time.monotonic()
  with pytest.raises(TgLlamaError, match=HOSTILE[template]) as e: render_chat(CHAT, template, "", "")
  assert time.monotonic() - start < 5 and "\n" not in str(e.value) and str(e.value).startswith("chat template")

def test_hostile_template_through_encode_chat(bounded, llama3_tokenizer_dir):
  tok = load_tokenizer(llama3_tokenizer_dir / "tokenizer.model")
  from tg_llama.chat_template import encode_chat
  with pytest.raises(TgLlamaError, match="took longer than 2 s"):
    encode_chat(tok, CHAT, template="{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}")

# *** what real templates do still renders exactly as transformers renders it ***

# the constructs of real chat templates (Llama 3.1's tool calling, Qwen's, Mistral's): namespace, tojson, filters, loops
FEATURES = (
  "{%- set ns = namespace(system='', n=0) %}{%- if messages[0]['role'] == 'system' %}{%- set ns.system = messages[0]['content']|trim %}"
  "{%- set messages = messages[1:] %}{%- endif %}{{ bos_token }}{%- if tools is not none %}<tools>{% for t in tools %}{{ t|tojson(indent=2) }}"
  "{% if not loop.last %},{% endif %}{% endfor %}</tools>{%- endif %}{{ ns.system|upper|replace('TERSE', 'brief')|center(40) }}"
  "{%- for m in messages %}{%- set ns.n = ns.n + m['content']|length %}{{ '<|' ~ m['role'] ~ '|>' ~ loop.index0 ~ '/' ~ loop.length }}"
  "{{ m['content']|trim|indent(2, true)|wordwrap(60) }}{{ ('%5d' % ns.n) ~ ','.join(m['content'].split()[:3]) }}{{ '{:>8}'.format(loop.revindex) }}"
  "{%- endfor %}{{ messages|map(attribute='role')|unique|join(', ') }}{{ range(3)|list|sum }}{{ 'x' * 3 }}{{ 2 ** 10 }}{{ [1, 2] + [3] }}"
  "{%- if add_generation_prompt %}<|assistant|>{% endif %}")

def long_chat(n: int) -> list[dict]:
  chat = [{"role": "system", "content": "You are terse."}]
  for i in range(n):
    chat += [{"role": "user", "content": f"Question {i}: what is {i} + {i}? Answer in one word. " + "context " * (i % 50)},
             {"role": "assistant", "content": f"{2 * i}, of course. 中文 😀 " * (1 + i % 3)}]
  return chat

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {"type": "object",
          "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]

@pytest.mark.parametrize("name", ["llama3", "llama2", "chatml", "features", "smollm2"])
def test_real_templates_render_as_transformers_does(name, smollm2_gguf):
  from transformers.utils.chat_template_utils import _compile_jinja_template
  template = {"llama3": LLAMA3_TEMPLATE, "llama2": LLAMA2_TEMPLATE, "chatml": CHATML_TEMPLATE, "features": FEATURES,
              "smollm2": load_tokenizer(smollm2_gguf).chat_template if name == "smollm2" else None}[name]
  chat = long_chat(1500)
  if name == "llama2": chat = chat[1:]  # its template allows user/assistant turns only after the system prompt
  for gen in (True, False):
    kw = dict(messages=chat, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>", tools=TOOLS if name == "features" else None)
    ours = render_chat(**{k: v for k, v in kw.items() if k != "messages"}, messages=chat, template=template)
    assert ours == _compile_jinja_template(template).render(**{"documents": None, **kw})
    assert len(ours) > 100_000
