import warnings

import pytest
import torch

from t2edit.svf import SVDCache, SVFConfig, SVFLinear, apply_svf, find_target_layers
from t2edit.tiny import build_tiny_model


def _logits(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("mask,norm", [("sigmoid", True), ("identity", False), ("sigmoid", False)])
def test_neutral_z_reproduces_base_logits(arch, mask, norm, tiny_tokenizer, tiny_texts):
    model = build_tiny_model(tiny_tokenizer, arch=arch)
    base = _logits(model, tiny_tokenizer, tiny_texts)
    config = SVFConfig(target_modules="all-linear", mask=mask, norm_preserving=norm,
                       max_mult=2.0 if not norm else 1.0)
    svf = apply_svf(model, config, progress=False)
    svf.reset_z()
    edited = _logits(svf, tiny_tokenizer, tiny_texts)
    rel = (edited - base).norm() / base.norm()
    assert rel < 1e-4, rel


def test_only_z_is_trainable_and_gets_gradients(tiny_tokenizer, tiny_texts):
    model = build_tiny_model(tiny_tokenizer)
    svf = apply_svf(model, SVFConfig(), progress=False)
    trainable = [n for n, p in svf.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".z") for n in trainable)
    assert len(trainable) == len(svf.layer_names) == 6  # gate/up/down x 2 layers
    batch = tiny_tokenizer(tiny_texts, return_tensors="pt", padding=True)
    svf(**batch, labels=batch["input_ids"]).loss.backward()
    for name, p in svf.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_factored_gradient_matches_autograd_through_full_recomposition(tiny_tokenizer, tiny_texts):
    """The custom backward (no full weight gradient) equals plain autograd through U diag(σ) Vᵀ."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 7)
    U, s, Vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    svf_layer = SVFLinear(layer, (U, s, Vh), SVFConfig(z_init_noise=0.3))
    x = torch.randn(3, 5, 12)
    (svf_layer(x) ** 2).sum().backward()
    z = svf_layer.z.detach().clone().requires_grad_(True)
    m = torch.sigmoid(z)
    sigma = s * m * (s.sum() / (s * m).sum())
    reference = x @ ((U * sigma) @ Vh).T + layer.bias
    (reference ** 2).sum().backward()
    assert torch.allclose(svf_layer.z.grad, z.grad, atol=1e-5, rtol=1e-4)


def test_weight_is_recomposed_once_per_z_change(tiny_tokenizer, tiny_texts, monkeypatch):
    model = build_tiny_model(tiny_tokenizer)
    svf = apply_svf(model, SVFConfig(), progress=False)
    calls = []
    original = SVFLinear.singular_values

    def counting(self):
        calls.append(torch.is_grad_enabled())
        return original(self)

    monkeypatch.setattr(SVFLinear, "singular_values", counting)
    batch = tiny_tokenizer(tiny_texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        for _ in range(3):
            svf(**batch)
    assert len(calls) == 6  # built once per layer, reused by the next two forwards
    optimizer = torch.optim.Adam(svf.z_parameters(), lr=0.1)
    svf(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    calls.clear()
    with torch.no_grad():
        svf(**batch)
        svf(**batch)
    assert len(calls) == 6  # z changed once -> one rebuild per layer


def test_target_selection_presets_and_patterns(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    mlp = find_target_layers(model, "mlp")
    attn = find_target_layers(model, "attn")
    every = find_target_layers(model, "all-linear")
    assert all(n.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for n in mlp) and len(mlp) == 6
    assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in attn) and len(attn) == 8
    assert set(every) == set(mlp) | set(attn) and "lm_head" not in every
    assert find_target_layers(model, ["down_proj"]) == [n for n in mlp if n.endswith("down_proj")]
    assert find_target_layers(model, ["re:layers\\.0\\..*q_proj"]) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="matched no linear layer"):
        find_target_layers(model, ["nonexistent_proj"])


def test_unload_restores_the_base_model_exactly(tiny_tokenizer, tiny_texts):
    model = build_tiny_model(tiny_tokenizer)
    base = _logits(model, tiny_tokenizer, tiny_texts)
    svf = apply_svf(model, SVFConfig(z_init_noise=1.0), progress=False)
    assert not torch.allclose(_logits(svf, tiny_tokenizer, tiny_texts), base)
    restored = svf.unload()
    assert torch.equal(_logits(restored, tiny_tokenizer, tiny_texts), base)
    assert all(p.requires_grad for p in restored.parameters())


def test_svd_cache_hit_and_corrupt_file_rebuilt(tmp_path, tiny_tokenizer, tiny_texts):
    config = SVFConfig(svd_cache_dir=str(tmp_path / "svd"))
    model = build_tiny_model(tiny_tokenizer)
    apply_svf(model, config, progress=False).unload()
    files = sorted((tmp_path / "svd").glob("*.safetensors"))
    assert len(files) == 6
    cache = SVDCache(tmp_path / "svd")
    weight = model.model.layers[0].mlp.down_proj.weight
    cache.get("model.layers.0.mlp.down_proj", weight, torch.float32)
    assert cache.hits == 1 and not cache.rebuilt
    # Truncate one file and overwrite another with factors of a different matrix.
    files[0].write_bytes(files[0].read_bytes()[:100])
    files[1].write_bytes(files[2].read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svf = apply_svf(model, config, progress=False)
    messages = [str(w.message) for w in caught if "SVD cache" in str(w.message)]
    assert len(messages) == 1 and "2 file(s)" in messages[0]
    svf.reset_z()
    base = build_tiny_model(tiny_tokenizer)  # same seed -> same weights
    assert torch.allclose(_logits(svf, tiny_tokenizer, tiny_texts), _logits(base, tiny_tokenizer, tiny_texts),
                          rtol=1e-4, atol=1e-5)


def test_svd_cache_key_changes_with_weights(tmp_path, tiny_tokenizer):
    config = SVFConfig(svd_cache_dir=str(tmp_path / "svd"))
    apply_svf(build_tiny_model(tiny_tokenizer, seed=0), config, progress=False)
    apply_svf(build_tiny_model(tiny_tokenizer, seed=1), config, progress=False)
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 12


def test_merge_and_unload_round_trips_through_save_pretrained(tmp_path, tiny_tokenizer, tiny_texts):
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "gpt2"):
        svf = apply_svf(build_tiny_model(tiny_tokenizer, arch=arch), SVFConfig(z_init_noise=1.0), progress=False)
        edited = _logits(svf, tiny_tokenizer, tiny_texts)
        plain = svf.merge_and_unload()
        assert not any(isinstance(m, SVFLinear) for m in plain.modules())
        plain.save_pretrained(tmp_path / arch)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
        rel = (_logits(reloaded, tiny_tokenizer, tiny_texts) - edited).norm() / edited.norm()
        assert rel < 1e-5, (arch, rel)
