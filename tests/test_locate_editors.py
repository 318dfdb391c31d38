"""ROME, MEMIT and AlphaEdit on tiny models built here (seconds each): the closed forms do what the papers say
(the edited key maps to the new value, MEMIT with one edit on one layer is ROME, AlphaEdit leaves preserved keys
alone), restore() is exact also in a sequential stream, bad inputs are refused clearly, and key statistics are
cached per model."""
from __future__ import annotations

import copy

import pytest
import torch

import t2edit.editors.keys as keys_module
from t2edit.data.records import EditRecord
from t2edit.editors.alphaedit import (
    AlphaEditEditor,
    AlphaEditEditorConfig,
    alphaedit_update,
    null_space_projection,
)
from t2edit.editors.base import EditInputError
from t2edit.editors.keys import (
    KeyCorpus,
    capture_at_positions,
    document_start_ids,
    key_statistics,
    layer_weight,
    least_squares_update,
    subject_last_token,
    subject_token_span,
)
from t2edit.editors.memit import MEMITEditor, MEMITEditorConfig
from t2edit.editors.rome import ROMEEditor, ROMEEditorConfig
from t2edit.editors.tracing import causal_trace
from t2edit.files import CONFIGS_DIR, read_yaml
from t2edit.tiny import build_tiny_model, build_tiny_tokenizer

WORDS = ["Alice", "Bruno", "Carla", "Dmitri", "lives", "works", "in", "at", "Paris", "Rome", "Oslo", "Lima", "Acme", "Globex", "the", "a", "of", "and"]
RECORDS = [EditRecord("Alice", "Alice lives in", ["Rome"], ["Paris"], index=0),
           EditRecord("Bruno", "Bruno works at", ["Globex"], ["Acme"], index=1),
           EditRecord("Carla", "the city of Carla is", ["Oslo"], ["Lima"], index=2)]
# Small enough for seconds per edit: 1024 corpus keys for 256-wide keys, the bare prompt and two 3-token prefixes.
SMALL = {"key_samples": 64, "key_sample_length": 16, "context_templates": ((3, 2),), "v_num_grad_steps": 8}
DOWN_PROJ = "model.layers.{}.mlp.down_proj"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer([" ".join(WORDS)])


@pytest.fixture(scope="module")
def base_model(tokenizer):
    """Three layers, so that an edit below the last layer reaches the answer position through attention."""
    return build_tiny_model(tokenizer, hidden_size=64, num_layers=3, seed=0)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _editor(method: str, **options):
    if method == "rome":
        return ROMEEditor(ROMEEditorConfig(layer=1, **{**SMALL, **options}))
    if method == "memit":
        return MEMITEditor(MEMITEditorConfig(layers=(0, 1), **{**SMALL, **options}))
    # A random hidden-64 model's keys are far smaller than a real model's: the null space is set relative to C's
    # mean eigenvalue (most directions null, some preserved), and l2 is scaled down with the keys.
    tiny_keys = {"nullspace_relative": True, "nullspace_threshold": 0.5, "l2": 1e-3}
    return AlphaEditEditor(AlphaEditEditorConfig(layers=(0, 1), **{**SMALL, **tiny_keys, **options}))


def _second_moment(editor, layer: int) -> torch.Tensor:
    ((_, stats),) = [(k, v) for k, v in editor.memo.values.items() if k[0] == "stats" and k[2] == layer]
    return stats.second_moment.double()


# ------------------------------------------------------------------------------------------------ closed forms

