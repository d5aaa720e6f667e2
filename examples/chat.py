"""Streaming multi-turn chat. With no arguments it runs the bundled SmolLM2-135M-Instruct on the CPU
(or the backend in $TG_LLAMA_BACKEND / $DEV). Same options as `tg-llama chat --help`."""
import sys
from tg_llama.cli import main

if __name__ == "__main__": sys.exit(main(["chat", *sys.argv[1:]]))
