import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2edit.data.records import EditRecord, Probe
from t2edit.svf import apply_svf
from t2edit.tiny import build_tiny_model, build_tiny_tokenizer, teach_facts
from t2edit.leakage import learning_pool
from t2edit.svf import model_bypassed
from t2edit.training import SVFTrainer, TrainConfig, group_advantages, parse_train_config

FACTS = {
    "The city of Ann is": "Rome", "The city of Bob is": "Oslo", "The city of Cy is": "Lima",
    "The city of Dee is": "Rome", "The city of Eve is": "Oslo", "The job of Ann is": "cook",
    "The job of Bob is": "poet", "The job of Cy is": "cook", "The job of Dee is": "poet",
    "The job of Eve is": "cook", "The pet of Ann is": "cat", "The pet of Bob is": "dog",
}


def tiny_edits():
    """Two edits whose targets the world already answers elsewhere; neighbours from other facts."""
    edits = [
        EditRecord("Ann", "The city of Ann is", ["Oslo"], ["Rome"],
                   locality={"relation_specificity": [Probe("The job of Ann is", ["cook"])]},
                   portability={"subject_aliasing": [Probe("The pet of Ann is", ["cat"])]}),
        EditRecord("Bob", "The city of Bob is", ["Lima"], ["Oslo"],
                   locality={"relation_specificity": [Probe("The job of Bob is", ["poet"])]}),
    ]
    others = [EditRecord("Cy", "The city of Cy is", ["Rome"], ["Lima"],
                         locality={"relation_specificity": [Probe("The job of Cy is", ["cook"])]})]
    pool = learning_pool(edits, others, extra_prompts=list(FACTS)).neighbour_prompts
    return edits, pool


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    torch.manual_seed(0)
    texts = [f"{p} {a}" for p, a in FACTS.items()]
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    teach_facts(model, tokenizer, texts, steps=150, answer_starts=[len(p) + 1 for p in FACTS])
    path = tmp_path_factory.mktemp("world")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    assert torch.allclose(group_advantages(rewards, groups, "group_mean"),
                          torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0]))
    assert torch.allclose(group_advantages(rewards, groups, "leave_one_out"),
                          torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0]))
    assert torch.equal(group_advantages(rewards, groups, "none"), rewards)
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(rewards, groups, "median")


def test_trainer_learns_unsampled_targets_and_its_router_leaves_held_out_prompts_alone(tiny_world, tmp_path):
    """(That no scored prompt reaches the trainer is tests/test_leakage.py's job, on the real paths.)"""
    model, tokenizer = _load(tiny_world)
    edits, pool = tiny_edits()
    config = TrainConfig(output_dir=str(tmp_path / "run"), steps=40, edits_per_step=2, lr_scheduler_type="constant",
                         neighbours_per_step=4, group_size=4, save_every=0, eval_every=20, progress=False)
    svf = apply_svf(model, config.svf_config(), progress=False)
    trainer = SVFTrainer(svf, tokenizer, edits, pool, config, subject_prompts=["The pet of Bob is"])
    assert trainer.edit_success_greedy() == 0.0
    expert = trainer.train()
    assert trainer.edit_success_greedy() == 1.0
    assert "The pet of Bob is" in trainer.seen_prompts  # the same-subject anchor was trained on
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"reward/exact_match", "reward/locality", "z/mean", "grad_norm"} <= set(rows[0])
    assert rows[-1]["edit_success_greedy"] == 1.0
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 1000
    assert (tmp_path / "run" / "expert" / "expert.safetensors").exists()
    assert [e["prompt"] for e in expert.info.edits] == [r.prompt for r in edits] and \
        all(e["subject"] for e in expert.info.edits)
    # The two-pass router picks the edit prompts, and none of the prompts the evaluation scores for locality: held
    # out from its calibration (the guard keeps them out), so this checks that the threshold generalises.
    from t2edit.routing import last_states

    held_out = [p.prompt for e in edits for probes in e.locality.values() for p in probes] + ["The pet of Ann is"]
    assert not set(held_out) & (set(pool) | {"The pet of Bob is"})
    assert expert.router.applies(last_states(svf, tokenizer, [e.prompt for e in edits])).all()
    routed = expert.router.applies(last_states(svf, tokenizer, held_out))
    assert not routed.any(), [p for p, r in zip(held_out, routed) if r]


