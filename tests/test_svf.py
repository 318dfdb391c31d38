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


def model_bypassed_logits(svf, batch):
    from t2edit.svf import model_bypassed

    with model_bypassed(svf):
        return svf(**batch).logits


def test_weight_is_recomposed_once_per_z_change_and_only_when_enough_tokens_come(tiny_tokenizer, tiny_texts,
                                                                                     monkeypatch):
    model = build_tiny_model(tiny_tokenizer)
    svf = apply_svf(model, SVFConfig(), progress=False)
    builds = []
    original = SVFLinear.weight_for

    def counting(self, sigma):
        builds.append(self)
        return original(self, sigma)

    monkeypatch.setattr(SVFLinear, "weight_for", counting)
    batch = tiny_tokenizer(tiny_texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model_bypassed_logits(svf, batch)
        for _ in range(3):
            assert torch.equal(svf(**batch).logits, base)
    assert builds == []  # the neutral z: W' is W, nothing to build
    optimizer = torch.optim.Adam(svf.z_parameters(), lr=0.1)
    svf(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    builds.clear()
    few = tiny_tokenizer(tiny_texts[:1], return_tensors="pt")
    with torch.no_grad():
        through_factors = svf(**few).logits
    assert builds == []  # a changed z and a few tokens: through the factors, no W' built
    with torch.no_grad():
        for layer in svf.svf_layers().values():
            layer.merged_weight()
        merged = svf(**few).logits
    assert torch.allclose(through_factors, merged, atol=1e-5)
    builds.clear()
    optimizer.step()
    rank = min(layer.rank for layer in svf.svf_layers().values())
    many = {k: v.repeat(rank // v.shape[1] + 1, 1) for k, v in few.items()}
    with torch.no_grad():
        svf(**many)
        svf(**many)
    assert len(builds) == 6  # more tokens than W' costs: built once per layer, then reused


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


# ------------------------------------------------------------------------------------------------------------
# Tests that pin results a user sees (each kills survivors of the mutmut run listed in README, Contributing).
# ------------------------------------------------------------------------------------------------------------

import math  # noqa: E402

from torch import nn  # noqa: E402

from t2edit.svf import (  # noqa: E402
    default_svd_cache_dir, model_fingerprint, rows_planned, svf_config_dict, weight_fingerprint)


class _Named(nn.Module):
    """A plain module tree whose linear layers sit under the given dotted names."""

    def __init__(self, names, bias=False, shape=(6, 4)):
        super().__init__()
        torch.manual_seed(0)
        for name in names:
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, nn.Linear(shape[1], shape[0], bias=bias))


def test_neutral_z_values_and_the_sigmoid_without_rescale_case():
    assert SVFConfig().neutral_z() == 0.1
    assert SVFConfig(z_init=0.3).neutral_z() == 0.3
    assert SVFConfig(mask="identity").neutral_z() == 1.0
    assert SVFConfig(mask="identity", norm_preserving=False).neutral_z() == 1.0
    config = SVFConfig(norm_preserving=False, max_mult=3.0)
    z = torch.tensor(config.neutral_z())
    assert math.isclose(float(config.multiplier(z)), 1.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="needs max_mult > 1"):
        SVFConfig(norm_preserving=False, max_mult=1.0).neutral_z()
    with pytest.raises(ValueError, match="mask='tanh' is not supported"):
        SVFConfig(mask="tanh")
    assert SVFConfig(target_modules="down_proj").target_modules == ["down_proj"]
    assert "svd_cache_dir" not in svf_config_dict(SVFConfig(svd_cache_dir="/x"))


def test_presets_cover_other_families_names_and_never_pick_output_heads():
    names = ["blocks.0.feed_forward.w1", "blocks.0.ffn.w2", "blocks.0.attention.q", "blocks.0.self_attention.k",
             "blocks.0.attn.v", "blocks.0.other.o_proj", "head.score", "head.embed_out", "lm_head"]
    model = _Named(names)
    assert find_target_layers(model, "mlp") == names[:2]
    assert find_target_layers(model, "attn") == names[2:5]
    assert find_target_layers(model, "all-linear") == names[:6]
    assert find_target_layers(model, ["o_proj"]) == ["blocks.0.other.o_proj"]
    assert find_target_layers(model, ["re:^blocks\\.0\\.ffn"]) == ["blocks.0.ffn.w2"]
    assert find_target_layers(model, ["w1"]) == ["blocks.0.feed_forward.w1"]  # a suffix is not a regex
    assert find_target_layers(model, ["re:q$"]) == ["blocks.0.attention.q"]  # the whole pattern after "re:"
    with pytest.raises(ValueError, match="matched no linear layer of _Named"):
        find_target_layers(model, ["nothing"])


def test_fingerprints_follow_weights_class_and_chosen_layers():
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    swapped = w.clone().reshape(-1)
    swapped[1], swapped[3] = swapped[3].item(), swapped[1].item()  # same sum, odd positions differ
    assert weight_fingerprint(w) != weight_fingerprint(swapped.reshape(3, 4))
    big = torch.randn(3 * 65536 + 5)
    assert len(weight_fingerprint(big)) == 32 and weight_fingerprint(big) == weight_fingerprint(big.clone())
    model = _Named(["a", "b"])
    fp = model_fingerprint(model)
    assert len(fp) == 32

    Other = type("Other", (_Named,), {})  # noqa: N806  (a subclass that changes nothing but the class)
    assert model_fingerprint(Other(["a", "b"])) != fp  # same weights, other class
    only_a = model_fingerprint(model, ["a"])
    with torch.no_grad():
        model.b.weight.add_(1.0)
    assert model_fingerprint(model, ["a"]) == only_a
    with torch.no_grad():
        model.a.weight.add_(1.0)
    assert model_fingerprint(model, ["a"]) != only_a
    fresh = _Named(["a", "b"])
    before = model_fingerprint(fresh)
    assert apply_svf(fresh, SVFConfig(target_modules="all-linear", svd_cache_dir=""),
                     progress=False).base_fingerprint == before


def test_default_svd_cache_dir_follows_env_and_home(monkeypatch, tmp_path):
    monkeypatch.setenv("T2EDIT_CACHE", str(tmp_path / "c"))
    assert default_svd_cache_dir() == tmp_path / "c" / "svd"
    monkeypatch.delenv("T2EDIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_svd_cache_dir() == tmp_path / "home" / ".cache" / "t2edit" / "svd"


def test_disabled_cache_writes_nothing_and_keeps_factor_dtype(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("T2EDIT_CACHE", str(tmp_path / "default"))
    cache = SVDCache("")
    assert cache.directory is None
    w = torch.randn(6, 4)
    U, s, Vh = cache.get("x", w, torch.float64)
    assert U.dtype == s.dtype == Vh.dtype == torch.float64
    assert torch.allclose((U * s) @ Vh, w.double(), atol=1e-5)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_svd_cache_keeps_dtypes_and_layer_names_apart(tmp_path):
    cache = SVDCache(tmp_path)
    w = torch.randn(6, 4)
    for _ in range(2):
        for layer in ("A1", "B1", "a1", "b1", "x/y:z"):
            for dtype in (torch.float32, torch.float64):
                assert cache.get(layer, w, dtype)[1].dtype == dtype
    assert cache.hits == 10 and not cache.rebuilt
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 10 and all(p.is_file() for p in tmp_path.iterdir())
    assert any(name.endswith("-x_y_z-float64.safetensors") for name in files)


def _tampered_cache(tmp_path, weight, change):
    """A cache file for `weight` with correct metadata whose factors were altered by `change`."""
    cache = SVDCache(tmp_path)
    factors = list(cache.get("w", weight, torch.float32))
    path = cache.path(weight_fingerprint(weight), "w", torch.float32)
    cache._write(path, change(factors), weight_fingerprint(weight), "w")
    fresh = SVDCache(tmp_path)
    fresh.get("w", weight, torch.float32)
    return fresh


@pytest.mark.parametrize("change,problem", [
    (lambda f: [f[0][:, :-1], f[1], f[2]], "shape/dtype mismatch"),
    (lambda f: [f[0], f[1][:-1], f[2]], "shape/dtype mismatch"),
    (lambda f: [f[0], f[1], f[2][:, :-1]], "shape/dtype mismatch"),
    (lambda f: [f[0].double(), f[1], f[2]], "shape/dtype mismatch"),
    (lambda f: [f[0], f[1] * float("nan"), f[2]], "does not reconstruct the weight"),
    (lambda f: [f[0], f[1] * 1.01, f[2]], "does not reconstruct the weight"),
])
def test_svd_cache_rejects_bad_factors_with_the_reason(tmp_path, change, problem):
    fresh = _tampered_cache(tmp_path, torch.randn(6, 4), change)
    assert fresh.hits == 0 and len(fresh.rebuilt) == 1 and problem in fresh.rebuilt[0]


def test_svd_cache_tolerance_is_relative_to_the_weight_scale(tmp_path):
    # A 1% error is caught on a tiny-scale weight, and a correct file of a large-scale weight is trusted.
    small = _tampered_cache(tmp_path / "s", torch.randn(6, 4) * 1e-4, lambda f: [f[0], f[1] * 1.01, f[2]])
    assert small.hits == 0 and "does not reconstruct" in small.rebuilt[0]
    large = _tampered_cache(tmp_path / "l", torch.randn(64, 48) * 1e3, lambda f: f)
    assert large.hits == 1 and not large.rebuilt


def test_svd_cache_names_the_problem_of_each_rebuilt_file(tmp_path):
    weight = torch.randn(6, 4)
    cache = SVDCache(tmp_path)
    cache.get("w", weight, torch.float32)
    path = cache.path(weight_fingerprint(weight), "w", torch.float32)
    path.write_bytes(path.read_bytes()[:50])
    fresh = SVDCache(tmp_path)
    fresh.get("w", weight, torch.float32)
    assert "unreadable: " in fresh.rebuilt[0] and "NoneType" not in fresh.rebuilt[0]
    factors = cache.get("w", weight, torch.float32)
    cache._write(path, factors, weight_fingerprint(weight), "other-layer")
    fresh = SVDCache(tmp_path)
    fresh.get("w", weight, torch.float32)
    assert "metadata mismatch" in fresh.rebuilt[0]


def test_svf_state_dict_holds_no_factors_and_z_is_float32_with_noise_around_init():
    model = _Named(["a"], shape=(40, 30))
    svf = apply_svf(model, SVFConfig(target_modules="all-linear", svd_cache_dir="", factor_dtype="float64",
                                     z_init=0.5, z_init_noise=0.01), progress=False)
    keys = list(svf.state_dict())
    assert not any(k.endswith((".U", ".s", ".Vh")) for k in keys), keys
    z = svf.base_model.a.z
    assert z.dtype == torch.float32
    assert (z - 0.5).abs().max() < 0.1 and z.std() > 0
    assert svf.num_trainable() == 30


def test_singular_values_for_a_batch_of_z_rows_match_row_by_row():
    svf = apply_svf(_Named(["a"]), SVFConfig(target_modules="all-linear", svd_cache_dir=""), progress=False)
    layer = svf.base_model.a
    z = torch.randn(3, layer.rank)
    batch = layer.singular_values_for(z)
    for row in range(3):
        assert torch.allclose(batch[row], layer.singular_values_for(z[row]), atol=1e-6)
        assert torch.isclose(batch[row].sum(), layer.s.sum())


@pytest.mark.parametrize("bias", [True, False])
def test_rows_planned_gives_each_row_its_own_singular_values(bias):
    model = _Named(["a"], bias=bias)
    svf = apply_svf(model, SVFConfig(target_modules="all-linear", mask="identity", svd_cache_dir=""),
                    progress=False)
    layer = svf.base_model.a
    x = torch.randn(2, 3, 4)
    z_rows = torch.stack([torch.full((layer.rank,), 1.0), torch.linspace(0.2, 2.0, layer.rank)])
    sigma_rows = layer.singular_values_for(z_rows)
    seen = []

    def plan(the_layer, inputs):
        seen.append(the_layer)
        return the_layer.forward_row_sigma(inputs, sigma_rows)

    with torch.no_grad(), rows_planned(svf, plan):
        out = svf.base_model.a(x)
    assert seen == [layer]
    with torch.no_grad():
        expected0 = layer.base_layer(x[0])
        svf.set_z({"a": z_rows[1]})
        expected1 = layer(x[1])
    assert torch.allclose(out[0], expected0, atol=1e-5)
    assert torch.allclose(out[1], expected1, atol=1e-5)
    assert layer.row_plan is None


def test_no_grad_forward_adds_the_bias_and_positional_args_reach_the_model():
    model = _Named(["a"], bias=True)
    x = torch.randn(2, 4)
    base = model.a(x).detach()
    svf = apply_svf(model, SVFConfig(target_modules="all-linear", svd_cache_dir=""), progress=False)
    with torch.no_grad():
        assert torch.allclose(svf.base_model.a(x), base, atol=1e-5)


def test_autocast_forward_uses_a_cast_copy_of_the_edited_weight_made_once_per_z():
    model = _Named(["a"], shape=(8, 8))
    svf = apply_svf(model, SVFConfig(target_modules="all-linear", mask="identity", norm_preserving=False,
                                     svd_cache_dir=""), progress=False)
    svf.reset_z()
    layer = svf.base_model.a
    x = torch.randn(2, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = layer.compute_weight(x)
        assert first.dtype == torch.bfloat16 and layer.compute_weight(x) is first
        base = layer.base_layer(x)
        assert torch.equal(layer(x), base)
        layer.z.mul_(2.0)
        second = layer.compute_weight(x)
        assert second is not first and torch.allclose(second.float(), 2 * first.float(), rtol=1e-2)
    assert layer.compute_weight(x).dtype == torch.float32


def test_bf16_base_layer_gives_a_bf16_merged_weight():
    model = _Named(["a"]).to(torch.bfloat16)
    svf = apply_svf(model, SVFConfig(target_modules="all-linear", svd_cache_dir=""), progress=False)
    svf.reset_z()
    merged = svf.base_model.a.merged_weight()
    assert merged.dtype == torch.bfloat16


def test_apply_svf_twice_is_refused_with_the_fix(tiny_tokenizer):
    svf = apply_svf(_Named(["a"]), SVFConfig(target_modules="all-linear", svd_cache_dir=""), progress=False)
    with pytest.raises(ValueError, match=r"already has SVF layers; call \.unload\(\) first"):
        apply_svf(svf)


def test_svf_model_passes_positional_arguments_through(tiny_tokenizer, tiny_texts):
    model = build_tiny_model(tiny_tokenizer)
    ids = tiny_tokenizer(tiny_texts[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
    svf = apply_svf(model, SVFConfig(svd_cache_dir=""), progress=False)
    with torch.no_grad():
        assert torch.allclose(svf(ids).logits, base, atol=1e-4)
        generated = svf.generate(ids, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 2


def test_rows_planned_forward_of_a_bf16_model_keeps_its_dtype_outside_autocast():
    """A model loaded in bf16 keeps fp32 factors: the per-row path must cast in and out (no dtype clash, no fp32
    activations leaking into the next bf16 layer) and agree with the ordinary forward."""
    model = _Named(["a"], bias=True).to(torch.bfloat16)
    svf = apply_svf(model, SVFConfig(target_modules="all-linear", svd_cache_dir=""), progress=False)
    layer = svf.base_model.a
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    sigma_rows = layer.singular_values_for(torch.ones(2, layer.rank) * layer.z.detach())
    with torch.no_grad():
        out = layer.forward_row_sigma(x, sigma_rows)
        plain = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), plain.float(), atol=3e-2)


def test_training_forward_gives_x_and_z_the_gradients_of_the_merged_weight_in_fp32_and_bf16():
    """The training path runs through the factors (bf16 copies under autocast); z's and x's gradients must be those
    of plain autograd through x W'ᵀ with W' = U diag(σ) Vᵀ (σ's reduction is accumulated in fp32)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 16)  # rectangular, as the MLP matrices the factored path is for
    U, s, Vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    x0 = torch.randn(4, 6, 48)
    z0 = torch.rand(s.shape) + 0.5
    z_ref, x_ref = z0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    m = torch.sigmoid(z_ref)
    sigma = s * m * (s.sum() / (s * m).sum())
    ((x_ref @ ((U * sigma) @ Vh).T + layer.bias) ** 2).sum().backward()
    for precision, tolerance in (("fp32", 1e-4), ("bf16", 3e-2)):
        svf_layer = SVFLinear(layer, (U, s, Vh), SVFConfig())
        svf_layer.z.data = z0.clone()
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = svf_layer(x)
        (out.float() ** 2).sum().backward()
        assert svf_layer.z.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
        assert (svf_layer.z.grad - z_ref.grad).norm() < tolerance * z_ref.grad.norm(), precision
        assert (x.grad - x_ref.grad).norm() < tolerance * x_ref.grad.norm(), precision


def test_training_factors_come_in_the_matmul_dtype_cast_once_per_dtype():
    layer = apply_svf(_Named(["a"], shape=(8, 4)), SVFConfig(target_modules="all-linear", svd_cache_dir=""),
                      progress=False).base_model.a
    x32 = torch.randn(2, 4)
    assert all(f is g for f, g in zip(layer.factors_for(x32), (layer.U, layer.Vh)))  # fp32: the buffers themselves
    bf16 = layer.factors_for(x32.bfloat16())  # a bf16 model outside autocast
    assert [f.dtype for f in bf16] == [torch.bfloat16] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = layer.factors_for(x32)
        assert all(f is g for f, g in zip(again, bf16))  # cast once, reused
    with torch.autocast("cpu", dtype=torch.float16):
        half = layer.factors_for(x32)
    assert [f.dtype for f in half] == [torch.float16] * 2
    assert torch.allclose(half[0].float(), layer.U, atol=1e-2) and torch.allclose(bf16[1].float(), layer.Vh, atol=2e-2)
