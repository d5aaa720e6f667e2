"""Random-weight GGUF files shaped like the published models (config.py's presets), for `tg-llama bench --synthetic
NAME`: a model of a real size to measure the bandwidth-bound regime and peak memory on, without downloading one.

A file holds every matrix in Q4_1 blocks (the type of the default model's linears) drawn at random: 4-bit codes
uniform in 0..15, a scale per block around 0.0043 and a minimum of -7.5 scales, so each weight is uniform with a
standard deviation of about 0.02 (HF's initializer range); the norms are ones; a preset with Llama 3.1's RoPE scaling
gets llama.cpp's rope_freqs tensor. The vocabulary is the default model's (SmolLM2's byte-level BPE), cut to the
preset's size or padded up to it with tokens no text is encoded to, so that the tokenizer, the JSON-schema decoding
and llama.cpp all run on the file. Seeded by tensor name: the same bytes every time. It is written once, 20 MB at a
time (never a whole tensor in memory), into the cache folder (private, as the kernel caches are), under a temporary
name first, then moved into place; delete the folder to write it again.

Not here: meaningful text (the weights are noise), other block types, the presets' own vocabularies (Llama 3's
128k-token tokenizer is not shipped with tg-llama: Llama 3.2 1B's vocabulary is SmolLM2's 49,152 tokens and 79,104
`<|reserved_N|>` ones), models larger than this machine's memory or its free disk."""
from __future__ import annotations
import os, pathlib, shutil, sys, time, zlib
from dataclasses import replace
import numpy as np
from tg_llama import private_dir
from tg_llama.config import PRESETS, LlamaConfig
from tg_llama.convert import canonical_shapes, source_names
from tg_llama.errors import InvalidArgumentError, TgLlamaError

BLOCK, BLOCK_BYTES = 32, 20  # Q4_1: 32 weights in {f16 scale, f16 min, 16 bytes of 4-bit codes}
SCALE = 0.02 / np.sqrt((16 ** 2 - 1) / 12)  # the std of uniform codes 0..15 is 4.61 scales: weights of std 0.02
CHUNK_BLOCKS = 1 << 20  # blocks drawn and written at a time (20 MB); fixed, so the random stream is too
SEED = 0

def folder() -> pathlib.Path:
  from tg_llama.backend import cache_root
  return cache_root() / "synthetic"

def cached_file(name: str, config: LlamaConfig | None = None, context: int = 0) -> pathlib.Path:
  """The random-weight GGUF of preset `name` (or of `config`, under that name) in the cache folder, written if it is
  not there yet; refused before anything is written when the model and a KV cache of `context` positions do not fit
  in this machine's memory, or the file on its disk."""
  if config is None and name not in PRESETS:
    raise InvalidArgumentError(f"--synthetic {name!r} is not a preset; choose one of {', '.join(PRESETS)}")
  config = config or PRESETS[name]
  path = folder() / f"{name}.Q4_1.gguf"
  try: why = private_dir.first_problem([folder().parent, private_dir.make(folder()), path])
  except OSError as e: why = f"cannot create it ({e.strerror or e})"
  if why is not None: raise TgLlamaError(f"the synthetic models' folder {folder()} is not used: {why}")
  from tg_llama.api import LOADED_BLOCK_BYTES, mem_available
  size = file_bytes(config)
  loaded = size * LOADED_BLOCK_BYTES["Q4_1"] // BLOCK_BYTES  # the blocks as loaded
  kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * context * 4  # float32, the CPU's compute dtype
  if (available := mem_available()) is not None and loaded + kv > available:
    raise InvalidArgumentError(f"--synthetic {name}: its {loaded / 1e9:.3g} GB of Q4_1 weights (as loaded) and {kv / 1e9:.3g} GB of KV "
                               f"cache do not fit in the {available / 1e9:.3g} GB of memory available here; choose a smaller preset")
  if path.is_file(): return path
  if (free := shutil.disk_usage(folder()).free) < size:
    raise InvalidArgumentError(f"--synthetic {name}: its {size / 1e9:.3g} GB file does not fit in the {free / 1e9:.3g} GB "
                               f"free in {folder()}")
  return write_gguf(config, path, name)

