"""The OpenAI-compatible server, for real: uvicorn in a thread of this process on a free port of 127.0.0.1, the default
model (SmolLM2-135M-Instruct) behind it, the official `openai` client (and httpx for what it cannot send) in front."""
import asyncio, json, os, shutil, tempfile, time
import httpx, numpy as np, pytest
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
import tg_llama
from tg_llama.chat_template import encode_chat
from tg_llama.cli import warm_up, warm_up_batches
from tg_llama.engine.engine import Request
from tg_llama.serve.app import create_app
from conftest import serving

MODEL_ID, SLOTS, CONTEXT = "smollm2-test", 2, 512
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

class Served:
  def __init__(self, model, url): self.model, self.url, self.tok = model, url, model.tokenizer
  def client(self, **kw): return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)
  def health(self) -> dict: return httpx.get(self.url + "/health").json()
  def greedy(self, ids: list[int], n: int) -> list[int]:
    return list(self.model.generate(ids, n, stop_ids=self.tok.stop_ids))

@pytest.fixture(scope="module")
def served(smollm2_gguf):
  model = tg_llama.load(smollm2_gguf, max_context=CONTEXT, slots=SLOTS)
  warm_up(model)
  warm_up_batches(model, SLOTS)
  with serving(create_app(model, MODEL_ID)) as url: yield Served(model, url)

def wait_idle(served, timeout=15.0) -> dict:
  deadline = time.monotonic() + timeout
  while (h := served.health())["free_slots"] != SLOTS or h["running"] or h["waiting"]:
    assert time.monotonic() < deadline, f"slots still busy: {h}"
    time.sleep(0.05)
  return h

# *** answers ***

def test_models(served):
  models = served.client().models.list()
  assert [m.id for m in models.data] == [MODEL_ID] and models.data[0].object == "model"
  h = served.health()
  assert h["status"] == "ok" and h["slots"] == SLOTS