def test_training_stops_at_the_first_checked_step_that_edits_and_decodes_only_once_the_forced_bound_says_so(
        tiny_world, tmp_path):
    model, tokenizer = _load(tiny_world)
    edits, pool = tiny_edits()
    config = TrainConfig(output_dir=str(tmp_path / "run"), steps=40, edits_per_step=2, lr_scheduler_type="constant",
                         neighbours_per_step=4, group_size=4, save_every=0, eval_every=1, stop_at_edit_success=1.0,
                         progress=False)
    svf = apply_svf(model, config.svf_config(), progress=False)
    trainer = SVFTrainer(svf, tokenizer, edits, pool, config)
    assert trainer.edit_success_forced() == 0.0
    greedy_checks = []
    real = trainer.edit_success_greedy
    trainer.edit_success_greedy = lambda: greedy_checks.append(trainer.step) or real()
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert trainer.stopped_early and len(rows) < 40 and rows[-1]["edit_success_greedy"] == 1.0
    assert all(r["edit_success_forced"] < 1.0 and "edit_success_greedy" not in r for r in rows[:-1])
    # the greedy decode ran only at steps whose forced bound reached the target, and never said more than it
    assert greedy_checks == [r["step"] for r in rows if r.get("edit_success_forced") == 1.0]
    assert all(r["edit_success_greedy"] <= r["edit_success_forced"] for r in rows if "edit_success_greedy" in r)
    assert trainer.edit_success_forced() == trainer.edit_success_greedy() == 1.0


def test_a_warm_start_takes_supervised_steps_first_then_samples(tiny_world, tmp_path):
    edits, pool = tiny_edits()

    def run(name, steps, **settings):
        model, tokenizer = _load(tiny_world)
        config = TrainConfig(output_dir=str(tmp_path / name), steps=steps, edits_per_step=2, neighbours_per_step=2,
                             group_size=3, lr_scheduler_type="constant", save_every=0, eval_every=0, progress=False,
                             **settings)
        svf = apply_svf(model, config.svf_config(), progress=False)
        SVFTrainer(svf, tokenizer, edits, pool, config).train()
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return rows, torch.cat([p.detach().flatten() for p in svf.z_parameters()])

    warm, _ = run("warm", 4, warm_start_steps=2)
    # warm-start steps score one row per item (the target, or a neighbour's answer) and sample nothing
    assert [r["rows_scored"] for r in warm[:2]] == [4, 4]
    assert all(math.isnan(r["reward"]) and r["time/sampling"] == 0.0 for r in warm[:2])
    assert all(r["rows_scored"] > 4 and not math.isnan(r["reward"]) for r in warm[2:])
    # and they are the supervised objective's steps: the same z as two steps of ce
    _, z_warm = run("warm2", 2, warm_start_steps=2)
    _, z_ce = run("ce", 2, objective="ce")
    _, z_rl = run("rl", 2)
    assert torch.equal(z_warm, z_ce) and not torch.equal(z_warm, z_rl)
    with pytest.raises(ValueError, match="warm_start_steps=-1"):
        TrainConfig(warm_start_steps=-1)


