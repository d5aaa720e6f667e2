"""GGUF block decoding (every quant type we read) against the gguf package's numpy reference."""
import numpy as np
import pytest
import gguf
from tg_llama.formats.gguf import load_tensor, read_gguf

# where each block keeps its float16 scale fields (the other bytes are free bit patterns)
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}

@pytest.mark.parametrize("qtype", list(SCALE_OFFSETS))
def test_dequantize_matches_gguf_py(qtype, tmp_path):
  q = gguf.GGMLQuantizationType[qtype]
  block, nbytes = gguf.GGML_QUANT_SIZES[q]
  rows, cols = 6, 512
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
  for off in SCALE_OFFSETS[qtype]:
    raw[:, :, off:off + 2] = rng.uniform(-0.1, 0.1, size=(rows, cols // block, 1)).astype(np.float16).view(np.uint8)
  raw = raw.reshape(rows, -1)
  path = tmp_path / f"{qtype}.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tensor("w", raw, raw_dtype=q)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  _, infos, disk = read_gguf(path)
  assert infos["w"].shape == (rows, cols)
  np.testing.assert_allclose(load_tensor(disk, infos["w"], "CPU").numpy(), gguf.quants.dequantize(raw, q), rtol=1e-6, atol=1e-6)
