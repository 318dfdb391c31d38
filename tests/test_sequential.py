"""Sequential editing (`run_sequential`): experts added one at a time, each trained alone and never rewritten;
the curve written point by point; experts trained in worker processes fit the main process's model."""
import json
import time

import pytest
import torch

from t2edit.data.world import build_world
from t2edit.evaluation.composition import run_sequential, split_records
from t2edit.training import trained_experts
from t2edit.experts import Expert
from t2edit.setup import load_setup
from t2edit.svf import apply_svf
from tests.test_world import NO_TRAINING, hand_made_records, write_records


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    data = write_records(tmp_path_factory.mktemp("data") / "people.json", hand_made_records())
    out = tmp_path_factory.mktemp("worlds") / "people"
    build_world(data, out, config=NO_TRAINING, progress=False)
    return str(out), str(data)


def _expert_bytes(directory, k):
    expert = directory / f"expert-{k:04d}" / "expert"
    return {p.name: p.read_bytes() for p in sorted(expert.iterdir())}


def test_adding_experts_keeps_earlier_experts_and_writes_each_point(world_dir, tmp_path):
    world, data = world_dir
    setup = load_setup(world, data, 0, 3, progress=False)
    experts = tmp_path / "experts"
    first = run_sequential(setup, str(tmp_path / "a"), routers=("embedding",), sizes=[1, 2], experts_dir=experts,
                           progress=False)
    assert [row["edits"] for row in first] == [1, 2]
    assert json.loads((tmp_path / "a" / "sequential.json").read_text()) == first
    assert not (experts / "expert-0002").exists()  # a point needs only the experts up to its size
    before = [_expert_bytes(experts, k) for k in (0, 1)]

    more = run_sequential(setup, str(tmp_path / "b"), routers=("embedding", "scope"), sizes=[1, 3],
                          experts_dir=experts, progress=False)
    assert [(row["router"], row["edits"]) for row in more] == [("embedding", 1), ("scope", 1), ("embedding", 3),
                                                               ("scope", 3)]
    assert [_expert_bytes(experts, k) for k in (0, 1)] == before  # expert 3 changed neither of the first two
    assert (experts / "expert-0002" / "expert" / "expert_config.json").exists()
    assert all(0.0 <= row["edit_success"] <= 1.0 and row["first10_edit_success"] is not None for row in more)


def test_no_point_starts_after_the_deadline(world_dir, tmp_path):
    world, data = world_dir
    setup = load_setup(world, data, 0, 3, progress=False)
    curve = run_sequential(setup, str(tmp_path), routers=("embedding",), sizes=[1, 3], progress=False,
                           experts_dir=tmp_path / "experts", deadline=time.perf_counter() - 1)
    assert curve == [] and not (tmp_path / "sequential.json").exists()
    assert not (tmp_path / "experts").exists()  # nor was any expert trained for it


def test_experts_trained_in_worker_processes_fit_the_main_model(world_dir, tmp_path):
    world, data = world_dir
    setup = load_setup(world, data, 0, 3, progress=False)
    chunks = split_records(setup.edits, 3)
    order = list(trained_experts(setup, chunks, tmp_path, setup.edits, progress=False, workers=2))
    assert order == [0, 1, 2]
    svf = apply_svf(setup.model, Expert.from_pretrained(tmp_path / "expert-0000" / "expert").make_svf_config(),
                    progress=False)
    try:
        for k, chunk in enumerate(chunks):
            expert = Expert.from_pretrained(tmp_path / f"expert-{k:04d}" / "expert")
            expert.check_compatible(svf)  # same base fingerprint and layers as this process's model
            assert expert.info.edits[0]["prompt"] == chunk[0].prompt  # each worker trained its own chunk
    finally:
        svf.unload()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weight_fingerprint_is_the_same_on_the_gpu_and_on_the_cpu():
    """Experts trained by one-thread CPU workers are applied to the same weights on a GPU: the fingerprint that
    checks they belong together must not depend on where, or with how many threads, it is computed."""
    from t2edit.svf import weight_fingerprint

    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    on_cpu = weight_fingerprint(weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        assert weight_fingerprint(weight.clone()) == on_cpu
    finally:
        torch.set_num_threads(threads)
    assert weight_fingerprint(weight.cuda()) == on_cpu


@pytest.mark.parametrize("is_world, preset_name", [(True, "world"), (False, "llm")])
def test_experts_of_many_train_with_the_edited_models_preset(world_dir, tmp_path, monkeypatch, is_world,
                                                             preset_name):
    """Composition and sequential experts train with the settings `t2edit eval` uses for that model: the world
    preset on a fact world, the llm preset on a pretrained model (its learning rate, KL, sampling)."""
    import t2edit.training.fanout
    from t2edit.training import preset, train_one_expert

    setup = load_setup(*world_dir, start=0, n_edits=2, progress=False)
    if not is_world:
        setup.world_report, setup.model_name = None, "HuggingFaceTB/SmolLM2-135M-Instruct"
    seen = []

    class Stop(Exception):
        """Raised by the stand-in trainer once it has seen the config: nothing is trained."""

    def capture(model, tokenizer, edits, pool, config, **_):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(t2edit.training.fanout, "SVFTrainer", capture)
    with pytest.raises(Stop):
        train_one_expert(setup, setup.edits[:1], tmp_path / "run", setup.edits)
    # (steps, neighbours and logging are set per expert size; the rest comes from the preset)
    keys = ("learning_rate", "kl_coef", "top_k", "sample_neighbours", "baseline", "group_size", "rewards")
    expected = {k: preset(preset_name).get(k, getattr(t2edit.training.TrainConfig(), k)) for k in keys}
    assert {k: getattr(seen[0], k) for k in keys} == expected
    assert preset_name == "world" or expected != {k: getattr(t2edit.training.TrainConfig(), k) for k in keys}
