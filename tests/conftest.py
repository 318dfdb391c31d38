import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # test processes often share the cores; one thread each is fastest

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own t2edit cache directory (SVD factors, worlds)."""
    monkeypatch.setenv("T2EDIT_CACHE", str(tmp_path / "t2edit-cache"))


@pytest.fixture
def tiny_texts():
    return ["The capital of Foo is Bar", "The capital of Baz is Qux", "The spouse of Ann is Bob Smith",
            "The spouse of Eve is Carl", "The occupation of Ann is painter"]


@pytest.fixture
def tiny_tokenizer(tiny_texts):
    from t2edit.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(tiny_texts)