def test_learning_rate_decays_and_a_wrong_scheduler_name_is_named(tiny_world, tmp_path):
    model, tokenizer = _load(tiny_world)
    edits, pool = tiny_edits()
    config = TrainConfig(output_dir=str(tmp_path / "run"), steps=4, edits_per_step=2, neighbours_per_step=2,
                         group_size=2, save_every=0, eval_every=0, progress=False)
    svf = apply_svf(model, config.svf_config(), progress=False)
    SVFTrainer(svf, tokenizer, edits, pool, config).train()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < config.learning_rate and lrs[-1] == 0.0
    config.lr_scheduler_type = "sawtooth"
    with pytest.raises(ValueError, match="lr_scheduler_type='sawtooth'.*cosine"):
        SVFTrainer(svf, tokenizer, edits, pool, config)


def test_guided_groups_move_z_where_unguided_exact_match_gets_no_signal(tiny_world, tmp_path):
    """The sparse-reward problem: without the guide no sampled answer is the target, so z never moves; with it, the
    same run (same settings, seed and reward) does move z."""
    edits, pool = tiny_edits()
    moved = {}
    for guided in (False, True):
        model, tokenizer = _load(tiny_world)
        config = TrainConfig(output_dir=str(tmp_path / f"guided-{guided}"), steps=5, guided=guided, kl_coef=0.0,
                             edits_per_step=2, neighbours_per_step=0, group_size=4, save_every=0, eval_every=0,
                             progress=False, rewards={"exact_match": 1.0})
        svf = apply_svf(model, config.svf_config(), progress=False)
        before = svf.get_z()
        SVFTrainer(svf, tokenizer, edits, pool, config).train()
        after = svf.get_z()
        moved[guided] = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved[False] == 0.0 and moved[True] > 1e-2, moved