def test_least_squares_update_is_memits_solution_and_romes_rank_one():
    generator = torch.Generator().manual_seed(0)
    d_in, d_out, n, lam = 12, 5, 3, 2.5
    samples = torch.randn(d_in, 40, generator=generator, dtype=torch.float64)
    C = samples @ samples.T / 40
    K = torch.randn(d_in, n, generator=generator, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=generator, dtype=torch.float64)
    memit = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)  # the MEMIT paper's form
    assert torch.allclose(least_squares_update(R, K, C, lam), memit, atol=1e-10)

    k, r = K[:, :1], R[:, :1]
    c_inv_k = torch.linalg.solve(C, k)
    s = (k.T @ c_inv_k).item()
    rome = r @ c_inv_k.T / s  # the ROME paper's rank-one update
    assert torch.allclose(least_squares_update(r, k, C, 0.0), rome, atol=1e-10)
    # MEMIT's λ only shrinks ROME's update, by s / (λ + s)
    assert torch.allclose(least_squares_update(r, k, C, lam), rome * s / (lam + s), atol=1e-10)


def test_rome_maps_the_edited_key_to_the_new_value_and_spares_c_orthogonal_keys(model, tokenizer):
    editor = _editor("rome")
    module = model.get_submodule(DOWN_PROJ.format(1))
    before = layer_weight(module).detach().double().clone()
    edited = editor.edit(model, tokenizer, [RECORDS[0]])
    done = editor.last_edits[0]
    delta = layer_weight(module).detach().double() - before
    with torch.no_grad():
        reached = module(done.key[None])[0]
    assert (reached - done.value).norm() < 1e-4 * done.value.norm()  # W' k* = v*
    assert done.nll_end < done.nll_start  # and v* was found by lowering the target's loss

    # Keys C⁻¹-orthogonal to k* keep their output: the update is ROME's least disturbance under C.
    direction = torch.linalg.solve(_second_moment(editor, 1), done.key.double())
    probes = torch.randn(direction.shape[0], 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probes -= direction[:, None] * (direction @ probes) / (direction @ direction)
    assert (delta @ probes).norm() < 1e-6 * (delta @ done.key.double()).norm() * probes.norm()
    edited.restore()


@pytest.mark.parametrize("lam", [0.0, 100.0])
def test_memit_with_one_edit_on_one_layer_is_rome(base_model, tokenizer, lam):
    """Same record, layer, prefixes and δ search (no clamp or decay, which the two scale differently): MEMIT's
    residual at the layer's output is ROME's δ at its MLP output, so its update is ROME's times s / (λ + s)."""
    same = {**SMALL, "clamp_norm_factor": 1e6, "v_weight_decay": 0.0}
    by_rome, by_memit = copy.deepcopy(base_model), copy.deepcopy(base_model)
    rome = ROMEEditor(ROMEEditorConfig(layer=1, **same))
    memit = MEMITEditor(MEMITEditorConfig(layers=(1,), mom2_update_weight=lam, **same))
    rome.edit(by_rome, tokenizer, [RECORDS[0]])
    memit.edit(by_memit, tokenizer, [RECORDS[0]])
    original = layer_weight(base_model.get_submodule(DOWN_PROJ.format(1))).detach().double()
    rome_delta = layer_weight(by_rome.get_submodule(DOWN_PROJ.format(1))).detach().double() - original
    memit_delta = layer_weight(by_memit.get_submodule(DOWN_PROJ.format(1))).detach().double() - original
    key = rome.last_edits[0].key.double()
    s = (key @ torch.linalg.solve(_second_moment(rome, 1), key)).item()
    expected = rome_delta * s / (lam + s)
    assert rome_delta.norm() > 0
    assert (memit_delta - expected).norm() < 2e-3 * expected.norm()


def test_alphaedit_leaves_the_outputs_of_preserved_keys_unchanged(model, tokenizer):
    """In float64, so that the update (small beside the weights) is read back exactly."""
    model = model.double()
    editor = _editor("alphaedit", l2=1e-4)
    modules = {layer: model.get_submodule(DOWN_PROJ.format(layer)) for layer in (0, 1)}
    before = {layer: layer_weight(m).detach().double().clone() for layer, m in modules.items()}
    edited = editor.edit(model, tokenizer, RECORDS[:2])
    for layer, module in modules.items():
        delta = layer_weight(module).detach().double() - before[layer]
        C = _second_moment(editor, layer)
        P = null_space_projection(C, editor.config.nullspace_threshold, editor.config.nullspace_relative)
        assert torch.allclose(P @ P, P, atol=1e-8) and 0.5 * len(P) < torch.trace(P) < len(P) - 1
        # keys in C's dominant subspace (the directions typical text uses) are preserved exactly
        generator = torch.Generator().manual_seed(layer)
        preserved = (torch.eye(P.shape[0], dtype=torch.float64) - P) @ torch.randn(P.shape[0], 8, generator=generator,
                                                                                   dtype=torch.float64)
        assert delta.norm() > 0
        assert (delta @ preserved).norm() < 1e-6 * delta.norm() * preserved.norm()
    edited.restore()


def test_alphaedit_keeps_earlier_edits_keys_closer_than_without_them():
    generator = torch.Generator().manual_seed(0)
    d_in, d_out = 10, 4
    P = torch.eye(d_in, dtype=torch.float64)
    K = torch.randn(d_in, 2, generator=generator, dtype=torch.float64)
    R = torch.randn(d_out, 2, generator=generator, dtype=torch.float64)
    K_past = K + 0.3 * torch.randn(d_in, 2, generator=generator, dtype=torch.float64)  # near the new keys
    without = alphaedit_update(R, K, P, None, l2=0.1)
    with_past = alphaedit_update(R, K, P, K_past @ K_past.T, l2=0.1)
    assert (with_past @ K_past).norm() < 0.8 * (without @ K_past).norm()


# -------------------------------------------------------------------------------------- restore and sequences

@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_restore_gives_back_identical_weights(method, model, tokenizer):
    original = _weights(model)
    edited = _editor(method).edit(model, tokenizer, RECORDS)
    assert not _same(_weights(model), original)
    edited.restore()
    assert _same(_weights(model), original)
    assert all(p.grad is None for p in model.parameters()) and not model.training


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_sequential_calls_accumulate_and_restore_last_first(method, model, tokenizer):
    editor = _editor(method)
    assert editor.sequential
    w0 = _weights(model)
    first = editor.edit(model, tokenizer, [RECORDS[0]])
    w1 = _weights(model)
    second = editor.edit(first.model, tokenizer, [RECORDS[1]])
    w2 = _weights(model)
    assert not _same(w1, w0) and not _same(w2, w1)
    # The second call used the unedited model's statistics (no second computation on the edited weights).
    assert sorted(editor.memo.cache.computed) == ([1] if method == "rome" else [0, 1])
    if method == "alphaedit":
        assert len(editor.past_keys[id(model)]) == 2
    second.restore()
    assert _same(_weights(model), w1)
    if method == "alphaedit":
        assert len(editor.past_keys[id(model)]) == 1
    first.restore()
    assert _same(_weights(model), w0)
    if method == "alphaedit":
        assert editor.past_keys[id(model)] == []


# ---------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("make, field", [
    (lambda: ROMEEditorConfig(v_lr=0), "v_lr"),
    (lambda: ROMEEditorConfig(v_num_grad_steps=0), "v_num_grad_steps"),
    (lambda: ROMEEditorConfig(clamp_norm_factor=0), "clamp_norm_factor"),
    (lambda: ROMEEditorConfig(key_samples=0), "key_samples"),
    (lambda: ROMEEditorConfig(layer="3"), "layer"),
    (lambda: ROMEEditorConfig(context_templates=[[0, 3]]), "context_templates"),
    (lambda: ROMEEditorConfig(context_templates=[5]), "context_templates"),
    (lambda: MEMITEditorConfig(layers=[]), "layers"),
    (lambda: MEMITEditorConfig(layers=[2, 2]), "repeats"),
    (lambda: MEMITEditorConfig(mom2_update_weight=-1), "mom2_update_weight"),
    (lambda: AlphaEditEditorConfig(nullspace_threshold=0), "nullspace_threshold"),
    (lambda: AlphaEditEditorConfig(l2=0), "l2"),
])
def test_bad_configs_are_refused_naming_the_field(make, field):
    with pytest.raises(EditInputError, match=field):
        make()


