"""Structured output: token masks against references computed here from the token bytes and numpy, constrained
generation in the engine next to unconstrained, and JSON schemas and tool calls through the server with the official
`openai` client, every answer checked by the `jsonschema` library. The default model (SmolLM2-135M-Instruct) throughout."""
import json, re
import numpy as np, pytest
from tinygrad import Tensor
import tg_llama
from tg_llama import cli, constraint
from tg_llama.chat_template import encode_chat
from tg_llama.cli import warm_up, warm_up_batches
from tg_llama.engine.engine import Request
from tg_llama.errors import InvalidArgumentError
from tg_llama.sampling import mask_logits
from tg_llama.serve.tools import CallSplitter, Tool, parse_calls
from tg_llama.tokenizer import load_tokenizer
from conftest import serving

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
MODEL_ID = "smol"

@pytest.fixture(scope="module")
def model(smollm2_gguf):
  m = tg_llama.load(smollm2_gguf, max_context=512, slots=2)
  warm_up(m)
  warm_up_batches(m, 2)
  return m

@pytest.fixture(scope="module")
def client(model):
  from tg_llama.serve.app import create_app
  with serving(create_app(model, MODEL_ID)) as url: yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

def bits(row: np.ndarray, vocab: int) -> np.ndarray:  # numpy's own reading of the little-endian bit layout
  return np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab].astype(bool)

# *** masks ***

def test_mask_logits_matches_numpy():
  rng = np.random.default_rng(0)
  mask, logits = rng.integers(-2**31, 2**31, size=(3, 4), dtype=np.int64).astype(np.int32), rng.standard_normal((3, 100)).astype(np.float32)
  mask[1] = -1  # a row that allows everything
  got = mask_logits(Tensor(logits), Tensor(mask)).numpy()
  want = np.where(np.stack([bits(r, 100) for r in mask]), logits, -np.inf)
  np.testing.assert_array_equal(got, want)
  assert np.isfinite(got[1]).all()

def test_a_choice_allows_exactly_the_tokens_that_begin_a_choice(smollm2_gguf):
  tok = load_tokenizer(smollm2_gguf)
  choices = ["yes", "no", "maybe not"]
  m = constraint.compile(tok, choice=choices).matcher()
  row = np.zeros(constraint.words(tok.vocab_size), dtype=np.int32)
  m.fill(row)
  specials = set(tok.special_tokens.values())
  want = {t for t, p in enumerate(tok.pieces) if p and t not in specials and any(c.encode().startswith(p) for c in choices)}
  assert set(np.flatnonzero(bits(row, tok.vocab_size))) == want
  for t in tok.encode("maybe"): assert m.consume(t)
  m.fill(row)
  # the rest is forced: llguidance then allows its canonical first token (and may drop the others that spell it)
  allowed = set(np.flatnonzero(bits(row, tok.vocab_size)))
  assert tok.encode(" not")[0] in allowed <= {t for t, p in enumerate(tok.pieces) if p and t not in specials and b" not".startswith(p)}
  for t in tok.encode(" not"): assert m.consume(t)
  assert m.done

def test_end_of_sequence_only_where_the_grammar_can_end(smollm2_gguf):
  tok = load_tokenizer(smollm2_gguf)
  m = constraint.compile(tok, regex="ab+(cd)?").matcher()
  row = np.zeros(constraint.words(tok.vocab_size), dtype=np.int32)
  ends = lambda: {int(t) for t in np.flatnonzero(bits(row, tok.vocab_size))} & tok.stop_ids
  m.fill(row)
  assert not ends()
  for t in tok.encode("abb"): assert m.consume(t)
  m.fill(row)
  assert ends() == set(tok.stop_ids)  # "abb" is complete, and may go on with b or cd
  for t in tok.encode("cd"): assert m.consume(t)
  assert m.done

@pytest.mark.parametrize("kw, match", [({"json_schema": {"not": {"type": "string"}}}, "not"), ({"json_schema": "{oops"}, "not valid JSON"),
                                       ({"grammar": "start: missing"}, "missing"), ({"choice": []}, "non-empty"),
                                       ({"regex": "a", "choice": ["a"]}, "exactly one")])
def test_bad_constraints_are_one_line_errors(smollm2_gguf, kw, match):
  with pytest.raises(InvalidArgumentError, match=match) as e: constraint.compile(load_tokenizer(smollm2_gguf), **kw)
  assert "\n" not in str(e.value)

def test_objects_that_list_their_properties_are_closed():
  schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}, "c": {"type": "object"}},
            "allOf": [{"properties": {"d": {}}}], "patternProperties": {}}
  got = constraint.closed(schema)
  assert "additionalProperties" not in got and got["properties"]["a"]["additionalProperties"] is False
  assert "additionalProperties" not in got["properties"]["c"] and got["allOf"] == schema["allOf"]

