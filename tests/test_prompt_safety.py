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

# *** tokenizer files: a malformed one is a CheckpointError naming the file and the key ***

def byte_level_json(**changes) -> dict:
  """A small valid byte-level BPE tokenizer.json (HF tokenizers writes it): the 256 byte tokens, a few merges, three
  added special tokens; `changes` sets (or DELETEs) dotted paths in it."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "t")]
  for a, b in merges: vocab[a + b] = len(vocab)
  hf = HFTokenizer(models.BPE(vocab, merges))
  hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  tok = json.loads(hf.to_str())
  for path, value in changes.items():
    *keys, last = path.split(".")
    d = tok
    for k in keys: d = d[k]
    if value is DELETE: del d[last]
    else: d[last] = value
  return tok

DELETE = object()

def test_byte_level_json_is_valid():
  from tokenizers import Tokenizer as HFTokenizer
  tok, hf = Tokenizer.from_hf_json(byte_level_json()), HFTokenizer.from_str(json.dumps(byte_level_json()))
  for text in ("hello there", "the <|im_end|> tell ünï 😀"): assert tok.encode(text, allow_special=True) == hf.encode(text).ids

BAD_JSON = {
  "no model": (dict(model=DELETE), "src.json: no model"),
  "no vocab": ({"model.vocab": DELETE}, "src.json: no model.vocab"),
  "vocab a list": ({"model.vocab": ["a", "b"]}, "src.json: model.vocab is a list, not an object"),
  "vocab id a string": ({"model.vocab": {"a": "0"}}, "src.json: model.vocab has a token id '0' that is not an integer"),
  "vocab id negative": ({"model.vocab": {"a": -1}}, "src.json: model.vocab has a token id -1"),
  "merges numbers": ({"model.merges": [1, 2]}, r"src.json: merges\[0\] is not 'a b' or \[a, b\]"),
  "merge without space": ({"model.merges": ["he"]}, r"src.json: merges\[0\]"),
  "merges an object": ({"model.merges": {"a": 1}}, "src.json: model.merges is an object, not a list"),
  "added id huge": ({"added_tokens": [{"id": 10**12, "content": "<x>", "special": True}]}, "added_tokens has token id 1000000000000, past the"),
  "added not objects": ({"added_tokens": ["<x>"]}, r"src.json: added_tokens\[0\] is not a"),
  "added an object": ({"added_tokens": {"id": 1}}, "src.json: added_tokens is an object, not a list"),
  "pre_tokenizer a string": ({"pre_tokenizer": "ByteLevel"}, "src.json: pre_tokenizer is not an object"),
  "sequence of strings": ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": ["x"]}}, "src.json: pre_tokenizer is not an object"),
  "bad split regex": ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "(("}, "behavior": "Isolated"},
                       {"type": "ByteLevel", "use_regex": False}]}}, "split pattern does not compile"),
}

@pytest.mark.parametrize("case", BAD_JSON)
def test_malformed_tokenizer_json(bounded, case):
  changes, message = BAD_JSON[case]
  with pytest.raises(TgLlamaError, match=message) as e: Tokenizer.from_hf_json(byte_level_json(**changes), src="src.json")
  assert "\n" not in str(e.value)

def test_tokenizer_json_files(bounded, tmp_path):
  f = tmp_path / "tokenizer.json"
  f.write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(CheckpointError, match="tokenizer.json: JSON nested deeper than Python can read"): load_tokenizer(f)
  f.write_text(json.dumps([byte_level_json()]))
  with pytest.raises(CheckpointError, match="tokenizer.json: not a JSON object but a list"): load_tokenizer(f)
  f.write_text('{"model": ' + "1" * 5000 + "}")
  with pytest.raises(CheckpointError, match="tokenizer.json: unreadable JSON"): load_tokenizer(f)
  f.write_text(json.dumps(byte_level_json()))
  (tmp_path / "tokenizer_config.json").write_text("[]")
  with pytest.raises(CheckpointError, match="tokenizer_config.json: not a JSON object but a list"): load_tokenizer(tmp_path)
  for config, message in (({"bos_token": ["<s>"]}, "bos_token is a list, not a token string"), ({"chat_template": 5}, "chat_template is not a string"),
                          ({"chat_template": [5]}, None)):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if message is None: assert load_tokenizer(tmp_path).chat_template is None
    else:
      with pytest.raises(CheckpointError, match=message): load_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").unlink()
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
  with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id"): load_tokenizer(tmp_path)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
  with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id .* not a token"): load_tokenizer(tmp_path)

def gguf_kv(**changes) -> dict:
  tok = byte_level_json()
  names = [""] * (len(tok["model"]["vocab"]) + 3)
  for t, i in tok["model"]["vocab"].items(): names[i] = t
  for a in tok["added_tokens"]: names[a["id"]] = a["content"]
  kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": names,
        "tokenizer.ggml.token_type": [1] * (len(names) - 3) + [3] * 3, "tokenizer.ggml.merges": tok["model"]["merges"],
        "tokenizer.ggml.bos_token_id": len(names) - 3, "tokenizer.ggml.eos_token_id": len(names) - 1}
  return {k: v for k, v in {**kv, **changes}.items() if v is not DELETE}

BAD_GGUF = {
  "no tokens": (dict(**{"tokenizer.ggml.tokens": DELETE}), "m.gguf: no tokenizer.ggml.tokens"),
  "tokens a string": (dict(**{"tokenizer.ggml.tokens": "abc"}), "tokenizer.ggml.tokens is a string, not a list"),
  "token a number": (dict(**{"tokenizer.ggml.tokens": [1, 2]}), r"tokenizer.ggml.tokens\[0\] is a int"),
  "types strings": (dict(**{"tokenizer.ggml.token_type": ["3"] * 263}), "token_type must be 263 integers"),
  "types short": (dict(**{"tokenizer.ggml.token_type": [1]}), "token_type must be 263 integers"),
  "merges numbers": (dict(**{"tokenizer.ggml.merges": [1.5]}), r"merges\[0\]"),
  "pre a list": (dict(**{"tokenizer.ggml.pre": ["gpt2"]}), "tokenizer.ggml.pre is a list, not a string"),
  "bos past the end": (dict(**{"tokenizer.ggml.bos_token_id": 10**12}), "bos_token_id 1000000000000 is not a token id"),
  "eos a string": (dict(**{"tokenizer.ggml.eos_token_id": "2"}), "eos_token_id is a string, not an integer"),
  "eot negative": (dict(**{"tokenizer.ggml.eot_token_id": -5}), "eot/eom_token_id -5 is not a token id"),
  "template a number": (dict(**{"tokenizer.chat_template": 7}), "tokenizer.chat_template is an integer, not a string"),
}

@pytest.mark.parametrize("case", BAD_GGUF)
def test_malformed_gguf_metadata(bounded, case):
  changes, message = BAD_GGUF[case]
  with pytest.raises(CheckpointError, match=message): Tokenizer.from_gguf_metadata(gguf_kv(**changes), "m.gguf")

def test_gguf_kv_is_valid():
  tok = Tokenizer.from_gguf_metadata(gguf_kv())
  assert tok.encode("hello <|im_end|>", allow_special=True) == Tokenizer.from_hf_json(byte_level_json()).encode("hello <|im_end|>", allow_special=True)

def test_malformed_tiktoken_model(bounded, tmp_path):
  import base64
  f = tmp_path / "tokenizer.model"
  lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
  f.write_text("\n".join(lines + ["aGU= 1000000000000"]) + "\n")
  with pytest.raises(CheckpointError, match="tokenizer.model: the ranks has token id 1000000000000, past the 257 tokens"): load_tokenizer(f)
  f.write_text("\n".join(lines + ["aGU= 5"]) + "\n")
  with pytest.raises(CheckpointError, match="line 257: rank 5 is negative or another token's too"): load_tokenizer(f)
  f.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b - 1}\n" for b in range(1, 256)))
  with pytest.raises(CheckpointError, match="byte 0x00 has no token"): load_tokenizer(f)
  f.write_text("\n".join(lines) + "\n")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"300": "<x>"}}))
  with pytest.raises(CheckpointError, match=r"added_tokens_decoder\['300'\] is not an id"): load_tokenizer(f)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "<x>"}}}))
  with pytest.raises(CheckpointError, match="special token id 5 is also a token's rank"): load_tokenizer(f)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {str(10**12): {"content": "<x>"}}}))
  with pytest.raises(CheckpointError, match="added_tokens_decoder has token id 1000000000000"): load_tokenizer(f)
  (tmp_path / "tokenizer_config.json").unlink()
  assert load_tokenizer(f).decode(load_tokenizer(f).encode("hi there")) == "hi there"
