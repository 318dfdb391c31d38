"""Frozen weights cast once for autocast: the same numbers as autocast's own per-call casts, nothing left behind."""
import pytest
import torch

from t2edit.precision import autocast_context, frozen_weights_cast
from t2edit.svf import SVFConfig, apply_svf
from t2edit.tiny import build_tiny_model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_frozen_bf16_copies_give_autocasts_numbers_and_are_put_back(tiny_tokenizer, architecture):
    model = apply_svf(build_tiny_model(tiny_tokenizer, arch=architecture), SVFConfig(target_modules="all-linear"),
                      progress=False)
    with torch.no_grad():
        next(iter(model.svf_layers().values())).z.add_(0.3)  # an edited model, not the neutral one
    batch = tiny_tokenizer(["The capital of Foo is", "The spouse of"], return_tensors="pt", padding=True)
    weights_before = {name: p for name, p in model.named_parameters()}
    with autocast_context(model.device, "bf16"):
        plain = _logits(model, batch)
        with frozen_weights_cast(model):
            cast = _logits(model, batch)
            swapped = [name for name, p in model.named_parameters() if p.dtype == torch.bfloat16]
    assert torch.equal(plain, cast)
    if architecture == "llama":  # its projections are nn.Linear (GPT-2's are Conv1D, left to autocast)
        assert swapped, "no frozen linear got a bf16 copy"
    assert {name: p for name, p in model.named_parameters()}.keys() == weights_before.keys()
    assert all(p is weights_before[name] and p.dtype == torch.float32 for name, p in model.named_parameters())
    # W' built while the base layers hold bf16 copies stays in the base weights' dtype
    layer = next(iter(model.svf_layers().values()))
    with torch.no_grad():
        layer.z.add_(0.1)
    with autocast_context(model.device, "bf16"), frozen_weights_cast(model):
        _logits(model, batch)
    assert layer.merged_weight().dtype == torch.float32


def test_outside_autocast_nothing_is_swapped_and_gradients_still_reach_z(tiny_tokenizer):
    model = apply_svf(build_tiny_model(tiny_tokenizer), SVFConfig(), progress=False)
    batch = tiny_tokenizer(["The capital of Foo is"], return_tensors="pt")
    with frozen_weights_cast(model):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    with autocast_context(model.device, "bf16"), frozen_weights_cast(model):
        loss = model(**batch).logits.float().logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.z_parameters())