def test_chat_greedy_equals_the_engine_streamed_or_not(served):
  ids = encode_chat(served.tok, QUESTION)
  want = served.greedy(ids, 24)
  text = served.tok.decode([t for t in want if t not in served.tok.stop_ids])
  r = served.client().chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=24, temperature=0)
  assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
  assert r.choices[0].finish_reason == ("stop" if want[-1] in served.tok.stop_ids else "length")
  assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), len(want), len(ids) + len(want))
  assert "Paris" in text
  chunks = list(served.client().chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=24, temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
  assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [r.choices[0].finish_reason]
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
  assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix was in a slot

def test_completions_greedy_equals_the_engine_streamed_or_not(served):
  prompt = "The capital of France is"
  ids = ([served.tok.bos_id] if served.tok.add_bos and served.tok.bos_id is not None else []) + served.tok.encode(prompt)
  want = served.greedy(ids, 12)
  assert served.tok.stop_ids.isdisjoint(want)
  r = served.client().completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
  assert r.choices[0].text == served.tok.decode(want) and r.choices[0].finish_reason == "length"
  assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
  chunks = list(served.client().completions.create(model=MODEL_ID, prompt=ids, max_tokens=12, temperature=0, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text and chunks[-1].choices[0].finish_reason == "length"

def test_seeded_sampling_repeats(served):
  kw = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, presence_penalty=0.5)
  a, b = (served.client().completions.create(**kw).choices[0].text for _ in range(2))
  assert a == b

# *** stop strings ***

def test_stop_strings_across_token_boundaries(served):
  prompt = "The capital of France is"
  full = served.client().completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
  ids = served.tok.encode(full)
  pieces = [served.tok.decode([t]) for t in ids]
  # a stop string made of the end of one token and the start of the next, both with letters in them
  i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
  stop = pieces[i][-2:] + pieces[i + 1][:2]
  want = full[:full.index(stop)]
  for stops in (stop, [stop, "never appears"]):
    r = served.client().completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0, stop=stops)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(served.client().completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0, stop=stops, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
  wait_idle(served)  # the request ended by a stop string gave its slot back

# *** logprobs ***

def engine_logprobs(served, ids, n, k):
  outs = list(served.model.engine.submit(Request(tuple(ids), n, stop_ids=served.tok.stop_ids, logprobs=k)))
  return [(o.token, o.logprob, o.top_logprobs) for o in outs if o.token not in served.tok.stop_ids]

def test_chat_logprobs_equal_the_engine(served):
  ids = encode_chat(served.tok, QUESTION)
  want = engine_logprobs(served, ids, 8, 3)
  r = served.client().chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
  got = r.choices[0].logprobs.content
  assert [g.token for g in got] == [served.tok.token_str(t) for t, _, _ in want]
  for g, (t, lp, top) in zip(got, want):
    assert g.bytes == list(served.tok.token_bytes(t)) and np.isclose(g.logprob, lp, atol=1e-4)
    assert [x.token for x in g.top_logprobs] == [served.tok.token_str(u) for u, _ in top]
    assert np.allclose([x.logprob for x in g.top_logprobs], [v for _, v in top], atol=1e-4)
  # and the engine's are the model's: the first token's logprob from the prompt's logits
  logits = served.model.logits(ids).astype(np.float64)
  assert np.isclose(want[0][1], logits[want[0][0]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max(), atol=1e-3)

def test_completion_logprobs_streamed(served):
  ids = served.tok.encode("The capital of France is")
  want = engine_logprobs(served, ids, 6, 2)
  chunks = list(served.client().completions.create(model=MODEL_ID, prompt=ids, max_tokens=6, temperature=0, logprobs=2, stream=True))
  got = [(tok, lp, top) for c in chunks for tok, lp, top in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs,
                                                                c.choices[0].logprobs.top_logprobs)]
  assert [g[0] for g in got] == [served.tok.token_str(t) for t, _, _ in want]
  assert np.allclose([g[1] for g in got], [lp for _, lp, _ in want], atol=1e-4)
  assert all(len(g[2]) == 2 and g[0] in g[2] for g in got)  # greedy: the chosen token is among the most likely

# *** errors ***

def post(served, path, body, **kw):
  return httpx.post(served.url + path, content=body if isinstance(body, (str, bytes)) else json.dumps(body), **kw)

def error_of(r, status, param=None, code=None) -> dict:
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"] and (err["param"], err["code"]) == (param, code), err
  return err

@pytest.mark.parametrize("body, param", [
  ("{not json", None), ('["a list"]', None), ({"messages": QUESTION}, "model"), ({"model": MODEL_ID}, "messages"),
  ({"model": MODEL_ID, "messages": "hi"}, "messages"), ({"model": MODEL_ID, "messages": [{"role": "user"}]}, "messages[0].content"),
  ({"model": MODEL_ID, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
  ({"model": MODEL_ID, "messages": QUESTION, "temperature": "hot"}, "temperature"),
  ({"model": MODEL_ID, "messages": QUESTION, "temperature": 3}, "temperature"),
  ({"model": MODEL_ID, "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
  ({"model": MODEL_ID, "messages": QUESTION, "max_tokens": True}, "max_tokens"),
  ({"model": MODEL_ID, "messages": QUESTION, "stop": 3}, "stop"),
  ({"model": MODEL_ID, "messages": QUESTION, "stream": "yes"}, "stream"),
  ({"model": MODEL_ID, "messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
  ({"model": MODEL_ID, "messages": QUESTION, "n": 2}, "n"),
  ({"model": MODEL_ID, "messages": QUESTION, "logit_bias": {"50": 5}}, "logit_bias"),
  ({"model": MODEL_ID, "messages": QUESTION, "functions": [{"name": "f"}]}, "functions"),
  ({"model": MODEL_ID, "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
  ({"model": MODEL_ID, "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
  ({"model": MODEL_ID, "messages": QUESTION, "tool_choice": "required"}, "tool_choice"),
  ({"model": MODEL_ID, "messages": QUESTION, "response_format": {"type": "yaml"}}, "response_format"),
  ({"model": MODEL_ID, "messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
   "response_format"),
  ({"model": MODEL_ID, "messages": QUESTION, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
  ({"model": MODEL_ID, "messages": QUESTION, "guided_grammar": "start: undefined_rule"}, "guided_grammar"),
  ({"model": MODEL_ID, "messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
   "messages[0].tool_calls"),
])
def test_bad_chat_requests_are_400(served, body, param):
  err = error_of(post(served, "/v1/chat/completions", body), 400, param)
  assert err["type"] == "invalid_request_error"
  if param: assert param.split("[")[0].split(".")[0] in err["message"]

@pytest.mark.parametrize("extra, param", [({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"),
                                          ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 10**9]}, "prompt"), ({"logprobs": 50}, "logprobs")])
def test_bad_completion_requests_are_400(served, extra, param):
  error_of(post(served, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", **extra}), 400, param)

def test_the_openai_client_sees_the_errors(served):
  with pytest.raises(openai.BadRequestError, match="'n' is not supported"):
    served.client().chat.completions.create(model=MODEL_ID, messages=QUESTION, n=2)
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    served.client().chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2)

def test_unknown_fields_are_ignored(served):
  r = served.client().completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2, temperature=0, extra_body={"a_field_from_the_future": 1})
  assert r.usage.completion_tokens <= 2

def test_context_length_exceeded(served):
  long = [{"role": "user", "content": "word " * 600}]
  error_of(post(served, "/v1/chat/completions", {"model": MODEL_ID, "messages": long}), 400, "messages", "context_length_exceeded")
  error_of(post(served, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": CONTEXT}), 400, "max_tokens", "context_length_exceeded")
  # a streamed request fails the same way: a plain JSON error, not an event
  r = post(served, "/v1/chat/completions", {"model": MODEL_ID, "messages": long, "stream": True})
  assert r.headers["content-type"].startswith("application/json")
  error_of(r, 400, "messages", "context_length_exceeded")

def test_unknown_model_and_route_are_404(served):
  error_of(post(served, "/v1/chat/completions", {"model": "gpt-4o", "messages": QUESTION}), 404, "model", "model_not_found")
  assert httpx.get(served.url + "/v1/nothing").status_code == 404 and "error" in httpx.get(served.url + "/v1/nothing").json()

def test_full_queue_is_503_with_retry_after(served):
  engine = served.model.engine
  saved, engine.max_waiting = engine.max_waiting, 0
  try: r = post(served, "/v1/chat/completions", {"model": MODEL_ID, "messages": QUESTION, "max_tokens": 2, "stream": True})
  finally: engine.max_waiting = saved
  err = error_of(r, 503, None, "overloaded")
  assert err["type"] == "server_error" and r.headers["retry-after"] == "1"
  with pytest.raises(openai.APIStatusError) as e:
    engine.max_waiting = 0
    try: served.client().completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2)
    finally: engine.max_waiting = saved
  assert e.value.status_code == 503

# *** disconnects and load ***

def test_a_client_gone_mid_stream_frees_its_slot(served):
  body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400, "stream": True}
  with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as r:
    lines = r.iter_lines()
    assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data: ")) >= 3
    assert served.health()["running"] == 1
  start = time.monotonic()
  wait_idle(served, timeout=10)
  assert time.monotonic() - start < 10

def test_load_40_requests_8_at_once_a_quarter_cancelled(served):
  async def main():
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    gate, results = asyncio.Semaphore(8), []
    async def one(i: int):
      async with gate:
        prompt = f"Count from {i} to {i + 20}:"
        stream = await client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5 + i % 3, temperature=0.7, seed=i,
                                                 stream=True, stream_options={"include_usage": True})
        chunks, hang_up = [], False
        async for c in stream:
          chunks.append(c)
          if hang_up := i % 4 == 0 and len(chunks) == 2: break  # this client hangs up mid-stream
        if hang_up:
          await stream.close()  # out of the loop: closed inside it, the stream's generator is finalized while it runs
          return results.append(("cancelled", chunks))
        results.append(("done", chunks))
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), 240)  # ~10 s on an idle machine
    await client.close()
    return results
  results = asyncio.run(main())
  assert len(results) == 40 and sum(kind == "cancelled" for kind, _ in results) == 10
  for kind, chunks in results:
    if kind == "cancelled": continue
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"]) and chunks[-1].choices == []
    u = chunks[-1].usage
    assert 1 <= u.completion_tokens <= 7 and u.total_tokens == u.prompt_tokens + u.completion_tokens
  wait_idle(served, timeout=15)

# *** the chat page in a browser ***

def test_the_chat_page_streams_an_answer(served):
  if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("the browser test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.common.exceptions import TimeoutException
  from selenium.webdriver.support.ui import WebDriverWait
  opts = webdriver.ChromeOptions()
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"): opts.add_argument(arg)
  opts.binary_location = shutil.which("chromium")
  # chromium's profile and temporary folders in one of ours, removed afterwards (a killed chromium leaves its own in /tmp);
  # a short path, as its singleton socket's must fit a unix socket address (108 bytes), which pytest's tmp_path need not
  tmp = tempfile.TemporaryDirectory(prefix="tg-chromium-")
  opts.add_argument(f"--user-data-dir={tmp.name}/profile")
  driver = webdriver.Chrome(service=Service(shutil.which("chromedriver"), env={**os.environ, "TMPDIR": tmp.name}), options=opts)
  try:
    driver.get(served.url + "/")
    assert MODEL_ID in driver.find_element(By.ID, "model").text
    driver.find_element(By.ID, "max").clear()
    driver.find_element(By.ID, "max").send_keys("24")  # short answers: this machine is slow and shared
    def wait_answer(n: int):  # the n-th answer, streamed to its end
      done = lambda d: len(answer(d)) == n and answer(d)[-1].text.strip() and d.find_element(By.ID, "send").is_enabled()
      try: WebDriverWait(driver, 60).until(done)
      except TimeoutException: raise AssertionError(f"page: {driver.find_element(By.ID, 'log').text!r}, console: {driver.get_log('browser')}") from None
    box = driver.find_element(By.ID, "input")
    box.send_keys("What is the capital of France?")
    driver.find_element(By.ID, "send").click()
    answer = lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    wait_answer(1)
    first = answer(driver)[-1].text
    assert "error" not in answer(driver)[-1].get_attribute("class") and len(first) > 3
    assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "What is the capital of France?"
    # a second turn keeps the conversation; New chat clears it
    box.send_keys("And of Spain?")
    driver.find_element(By.ID, "send").click()
    wait_answer(2)
    assert driver.execute_script("return messages.length") == 4
    driver.find_element(By.ID, "new").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".msg") == [] and driver.execute_script("return messages.length") == 0
  finally:
    driver.quit()
    tmp.cleanup()
  wait_idle(served)
