"""Training SVF experts: config (settings) → objective → trainer (the loop) → editor (SVF behind the common Editor
interface). What a trainer may learn from besides the edits comes from the one leakage guard, t2edit.leakage."""
from t2edit.svf import model_bypassed
from t2edit.training.config import PRESETS, TrainConfig, apply_preset, parse_train_config, preset_name
from t2edit.training.editor import SVFEditor, main
from t2edit.training.objective import group_advantages, make_scheduler, sequence_logprobs
from t2edit.training.trainer import CHECKPOINT_NAME, METRICS_NAME, SVFTrainer, TrainItem, greedy_answers

__all__ = ["PRESETS", "apply_preset", "preset_name", "CHECKPOINT_NAME", "METRICS_NAME", "SVFEditor", "SVFTrainer",
           "TrainConfig", "TrainItem", "greedy_answers", "group_advantages", "main", "make_scheduler",
           "model_bypassed", "parse_train_config", "sequence_logprobs"]
