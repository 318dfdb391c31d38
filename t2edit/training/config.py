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
    temperature: float = 1.0
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
    return config
