"""The training run's settings: one dataclass, read from YAML and the command line (TRL's parser).

Defaults are the "world" preset (t2edit's tiny fact-world models). A pretrained model gets the "llm" preset for every
setting the run does not give (configs/presets/llm.yaml); YAML and command-line values always win.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from t2edit.files import CONFIGS_DIR, read_yaml
from t2edit.svf import SVFConfig


def _doc(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything one training run needs; parsed from YAML + command line by `t2edit train` / scripts/train_rl.py.
    Each field: type, default, and why it is there (`--help` prints the same)."""

    # -- what to edit ----------------------------------------------------------------------------------------------
    data: str | None = field(default=None, metadata=_doc(
        "KnowEdit / CounterFact / ZsRE file, a hub dataset name, 'builtin' (the fact world's records) or "
        "'real-facts' (the shipped real facts); None: 'builtin', or a world directory's own records"))
    model: str | None = field(default=None, metadata=_doc(
        "smollm2-135m (shipped), a transformers directory or hub name, or a world directory; None: the fact world "
        "of `data`"))
    world_preset: str = field(default="default", metadata=_doc("fact-world size when model is unset: default | tiny"))
    start: int = field(default=0, metadata=_doc("index of the first edited record"))
    n_edits: int = field(default=50, metadata=_doc("number of records edited into one expert"))
    output_dir: str = field(default="runs/expert", metadata=_doc("expert/, checkpoint.pt, metrics.jsonl, plots"))
    skip_bad: bool = field(default=False, metadata=_doc("skip malformed records instead of stopping"))
    neighbour_data: str | None = field(default=None, metadata=_doc(
        "extra file of other facts for neighbour prompts (never the evaluated records)"))

    # -- SVF: which matrices, and how z maps to singular values ------------------------------------------------------
    target_modules: str = field(default="mlp", metadata=_doc(
        "mlp | attn | all-linear | name suffixes | re:<regex> (Transformer²: mlp)"))
    mask: str = field(default="identity", metadata=_doc(
        "identity (W' = U diag(s·z) Vᵀ) | sigmoid (Transformer²'s sigmoid(z)·max_mult); identity learns edits "
        "several times faster on fact worlds (docs/training.md)"))
    max_mult: float = field(default=1.0, metadata=_doc("sigmoid mask: the largest multiplier"))
    norm_preserving: bool = field(default=False, metadata=_doc(
        "rescale σ to keep Σs (Transformer²: true)"))
    z_init: float = field(default=1.0, metadata=_doc(
        "initial z; 1.0 is the identity mask's neutral point, so the expert starts as the unedited model "
        "(Transformer²: 0.1 through the sigmoid)"))

    # -- optimisation ------------------------------------------------------------------------------------------------
    learning_rate: float = field(default=0.2, metadata=_doc(
        "Adam's step (Transformer²: 2e-3 for 8B models; tiny fact worlds need a larger one)"))
    single_edit_learning_rate: float | None = field(default=None, metadata=_doc(
        "Adam's step for an expert of one edit (None: learning_rate); one edit's gradient does not fight others', "
        "so it takes a larger step than a batch's"))
    max_grad_norm: float = field(default=1e-3, metadata=_doc("gradient-norm clip on z (Transformer²'s)"))
    steps: int = field(default=250, metadata=_doc("optimizer steps (fewer when stop_at_edit_success is met)"))
    lr_scheduler_type: str = field(default="cosine", metadata=_doc(
        "transformers scheduler name: cosine | linear | constant | ... (decays to 0 over `steps`; a decaying rate "
        "settles z once most edits are learned)"))
    warmup_steps: int = field(default=0, metadata=_doc("scheduler warm-up steps"))
    stop_at_edit_success: float = field(default=0.0, metadata=_doc(
        "stop once greedy edit success on the edit prompts reaches this (checked every eval_every; 0: off)"))

    # -- REINFORCE ---------------------------------------------------------------------------------------------------
    objective: str = field(default="reinforce", metadata=_doc(
        "reinforce (guided groups, exact-match rewards) | ce (supervised cross-entropy on the target: the "
        "reference REINFORCE is measured against)"))
    warm_start_steps: int = field(default=0, metadata=_doc(
        "the first N steps are supervised (ce: the targets teacher-forced, nothing sampled), the rest `objective`'s; "
        "a guided REINFORCE step without a baseline pushes the target up as ce does, but also samples and scores a "
        "rollout per prompt that earns nothing until the edit is nearly learned"))
    group_size: int = field(default=2, metadata=_doc("sampled answers per prompt (plus the guide, if on)"))
    guided: bool = field(default=True, metadata=_doc(
        "add the rewarded answer to each group: a counterfactual target is never sampled, so without it an "
        "exact-match reward gives no gradient"))
    baseline: str = field(default="group_mean", metadata=_doc("group_mean | leave_one_out | none"))
    temperature: float = field(default=1.0, metadata=_doc("sampling temperature of the rollouts"))
    top_k: int = field(default=0, metadata=_doc("sample from the k likeliest tokens (0: all)"))
    top_p: float = field(default=1.0, metadata=_doc("nucleus sampling (1.0: off)"))
    rewards: dict = field(default_factory=lambda: {"exact_match": 1.0, "locality": 1.0}, metadata=_doc(
        "reward plugin name -> weight (rewards/ registry; JSON on the command line)"))
    max_new_tokens: int = field(default=0, metadata=_doc("rollout length; 0: each edit's longest answer + 2 tokens"))
    edits_per_step: int = field(default=50, metadata=_doc("edit prompts per step"))

    # -- locality ----------------------------------------------------------------------------------------------------
    neighbours_per_step: int = field(default=64, metadata=_doc("prompts of other facts per step"))
    neighbours_per_edit: int = field(default=4, metadata=_doc(
        "at most this many neighbours per edit in a step (0: no cap): many neighbour rows drown one edit row, and "
        "on a real model they are most of a small expert's step"))
    sample_neighbours: bool = field(default=True, metadata=_doc(
        "also sample neighbour prompts and reward keeping the unedited answer; false: neighbours are anchored by "
        "the KL term alone (the llm preset)"))
    subject_neighbours_per_step: int = field(default=0, metadata=_doc(
        "other relations asked about the edited subjects, trained on per step (0: they only calibrate routing)"))
    kl_coef: float = field(default=10.0, metadata=_doc("weight of KL(unedited ‖ edited) on neighbour prompts"))
    route_margin: float = field(default=0.5, metadata=_doc(
        "the expert's own router: its threshold sits this far from the closest neighbour's similarity to 1"))
    router_calibration_prompts: int = field(default=512, metadata=_doc(
        "neighbour / anchor prompts sampled to calibrate the expert's own router (0: all)"))

    # -- cost --------------------------------------------------------------------------------------------------------
    precision: str = field(default="auto", metadata=_doc(
        "auto (bf16 autocast on GPUs and AMX CPUs, else fp32) | bf16 | fp32; z and its optimizer stay fp32"))
    rows_per_chunk: int = field(default=64, metadata=_doc(
        "rollouts scored per forward/backward (gradients accumulate over a step's chunks; bounds memory)"))
    reference_batch: int = field(default=128, metadata=_doc(
        "neighbours whose unedited answers are generated together, when a step needs new ones"))

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    seed: int = field(default=0, metadata=_doc("data order and sampling"))
    save_every: int = field(default=25, metadata=_doc("steps between atomic checkpoints (0: none)"))
    eval_every: int = field(default=25, metadata=_doc("steps between greedy edit-success checks (0: none)"))
    resume: bool = field(default=False, metadata=_doc("continue from output_dir/checkpoint.pt"))
    report_to: str = field(default="none", metadata=_doc("none | wandb (offline without a login)"))
    wandb_project: str = field(default="t2edit", metadata=_doc("Weights & Biases project"))
    progress: bool = field(default=True, metadata=_doc("progress bars"))

    # -- rollouts from vLLM ------------------------------------------------------------------------------------------
    rollout_backend: str = field(default="transformers", metadata=_doc("transformers | vllm"))
    vllm_server_url: str = field(default="http://localhost:8000", metadata=_doc("server mode: scripts/serve_vllm.sh"))
    vllm_mode: str = field(default="server", metadata=_doc(
        "server (vLLM on another GPU) | colocate (vLLM inside this process, one GPU)"))
    vllm_sync: str = field(default="auto", metadata=_doc(
        "auto | z (send only z to t2edit's worker extension) | merged (send W' under HF names)"))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_doc("colocate mode: vLLM's GPU share"))

    def __post_init__(self):
        """One clear line for a setting that cannot work, before anything is loaded or written."""
        at_least = {"steps": 1, "n_edits": 1, "start": 0, "group_size": 1, "edits_per_step": 1, "top_k": 0,
                    "neighbours_per_step": 0, "neighbours_per_edit": 0, "subject_neighbours_per_step": 0,
                    "max_new_tokens": 0, "warmup_steps": 0, "warm_start_steps": 0,
                    "rows_per_chunk": 1, "reference_batch": 1, "router_calibration_prompts": 0, "save_every": 0,
                    "eval_every": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least {low}")
        positive = ("learning_rate", "max_grad_norm", "temperature", "max_mult")
        for name in positive:
            if not getattr(self, name) > 0:  # also catches NaN
                raise ValueError(f"{name}={getattr(self, name)}: must be greater than 0")
        if self.single_edit_learning_rate is not None and not self.single_edit_learning_rate > 0:
            raise ValueError(f"single_edit_learning_rate={self.single_edit_learning_rate}: must be greater than 0 "
                             f"(or unset: learning_rate)")
        for name, low, high in (("top_p", 0.0, 1.0), ("route_margin", 0.0, 1.0), ("stop_at_edit_success", 0.0, 1.0),
                                ("vllm_gpu_memory_utilization", 0.0, 1.0)):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name}={getattr(self, name)}: must lie in [{low}, {high}]")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef={self.kl_coef}: must be 0 (off) or more")
        choices = {"objective": ("reinforce", "ce"), "baseline": ("group_mean", "leave_one_out", "none"),
                   "precision": ("auto", "bf16", "fp32"), "report_to": ("none", "wandb"),
                   "rollout_backend": ("transformers", "vllm"), "vllm_mode": ("server", "colocate"),
                   "vllm_sync": ("auto", "z", "merged"), "world_preset": ("default", "tiny"),
                   "mask": ("identity", "sigmoid")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")

    def svf_config(self) -> SVFConfig:
        return SVFConfig(target_modules=self.target_modules, mask=self.mask, max_mult=self.max_mult,
                         norm_preserving=self.norm_preserving, z_init=self.z_init)


def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    """YAML (`--config FILE`) then command-line overrides, TRL style. `rewards` on the command line is JSON."""
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config_file = None
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv) or argv[at + 1].startswith("--"):
            raise ValueError("--config needs a YAML file, e.g. --config configs/demo.yaml")
        config_file = argv[at + 1]
        yaml_keys = set(read_yaml(config_file))  # one clear error for a missing or broken file
        unknown = sorted(yaml_keys - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise ValueError(f"{config_file}: unknown setting(s) {', '.join(unknown)}; see `t2edit train --help`")
    rewards = None
    if "--rewards" in argv:  # a mapping does not fit argparse: take it as JSON
        at = argv.index("--rewards")
        try:
            rewards = json.loads(argv[at + 1])
        except (IndexError, json.JSONDecodeError):
            raise ValueError('--rewards takes JSON, e.g. --rewards \'{"exact_match": 1.0, "locality": 1.0}\'') from None
        del argv[at:at + 2]
    (config,) = TrlParser((TrainConfig,)).parse_args_and_config(argv)
    if rewards is not None:
        config.rewards = rewards
    explicit = {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    if config_file is not None:
        explicit |= yaml_keys
    return apply_preset(config, explicit | ({"rewards"} if rewards is not None else set()))


PRESET_NAMES = ("world", "llm")


def preset_name(model: str | None) -> str:
    """"world" for a fact world (no model, or a world directory), "llm" for any pretrained model."""
    if model is None or (Path(model) / "world.json").exists():
        return "world"
    return "llm"


def preset(name: str) -> dict:
    """The settings of a preset, from configs/presets/<name>.yaml, checked against TrainConfig's fields."""
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    path = CONFIGS_DIR / "presets" / f"{name}.yaml"
    values = read_yaml(path)
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


def apply_preset(config: TrainConfig, explicit: set[str] = frozenset()) -> TrainConfig:
    """Fill the settings the user did not give (`explicit`: the keys set in YAML or on the command line) from the
    preset of the model being edited."""
    for key, value in preset(preset_name(config.model)).items():
        if key not in explicit:
            setattr(config, key, value)
    return config


__all__ = ["PRESET_NAMES", "TrainConfig", "apply_preset", "parse_train_config", "preset", "preset_name"]
