"""Past one process: `accelerate launch` with real processes on the CPU (gloo), each run checked against one
process doing the same work — data-parallel training of one expert (and a killed two-process run resumed), the same
expert trained on a model sharded with FSDP2, experts fanned out over the processes, and `t2edit eval` split over
them. Plus what needs no launch: keyed sampling (a prompt's rollouts do not depend on which process draws them) and
the tensor-parallel slices the vLLM worker recomposes."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from t2edit import vllm_worker as worker
from t2edit.data.records import EditRecord
from t2edit.data.world import build_world
from t2edit.distributed import Processes, gather, processes, share, unshare
from t2edit.editors.base import EditedModel, Editor
from t2edit.evaluation import evaluate_editor
from t2edit.rollouts import HFRollouts
from t2edit.tiny import build_tiny_model
from tests.test_world import NO_TRAINING, hand_made_records, write_records

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 420
TRAIN = ["--n_edits", "3", "--steps", "6", "--edits_per_step", "3", "--neighbours_per_step", "3",
         "--subject_neighbours_per_step", "1", "--group_size", "2", "--save_every", "2", "--eval_every", "3",
         "--kl_coef", "0.5", "--progress", "false"]
TIMING = {"seconds", "edit_seconds", "pre_edit_seconds", "router_fit_seconds", "elapsed_seconds"}


# ---------------------------------------------------------------------------------------------- launching

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small fact world (12 records) and one SVD / world cache shared by every launched process."""
    data = write_records(tmp_path_factory.mktemp("data") / "people.json", hand_made_records())
    out = tmp_path_factory.mktemp("worlds") / "people"
    build_world(data, out, config=NO_TRAINING, progress=False)
    return str(out), tmp_path_factory.mktemp("cache")


def _env(cache, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "T2EDIT_CACHE": str(cache), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)  # a launch inside a test run under a launcher must not inherit its rank
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(args, processes: int = 1, fsdp: bool = False, module: str = "t2edit.cli") -> list[str]:
    """`python -m t2edit.cli ARGS` in one process, else under `accelerate launch` with `processes` CPU processes
    (gloo), plain data parallel or FSDP2."""
    if processes == 1:
        return [sys.executable, "-m", module, *args]
    how = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", module, *args]


def run(args, cache, processes: int = 1, fsdp: bool = False) -> str:
    done = subprocess.run(command(args, processes, fsdp), env=_env(cache), cwd=REPO, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def z_of(directory) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / "expert" / "expert.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics_of(directory) -> list[dict]:
    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- no launch needed

def test_share_unshare_and_one_process_collectives():
    items = list(range(7))
    shares = [share(items, Processes(p, 3)) for p in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]] and unshare(shares) == items
    assert processes() == Processes() and gather({"a": 1}, Processes()) == [{"a": 1}]


def test_keyed_samples_of_a_prompt_do_not_depend_on_the_prompts_beside_it(tiny_tokenizer):
    """What lets the data-parallel trainer split a step's prompts over processes and still sample what one process
    samples: with seeds, a prompt's rollouts are the same alone, in another order, or beside other prompts."""
    model = build_tiny_model(tiny_tokenizer)
    rollouts = HFRollouts(model, tiny_tokenizer)
    a, b = "The capital of Foo is", "The spouse of"
    together = rollouts.sample([a, b], 4, 1.0, [6, 3], seeds=[11, 22])
    assert rollouts.sample([b, a], 4, 1.0, [3, 6], seeds=[22, 11]) == together[::-1]
    assert rollouts.sample([a], 4, 1.0, 6, seeds=[11]) == together[:1]
    assert len({tuple(ids) for ids in together[0]}) > 1  # the members of a group still differ
    assert rollouts.sample([a], 4, 1.0, 6, seeds=[12]) != together[:1]  # and the seed matters


class DrawingEditor(Editor):
    """An editor whose edit draws from torch's global generator without seeding it."""

    name = "drawing"

    def __init__(self):
        self.draws: list[float] = []

    def edit(self, model, tokenizer, records):
        self.draws.append(torch.rand(1).item())
        return EditedModel(model=model, restore=lambda: None)


