"""The engine: every generation runs through it. KV-cache slots (kv_cache.py), the model runner with its captured graphs
(runner.py), and the scheduler that batches requests a step at a time (engine.py)."""