# *** the engine ***

def test_constrained_greedy_is_unconstrained_greedy_where_that_fits(model):
  tok = model.tokenizer
  ids = encode_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
  free = list(model.generate(ids, 20, stop_ids=tok.stop_ids))
  text = tok.decode([t for t in free if t not in tok.stop_ids])
  assert text
  # a regex of the characters the free answer uses: the free answer satisfies it, so constrained greedy must be the same
  rule = constraint.compile(tok, regex="[" + "".join(re.escape(c) for c in sorted(set(text))) + "]*")
  other = encode_chat(tok, [{"role": "user", "content": "Name a color."}])
  together = [model.engine.submit(Request(tuple(ids), 20, stop_ids=tok.stop_ids, constraint=rule)),
              model.engine.submit(Request(tuple(other), 20, stop_ids=tok.stop_ids))]
  outs = [[o.token for o in h if o.token is not None] for h in together]
  assert outs[0] == free
  assert outs[1] == list(model.generate(other, 20, stop_ids=tok.stop_ids))

def test_json_schema_in_the_python_api(model):
  schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["answer"]}
  ids = encode_chat(model.tokenizer, [{"role": "user", "content": "What is 2+2?"}])
  chunks = list(model.stream(ids, 64, json_schema=schema))
  jsonschema.validate(json.loads("".join(c.text for c in chunks)), schema)
  assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])

def test_cli_generate_json_schema(model, smollm2_gguf, tmp_path, capsys):
  schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"enum": ["France", "Italy"]}},
            "required": ["city", "country"]}
  (tmp_path / "s.json").write_text(json.dumps(schema))
  assert cli.main(["generate", "--model", str(smollm2_gguf), "--chat", "--prompt", "Where is Paris?", "--json-schema", str(tmp_path / "s.json"),
                   "--max-new-tokens", "64", "--max-context", "256"]) == 0
  jsonschema.validate(json.loads(capsys.readouterr().out), schema)

# *** the server ***

SCHEMAS = [
  ("Describe a person named Alice who is 30.", {"type": "object", "required": ["name", "age"], "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}),
  ("List three fruits with their colors.", {"type": "object", "required": ["fruits"], "properties": {"fruits": {
    "type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "required": ["name", "color"], "properties": {
      "name": {"type": "string", "maxLength": 20}, "color": {"enum": ["red", "yellow", "green", "orange"]}}}}}}),
  ("Give a US phone number and a zip code.", {"type": "object", "required": ["phone", "zip"], "properties": {
    "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{3}-[0-9]{4}$"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}),
  ("Rate the movie Alien.", {"type": "object", "required": ["title", "rating", "review"], "properties": {
    "title": {"type": "string", "maxLength": 40}, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "review": {"type": "object", "required": ["good", "bad"], "properties": {"good": {"type": "boolean"}, "bad": {"type": "null"}}}}}),
]

@pytest.mark.parametrize("question, schema", SCHEMAS)
def test_json_schema_answers_validate(client, question, schema):
  r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": question}], max_tokens=200, temperature=0.7, seed=1,
                                     response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
  assert r.choices[0].finish_reason == "stop"
  jsonschema.validate(json.loads(r.choices[0].message.content), schema)

def test_json_object_streamed(client):
  chunks = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Give the name and age of a cat as JSON."}],
                                          max_tokens=300, temperature=0, stream=True, response_format={"type": "json_object"})
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert isinstance(json.loads(text), dict)

def test_guided_choice_and_regex(client):
  ask = lambda **kw: client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=20,
                                                    extra_body=kw).choices[0].message.content
  assert ask(guided_choice=["yes", "no"]) in ("yes", "no")
  assert re.fullmatch(r"(Yes|No), [a-z ]{1,12}\.", ask(guided_regex=r"(Yes|No), [a-z ]{1,12}\."))

TOOLS = [
  {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}},
  {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

@pytest.mark.parametrize("question", ["What is the weather in Paris?", "What is 17 plus 25?", "Hello!"])
def test_tool_choice_required_calls_a_listed_tool(client, question):
  r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": question}], tools=TOOLS, tool_choice="required",
                                     max_tokens=100, temperature=0)
  choice = r.choices[0]
  assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
  call = choice.message.tool_calls[0]
  assert call.type == "function" and call.id.startswith("call_")
  jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])

def test_a_tool_result_fed_back_gives_an_answer(client):
  messages = [{"role": "user", "content": "What is the weather in Paris?"}]
  r = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                     max_tokens=100, temperature=0)
  call = r.choices[0].message.tool_calls[0]
  assert call.function.name == "get_weather"
  messages += [r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
  r = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=60, temperature=0)
  answer = r.choices[0].message
  assert r.choices[0].finish_reason in ("stop", "length") and not answer.tool_calls
  assert "sunny" in answer.content.lower() and "<tool_response>" not in answer.content  # written from the result, not a copy of it