def test_each_edit_call_starts_from_a_seeded_state_whatever_ran_before_it(tiny_tokenizer):
    """What lets split evaluation equal one process for editors that draw random numbers: the edit of record i
    starts from the same state in any process, whatever that process edited or sampled before."""
    model = build_tiny_model(tiny_tokenizer)
    records = [EditRecord(subject, f"The capital of {subject} is", ["Qux"], ["Bar"]) for subject in ("Foo", "Baz")]
    runs = []
    for before in (1, 2):
        torch.manual_seed(before)
        editor = DrawingEditor()
        evaluate_editor(editor, model, tiny_tokenizer, records, mode="single", fluency=False, progress=False)
        runs.append(editor.draws)
    assert runs[0] == runs[1] and len(set(runs[0])) == 2


@pytest.mark.parametrize("tp_size", [2, 4])
def test_each_tp_rank_recomposes_the_slice_vllm_would_cut_from_the_full_weight(tp_size):
    """vLLM's column-parallel layers (q/k/v, gate/up) keep rows of W (out, in), row-parallel ones (o, down) its
    columns; each rank rebuilds exactly its slice of W' from its own slice of U or Vᵀ."""
    torch.manual_seed(0)
    config = {"mask": "identity", "norm_preserving": True, "z_init": 1.0}
    for layer, (out, inp) in {"model.layers.0.mlp.up_proj": (16, 8), "model.layers.0.mlp.down_proj": (8, 16),
                              "model.layers.0.self_attn.q_proj": (8, 8)}.items():
        U, s, Vh = torch.linalg.svd(torch.randn(out, inp), full_matrices=False)
        z = 1 + 0.3 * torch.randn(s.shape)
        full = worker.recompose(U, s, Vh, z, config)
        split = worker.tp_split(layer)
        dim = 0 if split == "column" else 1
        size = full.shape[dim] // tp_size
        slices = []
        for rank in range(tp_size):
            shard, shards = worker.tp_shard(layer, rank, tp_size)
            mine = worker.recompose_shard(U, s, Vh, z, config, split, shard, shards)
            torch.testing.assert_close(mine, full.narrow(dim, rank * size, size))  # vLLM's weight_loader narrow
            kept = worker.shard_factors(U, s, Vh, split, shard, shards)
            assert sum(t.numel() for t in kept) < U.numel() + s.numel() + Vh.numel()  # a slice of U or Vᵀ only
            slices.append(mine)
        torch.testing.assert_close(torch.cat(slices, dim), full)
    # Fewer key/value heads than ranks: vLLM replicates them, rank r holding head r // (ranks / heads).
    assert [worker.tp_shard("model.layers.0.self_attn.k_proj", r, 4, num_kv_heads=2) for r in range(4)] == \
        [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert worker.tp_shard("model.layers.0.self_attn.q_proj", 3, 4, num_kv_heads=2) == (3, 4)
    with pytest.raises(ValueError, match="lm_head"):
        worker.tp_split("lm_head")


# ---------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """One expert trained by one process, and the same by two processes (data parallel) and by two processes on a
    model sharded with FSDP2, from the same data, settings and seed."""
    world_dir, cache = world
    root = tmp_path_factory.mktemp("train")
    outputs = {}
    for name, processes_, fsdp in (("one", 1, False), ("two", 2, False), ("fsdp", 2, True)):
        outputs[name] = run(["train", "--model", world_dir, *TRAIN, "--output_dir", str(root / name)], cache,
                            processes_, fsdp)
    return root, outputs


@pytest.mark.slow
def test_two_processes_train_the_z_one_process_trains_over_the_same_batch(trained):
    """Each step's 3 edits, 3 neighbours and 1 anchor are split 4 / 3 over the processes and z's gradients are
    summed: z after 6 steps, and every step's loss and rewards, equal one process's over the same whole batch."""
    root, _ = trained
    one, two = root / "one", root / "two"
    assert max_diff(z_of(one), z_of(two)) < 1e-4
    assert max(v.sub(1.0).abs().max().item() for v in z_of(one).values()) > 1e-2  # z did train
    rows_one, rows_two = metrics_of(one), metrics_of(two)
    # Only the main process writes the log (each step once) and the expert.
    assert [r["step"] for r in rows_two] == list(range(1, 7))
    for a, b in zip(rows_one, rows_two):
        assert a["rows_scored"] == b["rows_scored"]  # the batch was split, not computed twice
        for key in ("loss", "reward", "reward/exact_match", "reward/locality", "grad_norm", "kl"):
            assert a.get(key) == pytest.approx(b.get(key), rel=1e-4, abs=1e-6), (a["step"], key)
        assert a.get("edit_success_greedy") == b.get("edit_success_greedy")
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


@pytest.mark.slow
def test_fsdp_two_processes_shard_the_factors_and_train_the_same_z(trained):
    """accelerate launch --use_fsdp --fsdp_version 2 on two CPU processes (torch's FSDP2 over gloo): each process
    holds half of the base weights and SVF factors, z stays whole, and z after 6 steps equals one process's."""
    root, outputs = trained
    assert "process 0 holds 50.0% of the SVF factors" in outputs["fsdp"]
    assert "process 1 holds 50.0% of the SVF factors" in outputs["fsdp"]
    assert max_diff(z_of(root / "one"), z_of(root / "fsdp")) < 1e-4
    assert [r["step"] for r in metrics_of(root / "fsdp")] == list(range(1, 7))


@pytest.mark.slow
def test_a_killed_two_process_run_resumed_ends_equal_to_an_uninterrupted_one(world, trained, tmp_path):
    world_dir, cache = world
    root, _ = trained
    out = tmp_path / "killed"
    args = ["train", "--model", world_dir, *TRAIN, "--output_dir", str(out)]
    launcher = subprocess.Popen(command(args, 2, module="tests._distributed_worker"), cwd=REPO,
                                env=_env(cache, T2EDIT_TEST_STEP_DELAY="1.5"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    checkpoint = out / "checkpoint.pt"
    deadline = time.time() + LAUNCH_TIMEOUT
    while time.time() < deadline and launcher.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 2:
            break
        time.sleep(0.1)
    # Kill the launcher and both training processes at once (the launcher starts each in a session of its own).
    family = [launcher.pid] + [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    launcher.wait()
    step_at_kill = torch.load(checkpoint, weights_only=True)["step"]
    assert 2 <= step_at_kill < 6, launcher.stdout.read().decode()[-3000:]
    assert not (out / "expert").exists()

    run([*args, "--resume", "true"], cache, processes=2)
    assert max_diff(z_of(root / "two"), z_of(out)) < 1e-6
    assert [r["step"] for r in metrics_of(out)] == list(range(1, 7))


# ---------------------------------------------------------------------------------------------- many experts

@pytest.mark.slow
def test_experts_fanned_out_over_two_processes_equal_one_process(world, tmp_path):
    """`t2edit eval --composition 4` under the launcher: each process trains its share of the 4 experts, the main
    process gathers them into the one store and scores; experts and table equal one process's."""
    world_dir, cache = world
    args = ["eval", "--model", world_dir, "--n", "4", "--composition", "4", "--router", "embedding,scope"]
    run([*args, "--out", str(tmp_path / "one")], cache)
    output = run([*args, "--out", str(tmp_path / "two")], cache, processes=2)
    assert "expert 1 trained by process 1 of 2" in output and "expert 3 trained by process 1 of 2" in output
    assert "expert 2 trained by process 0 of 2" in output
    for k in range(4):
        one, two = (tmp_path / name / "experts-k4" / f"expert-{k:04d}" for name in ("one", "two"))
        assert max_diff(z_of(one), z_of(two)) < 1e-6
        assert json.loads((two / "expert" / "expert_config.json").read_text())["info"]["edits"] == \
            json.loads((one / "expert" / "expert_config.json").read_text())["info"]["edits"]
        assert (two / "metrics.jsonl").read_text().count("\n") == (one / "metrics.jsonl").read_text().count("\n")
    tables = [without_timings(json.loads((tmp_path / name / "results.json").read_text())) for name in ("one", "two")]
    assert tables[0] == tables[1] and len(tables[0]["methods"]) == 2


# ---------------------------------------------------------------------------------------------- evaluation

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "batch"])
def test_eval_split_over_two_processes_gathers_the_one_process_table(world, tmp_path, mode):
    """`t2edit eval` under the launcher: records split over the processes (single mode: edited there too; batch:
    every process makes the same edit), scores gathered; the table, fluency included, equals one process's."""
    world_dir, cache = world
    args = ["eval", "--model", world_dir, "--n", "5", "--method", "none,ft,lora", "--mode", mode]
    run([*args, "--out", str(tmp_path / "one")], cache)
    run([*args, "--out", str(tmp_path / "two")], cache, processes=2)
    one, two = (without_timings(json.loads((tmp_path / name / "results.json").read_text())) for name in ("one", "two"))
    assert one == two
    assert [m["n_records"] for m in one["methods"]] == [5, 5, 5]
    assert all(m["fluency"] is not None for m in one["methods"])
    assert any(m["edit_success"] > 0.5 for m in one["methods"])  # the edits did something to score