def test_bad_edit_inputs_are_refused_before_any_change(model, tokenizer):
    original = _weights(model)
    with pytest.raises(EditInputError, match=r"layer 7 \(from layer\) does not exist.*layers 0..2"):
        ROMEEditor(ROMEEditorConfig(layer=7, **SMALL)).edit(model, tokenizer, RECORDS[:1])
    with pytest.raises(EditInputError, match=r"layer 5 \(from layers\)"):
        MEMITEditor(MEMITEditorConfig(layers=(1, 5), **SMALL)).edit(model, tokenizer, RECORDS[:1])
    with pytest.raises(EditInputError, match="no records"):
        _editor("alphaedit").edit(model, tokenizer, [])
    no_target = EditRecord("Alice", "Alice lives in", [""], index=4)
    with pytest.raises(EditInputError, match="record 4 .*no target_new"):
        _editor("memit").edit(model, tokenizer, [no_target])
    assert _same(_weights(model), original)


# ---------------------------------------------------------------------------------------------- key statistics

def test_key_statistics_are_the_second_moment_of_the_corpus_keys(base_model, tokenizer):
    texts = ("Alice lives in Rome", "the a of Bruno works at Acme and Lima")
    stats = key_statistics(base_model, tokenizer, [1], KeyCorpus(n_samples=0, texts=texts), progress=False)[1]
    module = base_model.get_submodule(DOWN_PROJ.format(1))
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
    with torch.no_grad():
        for text in texts:  # one text at a time: no padding to leave out
            base_model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
    handle.remove()
    keys = torch.cat(seen).double()
    assert stats.tokens == keys.shape[0]
    assert torch.allclose(stats.second_moment.double(), keys.T @ keys / keys.shape[0], atol=1e-5)