def test_kl_is_zero_at_the_unedited_model(tiny_world):
    from t2edit.training import sequence_logprobs

    model, tokenizer = _load(tiny_world)
    svf = apply_svf(model, progress=False)
    ids = [tokenizer(" Oslo", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    rows = torch.tensor([True, False])
    prompts = ["The city of Ann is"] * 2
    logp, kl = sequence_logprobs(svf, tokenizer, prompts, ids * 2, kl_rows=rows)
    assert abs(kl[0].item()) < 1e-5 and kl[1].item() == 0.0
    with torch.no_grad():
        for z in svf.z_parameters():
            z.add_(torch.randn_like(z))
    _, kl = sequence_logprobs(svf, tokenizer, prompts, ids * 2, kl_rows=rows)
    assert kl[0].item() > 1e-4 and kl[1].item() == 0.0  # only the marked (neighbour) row is anchored
    with model_bypassed(svf):
        _, kl_bypassed = sequence_logprobs(svf, tokenizer, prompts, ids * 2, kl_rows=rows)
    assert abs(kl_bypassed[0].item()) < 1e-6


def test_experts_sharing_the_unedited_models_answers_train_the_same_z_without_recomputing_them(tiny_world,
                                                                                              tmp_path):
    """A single-edit run or a stream trains expert after expert on one base model: the neighbours' unedited answers
    and KL references are computed once for all of them, and an expert trained with them shared ends where it ends
    when it computes them all itself."""
    from t2edit.training.references import UneditedModelCache

    edits, pool = tiny_edits()

    def train(edit, cache, name):
        model, tokenizer = _load(tiny_world)
        config = TrainConfig(output_dir=str(tmp_path / name), steps=3, edits_per_step=1, neighbours_per_step=4,
                             group_size=2, kl_coef=1.0, save_every=0, eval_every=0, progress=False)
        svf = apply_svf(model, config.svf_config(), progress=False)
        SVFTrainer(svf, tokenizer, [edit], pool, config, unedited=cache).train()
        return svf.get_z()

    shared = UneditedModelCache()
    train(edits[0], shared, "first")
    answered, computed = shared.generated, shared.computed
    assert answered > 0 and computed > 0
    second_shared = train(edits[1], shared, "second-shared")
    alone = UneditedModelCache()
    second_alone = train(edits[1], alone, "second-alone")
    assert shared.generated - answered < alone.generated  # neighbours answered for the first expert not asked again
    assert shared.computed - computed < alone.computed
    assert all(torch.allclose(second_shared[k], second_alone[k], atol=1e-6) for k in second_alone)


def test_existing_checkpoint_needs_resume(tiny_world, tmp_path):
    model, tokenizer = _load(tiny_world)
    edits, pool = tiny_edits()
    config = TrainConfig(output_dir=str(tmp_path / "run"), steps=2, save_every=1, eval_every=0, progress=False)
    SVFTrainer(apply_svf(model, config.svf_config(), progress=False), tokenizer, edits, pool, config).train()
    model, tokenizer = _load(tiny_world)
    with pytest.raises(FileExistsError, match="--resume"):
        SVFTrainer(apply_svf(model, config.svf_config(), progress=False), tokenizer, edits, pool, config).train()


def test_config_from_yaml_and_overrides(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("steps: 7\nlearning_rate: 0.5\nrewards:\n  exact_match: 2.0\n")
    config = parse_train_config(["--config", str(config_file), "--steps", "9"])
    assert (config.steps, config.learning_rate, config.rewards) == (9, 0.5, {"exact_match": 2.0})
    with pytest.raises(FileNotFoundError, match="configs/"):
        parse_train_config(["--config", str(tmp_path / "missing.yaml")])


def _worker(world, out, steps, mode, delay):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "tests._resume_worker", str(world), str(out), str(steps), mode,
                             str(delay)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_z(tiny_world, tmp_path):
    steps = 10
    reference = _worker(tiny_world, tmp_path / "straight", steps, "fresh", 0.0)
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()[-2000:]

    killed = _worker(tiny_world, tmp_path / "killed", steps, "fresh", 0.5)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 4:
            break
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    step_at_kill = torch.load(checkpoint, weights_only=True)["step"]
    assert 4 <= step_at_kill < steps
    assert not (tmp_path / "killed" / "expert").exists()

    resumed = _worker(tiny_world, tmp_path / "killed", steps, "resume", 0.0)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()[-2000:]
    z_straight = load_file(tmp_path / "straight" / "expert" / "expert.safetensors")
    z_resumed = load_file(tmp_path / "killed" / "expert" / "expert.safetensors")
    diff = max((z_straight[k] - z_resumed[k]).abs().max().item() for k in z_straight)
    print(f"max |z_straight - z_resumed| = {diff:.2e}")
    assert diff <= 1e-6, diff
    neutral = TrainConfig().z_init  # the worker trains with the default SVF config
    assert max((z_straight[k] - neutral).abs().max().item() for k in z_straight) > 1e-3  # z actually trained
    logged = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_scoring_equals_one_forward_per_row(tiny_tokenizer, arch):
    """Rows of one group share their prompt's forward pass; log-probabilities, KL and z's gradient must be those
    of scoring every row on its own."""
    from t2edit.svf import SVFConfig
    from t2edit.tiny import build_tiny_model
    from t2edit.training import sequence_logprobs
    from t2edit.training.objective import _plain_logits

    torch.manual_seed(0)
    model = build_tiny_model(tiny_tokenizer, arch=arch)
    tiny_tokenizer.padding_side = "left"
    svf = apply_svf(model, SVFConfig(mask="identity", norm_preserving=False, z_init=1.0, svd_cache_dir=""),
                    progress=False)
    with torch.no_grad():
        for z in svf.z_parameters():
            z.add_(torch.randn_like(z) * 0.1)  # an edited model, so the KL rows are not trivially 0
    ids = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = ["The spouse of Ann is", "The spouse of Ann is", "The spouse of Ann is", "The capital of Foo is",
               "The capital of Baz is", "The capital of Baz is"]
    completions = [ids(" Bob Smith"), ids(" Carl"), ids(" Bob"), ids(" Bar"), ids(" Qux"), ids(" Bar painter")]
    kl_rows = torch.tensor([False, False, False, True, True, False])

    def run(force_plain: bool):
        for z in svf.z_parameters():
            z.grad = None
        if force_plain:
            from t2edit.training import objective

            original = objective._shared_prefix_logits
            objective._shared_prefix_logits = _plain_logits
        try:
            logps, kl = sequence_logprobs(svf, tiny_tokenizer, prompts, completions, kl_rows=kl_rows)
        finally:
            if force_plain:
                objective._shared_prefix_logits = original
        (logps.sum() + kl.sum()).backward()
        return logps.detach(), kl.detach(), torch.cat([z.grad.flatten() for z in svf.z_parameters()])

    from t2edit.training import objective

    calls = []
    shared_path = objective._shared_prefix_logits
    objective._shared_prefix_logits = lambda *a: calls.append(1) or shared_path(*a)
    try:
        shared = run(False)
    finally:
        objective._shared_prefix_logits = shared_path
    plain = run(True)
    assert calls, "the rows share prompts: the shared-prefix path must have run"
    assert torch.allclose(shared[0], plain[0], atol=1e-4), (shared[0], plain[0])
    assert torch.allclose(shared[1], plain[1], atol=1e-4) and shared[1][3] > 0
    assert torch.allclose(shared[2], plain[2], atol=1e-4, rtol=1e-3)


def test_llm_preset_fills_what_the_user_did_not_set(tmp_path):
    from t2edit.training import apply_preset, parse_train_config, preset, preset_name

    assert preset_name(None) == "world" and preset_name("smollm2-135m") == "llm"
    config = parse_train_config(["--model", "smollm2-135m", "--learning_rate", "0.3", "--output_dir", str(tmp_path)])
    assert config.learning_rate == 0.3  # given on the command line: kept
    assert config.top_k == preset("llm")["top_k"] == 50 and config.sample_neighbours is False  # from the preset
    world = apply_preset(TrainConfig())
    assert world.learning_rate == TrainConfig().learning_rate and world.sample_neighbours == TrainConfig().sample_neighbours
    # A YAML value wins over the preset as a command-line one does.
    run = tmp_path / "run.yaml"
    run.write_text("model: smollm2-135m\nkl_coef: 3.5\n")
    from_yaml = parse_train_config(["--config", str(run), "--output_dir", str(tmp_path)])
    assert from_yaml.kl_coef == 3.5 and from_yaml.learning_rate == preset("llm")["learning_rate"]
    # Settings a job passes in code win over the preset too.
    from types import SimpleNamespace

    from t2edit.jobs import train_config_for

    given = train_config_for(SimpleNamespace(world_report=None, model_name="smollm2-135m"), learning_rate=0.07,
                             eval_every=1)
    assert (given.learning_rate, given.eval_every) == (0.07, 1) and given.top_k == preset("llm")["top_k"]
    with pytest.raises(ValueError, match="single_edit_learning_rate=0"):
        TrainConfig(single_edit_learning_rate=0)


def test_an_expert_of_one_edit_takes_its_own_learning_rate(tiny_world, tmp_path):
    model, tokenizer = _load(tiny_world)
    edits, pool = tiny_edits()
    config = TrainConfig(output_dir=str(tmp_path), learning_rate=0.01, single_edit_learning_rate=0.3, progress=False)
    svf = apply_svf(model, config.svf_config(), progress=False)
    rates = [SVFTrainer(svf, tokenizer, chosen, pool, config).optimizer.param_groups[0]["lr"]
             for chosen in (edits[:1], edits)]
    assert rates == [0.3, 0.01]


def test_a_config_with_an_unknown_or_broken_setting_is_one_clear_error(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown setting.*learning_rat"):
        parse_train_config(["--config", str(bad_key)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_train_config(["--config", str(broken)])
    with pytest.raises(ValueError, match="--config needs a YAML file"):
        parse_train_config(["--config"])
