"""The training run's settings: one dataclass, read from YAML and the command line (TRL's parser)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from t2edit.svf import SVFConfig


@dataclass
class TrainConfig:
    """Everything one training run needs; parsed from YAML + command line by scripts/train_rl.py."""

    # what to edit
    data: str = field(default="builtin", metadata={"help": "KnowEdit/CounterFact/ZsRE file, hub name, or 'builtin'"})
    model: str | None = field(default=None, metadata={"help": "HF model name/path; default: the world model of `data`"})
    world_preset: str = field(default="default", metadata={"help": "fact-world size when model is unset: default | tiny"})
    start: int = field(default=0, metadata={"help": "index of the first edited record"})
    n_edits: int = field(default=50, metadata={"help": "number of records edited into one expert"})
    output_dir: str = field(default="runs/expert", metadata={"help": "expert, checkpoints, metrics, plots"})
    # SVF (Transformer² defaults)
    # SVF. Transformer² uses mask "sigmoid", norm_preserving, z_init 0.1; on fact worlds the identity mask learns
    # edits several times faster (measured: README), so it is the default; configs/knowedit_llama3.2-1b.yaml
    # keeps Transformer²'s.
    target_modules: str = "mlp"
    mask: str = "identity"
    max_mult: float = 1.0
    norm_preserving: bool = False
    z_init: float = 1.0
    # optimisation (Transformer²: Adam, lr 2e-3, grad-norm clip 1e-3; a tiny world needs the larger step)
    learning_rate: float = 0.2
    max_grad_norm: float = 1e-3
    steps: int = 250
    lr_scheduler_type: str = field(default="cosine", metadata={
        "help": "transformers scheduler name: cosine | linear | constant | ... (decays to 0 over `steps`)"})
    warmup_steps: int = 0
    # REINFORCE
    group_size: int = field(default=2, metadata={"help": "sampled answers per prompt (plus the guide, if on)"})
    guided: bool = field(default=True, metadata={"help": "add the rewarded answer to each group (sparse-reward fix)"})
    baseline: str = field(default="group_mean", metadata={"help": "group_mean | leave_one_out | none"})
    objective: str = field(default="reinforce", metadata={
        "help": "reinforce (guided groups, exact-match rewards) | ce (supervised cross-entropy on the target: the "
                "reference REINFORCE is measured against)"})
    temperature: float = 1.0
    top_k: int = field(default=0, metadata={"help": "sample from the k likeliest tokens (0: all)"})
    top_p: float = 1.0
    sample_neighbours: bool = field(default=True, metadata={
        "help": "also sample neighbour prompts and reward keeping the unedited answer (the locality reward); "
                "false: neighbours are anchored by the KL term on the unedited answer alone (the llm preset)"})
    stop_at_edit_success: float = field(default=0.0, metadata={
        "help": "stop once greedy edit success on the edit prompts reaches this (checked every eval_every; 0: off)"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast on GPUs and AMX CPUs, else fp32) | bf16 | fp32"})
    rows_per_chunk: int = field(default=64, metadata={
        "help": "rollouts scored per forward/backward (gradients accumulate over a step's chunks; bounds memory)"})
    reference_batch: int = field(default=128, metadata={
        "help": "neighbours whose unedited answers are generated together, when a step needs new ones"})
    router_calibration_prompts: int = field(default=512, metadata={
        "help": "neighbour / anchor prompts sampled to calibrate the router (0: all)"})
    max_new_tokens: int = field(default=0, metadata={"help": "0: longest answer in tokens + 2"})
    edits_per_step: int = 50
    neighbours_per_step: int = field(default=64, metadata={"help": "prompts of other facts per step"})
    subject_neighbours_per_step: int = field(default=0, metadata={
        "help": "other relations asked about the edited subjects, trained on per step (0: only calibrate routing)"})
    kl_coef: float = field(default=10.0, metadata={"help": "weight of KL(unedited ‖ edited) on neighbour prompts"})
    rewards: dict = field(default_factory=lambda: {"exact_match": 1.0, "locality": 1.0})
    route_margin: float = field(default=0.5, metadata={
        "help": "router threshold: this far from the closest neighbour prompt's similarity to 1 (t2edit.routing)"})
    neighbour_data: str | None = field(default=None, metadata={"help": "extra file of other facts for neighbours"})
    # bookkeeping
    seed: int = 0
    save_every: int = 25
    eval_every: int = 25
    resume: bool = False
    report_to: str = field(default="none", metadata={"help": "none | wandb"})
    wandb_project: str = "t2edit"
    rollout_backend: str = field(default="transformers", metadata={"help": "transformers | vllm"})
    vllm_server_url: str = "http://localhost:8000"
    vllm_mode: str = field(default="server", metadata={
        "help": "server (vLLM on another GPU, scripts/serve_vllm.sh) | colocate (vLLM inside this process, one GPU)"})
    vllm_sync: str = field(default="auto", metadata={
        "help": "auto | z (send only z to the t2edit worker extension) | merged (send W' under HF names)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "colocate mode: vLLM's GPU share"})
    progress: bool = True

    def svf_config(self) -> SVFConfig:
        return SVFConfig(target_modules=self.target_modules, mask=self.mask, max_mult=self.max_mult,
                         norm_preserving=self.norm_preserving, z_init=self.z_init)



def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    """YAML (`--config FILE`) then command-line overrides, TRL style. `rewards` on the command line is JSON."""
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        if not Path(path).exists():
            raise FileNotFoundError(f"config file {path} not found; see configs/ for examples")
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
    if "--config" in argv:
        import yaml

        explicit |= set(yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text()) or {})
    return apply_preset(config, explicit | ({"rewards"} if rewards is not None else set()))


# Settings that depend on what is edited. TrainConfig's own defaults are the "world" preset (tiny fact-world
# models: a large step, sampled neighbours rewarded for keeping their answer). A pretrained LLM needs a small step,
# top-k sampling on a real vocabulary, and neighbours anchored by the KL term alone (a temperature-1 sample from 49k
# tokens almost never equals the unedited answer, so a locality reward is ~0 whatever the policy does).
# configs/smollm2-135m.yaml spells the "llm" preset out (a test keeps the two equal).
PRESETS: dict[str, dict] = {
    "world": {},
    "llm": {
        "learning_rate": 0.02, "steps": 40, "lr_scheduler_type": "constant", "group_size": 1, "baseline": "none", "top_k": 50,
        "sample_neighbours": False, "neighbours_per_step": 16, "kl_coef": 1.0, "eval_every": 5,
        "stop_at_edit_success": 1.0, "save_every": 10, "rewards": {"exact_match": 1.0},
    },
}


def preset_name(model: str | None) -> str:
    """"world" for a fact world (no model, or a world directory), "llm" for any pretrained model."""
    if model is None or (Path(model) / "world.json").exists():
        return "world"
    return "llm"


def apply_preset(config: TrainConfig, explicit: set[str] = frozenset()) -> TrainConfig:
    """Fill the settings the user did not give (`explicit`: the keys set in YAML or on the command line) from the
    preset of the model being edited."""
    for key, value in PRESETS[preset_name(config.model)].items():
        if key not in explicit:
            setattr(config, key, value)
    return config