def test_key_statistics_are_cached_and_reused_and_differ_between_models(base_model, tokenizer, monkeypatch):
    corpus = KeyCorpus(n_samples=8, sample_length=8)
    first = key_statistics(base_model, tokenizer, [0, 1], corpus, progress=False)
    assert not first[0].from_cache and first[0].tokens == 64 and first[0].seconds > 0
    C = first[0].second_moment
    assert torch.allclose(C, C.T) and torch.linalg.eigvalsh(C.double()).min() > -1e-6

    real_compute = keys_module.compute_key_statistics

    def must_not_compute(*args, **kwargs):
        raise AssertionError("key statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(keys_module, "compute_key_statistics", must_not_compute)
    again = key_statistics(base_model, tokenizer, [0, 1], corpus, progress=False)
    assert again[0].from_cache and torch.equal(again[0].second_moment, C)
    assert again[0].seconds == pytest.approx(first[0].seconds, abs=1e-3)  # the cost of the computation is kept

    monkeypatch.setattr(keys_module, "compute_key_statistics", real_compute)
    uncached = key_statistics(base_model, tokenizer, [0], corpus, directory="", progress=False)[0]
    assert not uncached.from_cache and torch.equal(uncached.second_moment, C)  # "" keeps nothing on disk
    monkeypatch.setattr(keys_module, "compute_key_statistics", must_not_compute)

    other = build_tiny_model(tokenizer, hidden_size=64, num_layers=3, seed=1)
    with pytest.raises(AssertionError, match="recomputed"):  # another model is not served this model's file
        key_statistics(other, tokenizer, [0], corpus, progress=False)
    monkeypatch.setattr(keys_module, "compute_key_statistics", real_compute)
    theirs = key_statistics(other, tokenizer, [0], corpus, progress=False)[0]
    assert not theirs.from_cache and not torch.allclose(theirs.second_moment, C)
    monkeypatch.setattr(keys_module, "compute_key_statistics", must_not_compute)
    ours = key_statistics(base_model, tokenizer, [0], corpus, progress=False)[0]  # both models' files coexist
    assert ours.from_cache and torch.equal(ours.second_moment, C)


def test_a_smaller_corpus_is_a_prefix_of_a_larger_one(base_model, tokenizer):
    """Each sampling batch has its own seed, so sample-count sweeps compare nested corpora."""
    small = keys_module.compute_key_statistics(base_model, tokenizer, [0], KeyCorpus(50, 4), progress=False)[0]
    large = keys_module.compute_key_statistics(base_model, tokenizer, [0], KeyCorpus(100, 4), progress=False)[0]
    rest = keys_module.compute_key_statistics(base_model, tokenizer, [0], KeyCorpus(100, 4), progress=False)[0]
    assert torch.equal(large.second_moment, rest.second_moment)
    assert not torch.allclose(small.second_moment, large.second_moment)
    assert document_start_ids(tokenizer) == [tokenizer.bos_token_id]


# ------------------------------------------------------------------------------------------ subject positions

def test_subject_last_token_and_its_fallback(tokenizer):
    text = "the city of Carla is Oslo"
    assert subject_token_span(tokenizer, text, "Carla") == (4, 4)  # <s> the city of Carla
    assert subject_last_token(tokenizer, text, "city of Carla") == 4
    assert subject_token_span(tokenizer, text, "carla") == (4, 4)  # case is ignored when the exact case is absent
    # Not in the prompt part (text[:end]): the prompt's last token.
    assert subject_last_token(tokenizer, text, "Dmitri", end=len("the city of Carla is")) == 5
    assert subject_last_token(tokenizer, text, "Oslo", end=len("the city of Carla is")) == 5
    assert subject_last_token(tokenizer, "a Alice and Alice", "Alice", start=8) == 4  # the occurrence after start


def test_capture_at_positions_reads_the_same_values_padded_or_alone(base_model, tokenizer):
    module = base_model.get_submodule(DOWN_PROJ.format(0))
    texts, positions = ["Alice lives in", "the city of Carla is Oslo"], [1, 4]
    together = capture_at_positions(base_model, tokenizer, {"k": (module, "input")}, texts, positions)["k"]
    alone = [capture_at_positions(base_model, tokenizer, {"k": (module, "input")}, [t], [p])["k"][0]
             for t, p in zip(texts, positions)]
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)


