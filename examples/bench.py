"""Benchmark tg-llama (prefill, decode, time to first token, memory, bandwidth): the same as `tg-llama bench`.
Usage: python examples/bench.py [--model PATH] [--quantize int8] [--compare transformers] [--json]"""
import sys
from tg_llama.bench import main

if __name__ == "__main__": sys.exit(main())
