"""examples/chat.py driven as a person would: in a terminal (pexpect), and through a pipe."""
import os, subprocess, sys
import pexpect
import pytest
from conftest import REPO

CHAT = [sys.executable, str(REPO / "examples" / "chat.py"), "--temperature", "0", "--max-context", "1024"]
ENV = {**os.environ, "DEV": os.environ.get("DEV", "CPU")}

def test_piped_chat_answers_and_exits_on_eof(smollm2_gguf):
  r = subprocess.run(CHAT + ["--max-new-tokens", "24"], input="What is 2+2?\n", capture_output=True, text=True, timeout=600, env=ENV)
  assert r.returncode == 0, r.stderr
  assert "4" in r.stdout
  assert "Traceback" not in r.stderr

def test_terminal_chat_streams_and_ctrl_c_returns_to_prompt(smollm2_gguf):
  child = pexpect.spawn(CHAT[0], CHAT[1:] + ["--max-new-tokens", "300"], env=ENV, encoding="utf-8", timeout=300)
  try:
    child.expect_exact(">>> ")
    child.sendline("What is 2+2?")
    child.expect("4")
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

def test_generate_command(smollm2_gguf):
  r = subprocess.run([sys.executable, "-m", "tg_llama.cli", "generate", "--prompt", "The capital of France is", "--max-new-tokens", "4"],
                     capture_output=True, text=True, timeout=600, env=ENV)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("The capital of France is") and "Paris" in r.stdout