# ------------------------------------------------------------------------------------------------- tracing

def test_causal_trace_measures_nothing_without_noise_and_skips_records_without_their_subject(base_model, tokenizer):
    records = RECORDS + [EditRecord("Dmitri", "Alice works at", ["Acme"], index=9)]
    quiet = causal_trace(base_model, tokenizer, records, window=1, n_noise=1, noise_factor=0.0, progress=False)
    assert quiet.skipped == [9] and quiet.n_traced == 3 and quiet.layers == [0, 1, 2]
    assert quiet.p_corrupt == pytest.approx(quiet.p_clean, abs=1e-6) and quiet.record_indices == [0, 1, 2]
    assert quiet.dependent == [] and quiet.dependent_effect == []
    assert all(abs(e) < 1e-6 for e in quiet.mean_effect)
    noisy = causal_trace(base_model, tokenizer, records, window=7, n_noise=2, progress=False)
    assert noisy.noise_std > 0 and 0 <= noisy.best_layer <= 2
    # a window covering every layer restores every layer's MLP for every row: the same effect everywhere
    assert max(noisy.mean_effect) - min(noisy.mean_effect) < 1e-6


# ------------------------------------------------------------------------------------------------- profiles

@pytest.mark.parametrize("method, config_class", [("rome", ROMEEditorConfig), ("memit", MEMITEditorConfig),
                                                  ("alphaedit", AlphaEditEditorConfig)])
def test_every_profile_is_a_valid_config(method, config_class):
    profiles = read_yaml(CONFIGS_DIR / "editors" / f"{method}.yaml")
    assert set(profiles) == {"world", "small-real", "large-real"}
    for name, options in profiles.items():
        options = dict(options or {})
        depths = [options.pop("depth")] if "depth" in options else options.pop("depths", [])
        assert depths and all(0 <= d < 1 for d in depths), f"{method} {name}: give depth or depths in [0, 1)"
        config_class(**options)