def test_streamed_tool_call_deltas_reassemble(client):
  chunks = list(client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "What is 17 plus 25?"}], tools=TOOLS,
                                               tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=60, stream=True))
  calls: dict[int, dict] = {}
  for c in chunks:
    for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
      call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
      call["id"] = call["id"] or d.id
      call["name"] += d.function.name or ""
      call["arguments"] += d.function.arguments or ""
  assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
  assert list(calls) == [0] and calls[0]["name"] == "add" and calls[0]["id"].startswith("call_")
  jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMS["add"])

# *** tool calls in text ***

def test_calls_are_split_from_text_at_any_chunking():
  tools = [Tool("add", "", PARAMS["add"])]
  text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
  for cut in range(1, len(text)):
    s = CallSplitter()
    content = s.add(text[:cut]) + s.add(text[cut:])
    held, called = s.finish()
    assert content + held == "Let me add.\n" and called.startswith("<tool_call>")
    (call,) = parse_calls(called, tools)
    assert (call.name, json.loads(call.arguments)) == ("add", {"a": 1, "b": 2})
  s = CallSplitter()
  assert s.add("a <tool_") == "a " and s.finish() == ("<tool_", "")  # a tag that never came is text
  assert parse_calls('<tool_call>{"name": "sub", "arguments": {}}</tool_call>', tools) is None  # not a listed tool
  # Llama 3.1's format: the whole answer a bare JSON call, held from its first character
  s = CallSplitter()
  assert s.add(" \n") == "" and s.add('{"name": "add", ') == "" and s.add('"parameters": {"a": 5, "b": 6}}') == ""
  held, called = s.finish()
  assert held == "" and [(c.name, json.loads(c.arguments)) for c in parse_calls(called, tools)] == [("add", {"a": 5, "b": 6})]
  s = CallSplitter()
  assert s.add("  {not a call}") == "" and parse_calls(s.finish()[1], tools) is None  # then it is text (Generation)
  s = CallSplitter()
  assert s.add("  The sum {is} 3") == "  The sum {is} 3"
  assert parse_calls('<tool_call>{"name": "add", "arguments": {"a": 1', tools) is None  # cut short

def test_a_template_that_renders_tools_gets_them_as_transformers_passes_them(smollm2_gguf):
  from tg_llama.serve.protocol import parse
  tok = load_tokenizer(smollm2_gguf)
  tok.chat_template = ("{% if tools %}TOOLS {{ tools | tojson }}{{ '\\n' }}{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}"
                       "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{{ '\\n' }}{% endfor %}")
  messages = [{"role": "user", "content": "Add 1 and 2."},
              {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
  job = parse({"model": "m", "messages": messages, "tools": TOOLS[1:]}, True, tok, "m", 4096)
  text = tok.decode(list(job.request.prompt))
  assert text == (f"TOOLS {json.dumps(TOOLS[1:], separators=(', ', ': '))}\n"
                  'user: Add 1 and 2.\nassistant: CALL add {"a": 1, "b": 2}\ntool: 3\n')
  assert job.tools == (Tool("add", "Add two integers", PARAMS["add"]),) and job.request.constraint is None

def test_a_required_format_is_never_taken_for_a_call(smollm2_gguf):
  from tg_llama.serve.protocol import parse
  tok = load_tokenizer(smollm2_gguf)
  body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS}
  assert len(parse(body, True, tok, "m", 4096).tools) == 2
  assert parse(body | {"response_format": {"type": "json_object"}}, True, tok, "m", 4096).tools == ()
  assert parse(body | {"tool_choice": "none"}, True, tok, "m", 4096).tools == ()

@pytest.mark.parametrize("kw", [{"regex": "(a{1,1000}){1,1000}"}, {"regex": "(a|b)*a(a|b){25}"}, {"json_schema": {"enum": [f"v{i}" for i in range(50000)]}},
                                {"json_schema": json.loads('{"type": "array", "items": ' * 200 + '{"type": "integer"}' + "}" * 200)},
                                {"grammar": 'start: x\nx: "(" x ")" | "a"'}])
def test_hostile_constraints_compile_or_are_refused_without_hanging(smollm2_gguf, kw):
  import time
  tok, start = load_tokenizer(smollm2_gguf), time.monotonic()
  try: m = constraint.compile(tok, **kw).matcher()
  except InvalidArgumentError as e: assert "\n" not in str(e)
  else:
    row = np.zeros(constraint.words(tok.vocab_size), dtype=np.int32)
    m.fill(row)
    assert bits(row, tok.vocab_size).any() and m.error is None
  assert time.monotonic() - start < 20  # a guard against a hang, not a speed test (each takes well under a second here)
