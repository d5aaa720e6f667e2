"""`tg-llama serve` as a process: the API key, and SIGTERM (open streams end with an error event, the process exits 0)."""
import json, os, signal, subprocess, sys, time
import httpx, pytest
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from conftest import REPO, free_port

KEY = "sekrit-key"

@pytest.fixture(scope="module")
def server():
  port = free_port()
  env = {**os.environ, "DEV": "CPU", "TG_LLAMA_API_KEY": KEY}
  # a session of its own: the test's signal reaches the server only, not tinygrad's compile workers (as a terminal's would)
  proc = subprocess.Popen([sys.executable, "-m", "tg_llama.cli", "serve", "--port", str(port), "--slots", "1", "--max-context", "512",
                           "--model-id", "smol"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
  url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
  while True:
    assert proc.poll() is None, f"tg-llama serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}"
    assert time.monotonic() < deadline, "tg-llama serve did not start listening"
    try:
      if httpx.get(url + "/health").status_code == 200: break
    except httpx.TransportError: time.sleep(0.2)
  yield proc, url
  if proc.poll() is None:
    proc.kill()
    proc.wait()

def test_the_api_key_guards_v1(server):
  _, url = server
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
    r = httpx.get(url + "/v1/models", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  r = httpx.post(url + "/v1/chat/completions", json={"model": "smol", "messages": [{"role": "user", "content": "Hi"}]})
  assert r.status_code == 401  # before the body is even looked at
  assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200  # not under /v1
  client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
  assert [m.id for m in client.models.list().data] == ["smol"]
  r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=4, temperature=0)
  assert r.choices[0].message.content and r.usage.completion_tokens <= 4
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()

def test_sigterm_ends_open_streams_and_exits_0(server):
  proc, url = server
  body = {"model": "smol", "messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 400, "stream": True}
  with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
    events = []
    for line in r.iter_lines():
      if line.startswith("data: "): events.append(line[6:])
      if len(events) == 3: proc.send_signal(signal.SIGTERM)
  assert events[-1] == "[DONE]"
  last = json.loads(events[-2])
  assert last["error"]["type"] == "server_error" and "shutting down" in last["error"]["message"]
  assert all("choices" in json.loads(e) for e in events[:-2])
  assert proc.wait(60) == 0
  log = proc.stderr.read()
  assert "CPU kernel choices: " in log and ("tg-llama tune" in log or "tuned for" in log)  # the tune's state, said at start
  with pytest.raises(httpx.TransportError): httpx.get(url + "/health")  # it is gone
