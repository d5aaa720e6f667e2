"""`tg-llama convert` never writes where it reads and never leaves half a checkpoint: the destination may not be, hold or
lie inside the source (symlinks resolved), not even with --force; a non-empty destination is replaced only with --force
and only once the new one is complete; a failed or interrupted conversion leaves the destination as it was and no
temporary folder behind."""
from __future__ import annotations
import hashlib, os, pathlib, stat
import pytest
from tinygrad import dtypes
from tg_llama import cli, convert
from tg_llama.convert import convert_checkpoint
from tg_llama.errors import TgLlamaError
from tiny_models import hf_model, write_gguf, write_hf

def snapshot(folder: pathlib.Path) -> dict[str, str]:
  """Every file under `folder` (or the file itself) by its path and the hash of its bytes."""
  files = [folder] if folder.is_file() else sorted(f for f in folder.rglob("*") if f.is_file())
  return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> pathlib.Path: return write_hf(hf_model("gqa_tied"), tmp_path_factory.mktemp("src") / "hf")

@pytest.fixture
def src(hf_src, tmp_path) -> pathlib.Path:
  import shutil
  return pathlib.Path(shutil.copytree(hf_src, tmp_path / "hf"))

@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("where", ["same", "inside", "parent", "symlink"])
def test_never_into_its_own_source(src, tmp_path, where, force):
  before = snapshot(tmp_path)
  if where == "symlink": (tmp_path / "link").symlink_to(src)
  dst = {"same": src, "inside": src / "out", "parent": tmp_path, "symlink": tmp_path / "link"}[where]
  with pytest.raises(TgLlamaError, match="the destination is, holds or lies inside the checkpoint it reads"):
    convert_checkpoint(src, dst, dtype=dtypes.float32, **({"force": True} if force else {}))
  assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf"] + (["link"] if where == "symlink" else []))

def test_never_into_the_folder_of_a_gguf_or_the_blobs_of_a_snapshot(tmp_path):
  (tmp_path / "models").mkdir()
  gguf = write_gguf(hf_model("mha"), tmp_path / "models" / "m.gguf")
  (tmp_path / "models" / "notes.txt").write_text("mine")
  # an HF hub snapshot: its files are links into blobs/, which the conversion reads
  blobs = write_hf(hf_model("mha"), tmp_path / "hub" / "blobs")
  (snap := tmp_path / "hub" / "snapshot").mkdir()
  for f in blobs.iterdir(): (snap / f.name).symlink_to(f)
  before = snapshot(tmp_path)
  with pytest.raises(TgLlamaError, match="inside the checkpoint"): convert_checkpoint(gguf, tmp_path / "models", force=True)
  with pytest.raises(TgLlamaError, match="inside the checkpoint"): convert_checkpoint(snap, blobs, force=True)
  assert snapshot(tmp_path) == before

def test_cli_refuses_in_one_line(src, tmp_path, capsys):
  before = snapshot(src)
  assert cli.main(["convert", str(src), str(src), "--dtype", "float32"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: cannot convert {src} into {src}: the destination is, holds or lies inside")
  assert snapshot(src) == before

def test_a_non_empty_destination_needs_force(src, tmp_path, capsys):
  (dst := tmp_path / "out").mkdir()
  (dst / "mine.txt").write_text("keep me")
  assert cli.main(["convert", str(src), str(dst), "--dtype", "float32"]) == 1
  assert capsys.readouterr().err == f"error: {dst} exists and is not empty; pass --force (force=True) to replace it once the conversion is complete\n"
  assert [p.name for p in dst.iterdir()] == ["mine.txt"]
  assert cli.main(["convert", str(src), str(dst), "--dtype", "float32", "--force"]) == 0
  assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temporary folder left
  assert stat.S_IMODE(dst.stat().st_mode) == 0o777 & ~_umask()
  (empty := tmp_path / "empty").mkdir()
  assert convert_checkpoint(src, empty, dtype=dtypes.float32) == empty and (empty / "model.safetensors").is_file()

@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_an_interrupted_conversion_leaves_the_destination_as_it_was(src, tmp_path, exists, stop):
  dst = tmp_path / "out"
  if exists:
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(b"the old one")
  before = snapshot(tmp_path)
  written = []
  def on_tensor(name):
    written.append(name)
    if len(written) == 3: raise stop("stopped")
  with pytest.raises(stop): convert_checkpoint(src, dst, dtype=dtypes.float32, on_tensor=on_tensor, **({"force": True} if exists else {}))
  assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == (["hf", "out"] if exists else ["hf"])

def test_a_failure_while_moving_into_place_keeps_the_old_one(src, tmp_path, monkeypatch):
  (dst := tmp_path / "out").mkdir()
  (dst / "model.safetensors").write_bytes(b"the old one")
  before = snapshot(tmp_path)
  real = os.replace
  def fail_second(a, b):
    if ".converting-" in str(a): raise OSError("disk trouble")  # the new folder into place; the old one moved aside already
    return real(a, b)
  monkeypatch.setattr(convert.os, "replace", fail_second)
  with pytest.raises(OSError, match="disk trouble"): convert_checkpoint(src, dst, dtype=dtypes.float32, force=True)
  assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]

def _umask() -> int:
  os.umask(mask := os.umask(0o022))
  return mask
