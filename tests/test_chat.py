"""examples/chat.py driven as a person would: in a terminal (pexpect), and through a pipe; the answers are checked
against transformers' greedy decoding of the same GGUF, prompted through its own chat template."""
import os, subprocess, sys
import pexpect
import pytest
import torch
from conftest import REPO

# greedy, and no repetition penalty (chat's default is 1.05), so transformers' plain argmax is the reference
CHAT = [sys.executable, str(REPO / "examples" / "chat.py"), "--temperature", "0", "--repetition-penalty", "1", "--max-context", "1024"]
ENV = {**os.environ, "DEV": os.environ.get("DEV", "CPU")}

@pytest.fixture(scope="module")
def reference(smollm2_gguf):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  kw = dict(gguf_file=smollm2_gguf.name)
  tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw)
  return tok, AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32, **kw).eval()

def greedy_text(reference, ids: list[int], n: int, stops: set[int]) -> str:
  """transformers' greedy continuation of `ids` by full forward passes, up to n tokens or a stop token (not printed)."""
  tok, model = reference
  out = []
  with torch.no_grad():
    for _ in range(n):
      if (t := int(model(torch.tensor([ids + out])).logits[0, -1].argmax())) in stops: break
      out.append(t)
  return tok.decode(out)

def chat_answer(reference, question: str, n: int) -> str:
  tok, _ = reference
  ids = list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True)["input_ids"])
  return greedy_text(reference, ids, n, {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})

def test_piped_chat_answers_and_exits_on_eof(reference):
  r = subprocess.run(CHAT + ["--max-new-tokens", "24"], input="What is 2+2?\n", capture_output=True, text=True, timeout=600, env=ENV)
  assert r.returncode == 0, r.stderr
  assert r.stdout == chat_answer(reference, "What is 2+2?", 24) + "\n"
  assert "Traceback" not in r.stderr

def test_terminal_chat_streams_and_ctrl_c_returns_to_prompt(reference, tmp_path):
  # nothing cached: the warm-up (about a minute on 2 cores) runs while the first message is typed, and a message sent
  # before it ends waits for it, saying so; Ctrl-C while it waits returns to the prompt, the warm-up going on
  child = pexpect.spawn(CHAT[0], CHAT[1:] + ["--max-new-tokens", "300"], env={**ENV, "TG_LLAMA_CACHE": str(tmp_path)}, encoding="utf-8", timeout=300)
  try:
    child.expect_exact(">>> ")
    child.sendline("What is 2+2?")
    child.expect_exact("compiling kernels (fast after the first run on this backend)...")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    child.sendline("What is 2+2?")
    child.expect_exact("compiling kernels (fast after the first run on this backend)...")
    child.expect_exact(chat_answer(reference, "What is 2+2?", 24).replace("\n", "\r\n"))  # a terminal writes \r\n
    child.expect_exact(">>> ")
    child.sendline("Write a very long story about a dragon who learns to cook.")
    child.expect(r"\w+ \w+ \w+ \w+")  # it is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect_exact("[history cleared]")
    child.sendeof()
    child.expect(pexpect.EOF)
  finally: child.close()
  assert child.exitstatus == 0

def test_generate_command(reference):
  prompt = "The capital of France is"
  r = subprocess.run([sys.executable, "-m", "tg_llama.cli", "generate", "--prompt", prompt, "--max-new-tokens", "4"],
                     capture_output=True, text=True, timeout=600, env=ENV)
  assert r.returncode == 0, r.stderr
  tok, _ = reference
  expected = greedy_text(reference, tok.encode(prompt), 4, {tok.eos_token_id})
  assert r.stdout == prompt + expected + "\n" and "Paris" in expected