def tensor_plan(config: LlamaConfig) -> list[tuple[str, tuple[int, ...], str]]:
  """(GGUF name, shape in row-major order, GGML type) of every tensor of the file, in file order."""
  gguf_name = {canonical: names[0] for canonical, names in source_names(config, "gguf").items()}
  plan = [("rope_freqs.weight", (config.head_dim // 2,), "F32")] if config.rope_scaling is not None else []
  for name, shape in canonical_shapes(config).items():
    if name == "lm_head.weight" and config.tie_embeddings: continue  # llama.cpp ties a missing output to the embedding
    # llama.cpp keeps a mixture's router (ffn_gate_inp) in F32
    plan.append((gguf_name[name], shape, "F32" if len(shape) == 1 or gguf_name[name].endswith("ffn_gate_inp.weight") else "Q4_1"))
  return plan

def nbytes(shape: tuple[int, ...], typ: str) -> int:
  return int(np.prod(shape)) * 4 if typ == "F32" else int(np.prod(shape)) // BLOCK * BLOCK_BYTES

def file_bytes(config: LlamaConfig) -> int:
  """The tensor data's size (the header, with the vocabulary, adds a few MB)."""
  return sum(nbytes(shape, typ) for _, shape, typ in tensor_plan(config))

def write_gguf(config: LlamaConfig, path: pathlib.Path, name: str = "synthetic", seed: int = SEED) -> pathlib.Path:
  """Write the random-weight GGUF of `config` to `path` (a temporary file beside it first, mode 0600), with progress on
  stderr; returns path."""
  try: import gguf
  except ImportError: raise TgLlamaError("writing a synthetic model needs gguf-py: pip install gguf") from None
  plan, tmp = tensor_plan(config), path.with_name(f".{path.name}.{os.getpid()}.tmp")
  total, done, start = sum(nbytes(s, t) for _, s, t in plan), 0, time.perf_counter()
  print(f"writing {path} ({total / 1e6:.0f} MB of random Q4_1 weights, once)", file=sys.stderr, flush=True)
  os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # GGUFWriter opens it with "wb": the mode stays
  try:
    w = gguf.GGUFWriter(str(tmp), "llama")
    _metadata(w, config, name)
    for tname, shape, typ in plan:
      if typ == "F32": w.add_tensor_info(tname, shape, np.dtype(np.float32), nbytes(shape, typ))
      else:  # as bytes (..., blocks per row x 20)
        w.add_tensor_info(tname, (*shape[:-1], shape[-1] // BLOCK * BLOCK_BYTES), np.dtype(np.uint8), nbytes(shape, typ), gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
    out = w.fout[0]
    for tname, shape, typ in plan:
      w.write_padding(out, out.tell())  # as GGUFWriter.write_tensor_data does, a chunk at a time
      for chunk in _tensor_chunks(config, tname, shape, typ, seed):
        chunk.tofile(out)
        done += chunk.nbytes
        if sys.stderr.isatty(): print(f"\r{done / 1e6:.0f}/{total / 1e6:.0f} MB", end="", file=sys.stderr, flush=True)
      w.write_padding(out, nbytes(shape, typ))
    w.close()
    os.replace(tmp, path)
  finally: tmp.unlink(missing_ok=True)
  print(("\r" if sys.stderr.isatty() else "") + f"wrote {path.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  return path

def _tensor_chunks(config: LlamaConfig, name: str, shape: tuple[int, ...], typ: str, seed: int):
  """The tensor's bytes in row-major order, CHUNK_BLOCKS blocks at a time, from a generator seeded by its name."""
  if name == "rope_freqs.weight":  # llama.cpp's per-frequency divisors: the unscaled inverse frequencies over the scaled
    yield (np.array(replace(config, rope_scaling=None).rope_inv_freq()) / np.array(config.rope_inv_freq())).astype(np.float32)
    return
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  if typ == "F32":  # norms ones; a router's logits weights random
    yield np.ones(shape, np.float32) if len(shape) == 1 else (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
    return
  left = int(np.prod(shape)) // BLOCK
  while left:
    n, left = min(left, CHUNK_BLOCKS), left - min(left, CHUNK_BLOCKS)
    blocks = np.empty((n, BLOCK_BYTES), np.uint8)
    scale = (SCALE * rng.uniform(0.75, 1.25, n)).astype(np.float16)
    blocks[:, 0:2] = scale.view(np.uint8).reshape(n, 2)
    blocks[:, 2:4] = (scale.astype(np.float32) * -7.5).astype(np.float16).view(np.uint8).reshape(n, 2)
    blocks[:, 4:] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    yield blocks

def _metadata(w, c: LlamaConfig, name: str):
  w.add_name(f"{name} (random weights)"); w.add_file_type(3); w.add_quantization_version(2)  # 3: LLAMA_FTYPE_MOSTLY_Q4_1
  w.add_block_count(c.n_layers); w.add_context_length(c.max_context); w.add_embedding_length(c.dim)
  w.add_feed_forward_length(c.hidden_dim); w.add_head_count(c.n_heads); w.add_head_count_kv(c.n_kv_heads)
  w.add_key_length(c.head_dim); w.add_value_length(c.head_dim); w.add_rope_dimension_count(c.head_dim)
  w.add_rope_freq_base(c.rope_theta); w.add_layer_norm_rms_eps(c.norm_eps); w.add_vocab_size(c.vocab_size)
  if c.n_experts: w.add_expert_count(c.n_experts); w.add_expert_used_count(c.n_active_experts)
  _vocabulary(w, c.vocab_size)

def _vocabulary(w, vocab_size: int):
  """The default model's byte-level BPE vocabulary, its chat template and special tokens, as `vocab_size` tokens: cut
  (only merges whose parts and result are kept), or padded with tokens no text is encoded to."""
  from tg_llama.assets import default_model_path
  from tg_llama.formats.gguf import read_metadata
  kv = read_metadata(default_model_path())
  tokens, types = kv["tokenizer.ggml.tokens"][:vocab_size], kv["tokenizer.ggml.token_type"][:vocab_size]
  kept = set(tokens)
  merges = [m for m in kv["tokenizer.ggml.merges"] if (p := m.split(" ", 1))[0] in kept and p[1] in kept and p[0] + p[1] in kept]
  pad = vocab_size - len(tokens)
  w.add_tokenizer_model(kv["tokenizer.ggml.model"]); w.add_tokenizer_pre(kv["tokenizer.ggml.pre"])
  # padding as normal tokens (type 1) that no merge makes: as control tokens they would be 79k special strings for the
  # tokenizer to split text on (tiktoken's regex of them: 500 MB)
  w.add_token_list(tokens + [f"<|reserved_{i}|>" for i in range(pad)]); w.add_token_types(types + [1] * pad)
  w.add_token_merges(merges)
  for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id), ("unknown_token_id", w.add_unk_token_id),
                   ("padding_token_id", w.add_pad_token_id)):
    if (i := kv.get(f"tokenizer.ggml.{key}")) is not None and i < vocab_size: add(i)
  for key, add in (("add_bos_token", w.add_add_bos_token), ("add_space_prefix", w.add_add_space_prefix)):
    if (v := kv.get(f"tokenizer.ggml.{key}")) is not None: add(v)
  if (template := kv.get("tokenizer.chat_template")) is not None: w.add_chat_template(template)
