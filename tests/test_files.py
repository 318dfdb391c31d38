"""Every write is atomic: a failed one leaves no temporary file, a full disk is one clear error, and a cache that
cannot be written never stops a run."""
import errno

import pytest
import torch

from t2edit import files
from t2edit.files import WriteError, atomic_write, atomic_write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = atomic_write_json(tmp_path / "a.json", {"v": 1})

    def fails(path):
        path.write_text("half")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        atomic_write(target, fails)
    assert target.read_text().strip() == '{\n "v": 1\n}' and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_free_bytes", lambda directory: 0)

    def disk_full(path):
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    with pytest.raises(WriteError, match="no space left on the device to write .*checkpoint.pt"):
        atomic_write(tmp_path / "checkpoint.pt", disk_full)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_svd_cache_warns_and_the_run_goes_on(tmp_path, tiny_tokenizer):
    from t2edit.svf import SVFConfig, apply_svf
    from t2edit.tiny import build_tiny_model

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    model = build_tiny_model(tiny_tokenizer)
    with pytest.warns(UserWarning, match="SVD cache: could not write"):
        svf = apply_svf(model, SVFConfig(svd_cache_dir=str(blocker / "svd")), progress=False)
    batch = tiny_tokenizer(["The capital of Foo is"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(svf(**batch).logits).all()
