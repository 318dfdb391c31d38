"""Training SVF experts: config (settings and presets) → objective → trainer (the loop) → fanout (many experts).
What a trainer may learn from besides the edits comes from the one leakage guard, t2edit.leakage."""
from t2edit.training.config import PRESET_NAMES, TrainConfig, apply_preset, parse_train_config, preset, preset_name
from t2edit.training.fanout import expert_run_dir, steps_for, train_experts, train_one_expert, trained_experts
from t2edit.training.objective import group_advantages, make_scheduler, sequence_logprobs
from t2edit.training.trainer import CHECKPOINT_NAME, METRICS_NAME, SVFTrainer, TrainItem

__all__ = ["CHECKPOINT_NAME", "METRICS_NAME", "PRESET_NAMES", "SVFTrainer", "TrainConfig", "TrainItem",
           "apply_preset", "expert_run_dir", "group_advantages", "make_scheduler", "parse_train_config", "preset",
           "preset_name", "sequence_logprobs", "steps_for", "train_experts", "train_one_expert", "trained_experts"]
