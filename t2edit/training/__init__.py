"""Training SVF experts: config (settings) → pools (what may be learned from) → objective → trainer (the loop)
→ editor (SVF behind the common Editor interface)."""
from t2edit.svf import model_bypassed
from t2edit.training.config import PRESETS, TrainConfig, apply_preset, parse_train_config, preset_name
from t2edit.training.editor import SVFEditor, main
from t2edit.training.objective import group_advantages, make_scheduler, sequence_logprobs
from t2edit.training.pools import (forbidden_prompts, neighbour_candidates, relation_templates,
                                   subject_neighbour_candidates)
from t2edit.training.trainer import CHECKPOINT_NAME, METRICS_NAME, SVFTrainer, TrainItem, greedy_answers

__all__ = ["PRESETS", "apply_preset", "preset_name", "CHECKPOINT_NAME", "METRICS_NAME", "SVFEditor", "SVFTrainer", "TrainConfig", "TrainItem",
           "forbidden_prompts", "greedy_answers", "group_advantages", "main", "make_scheduler", "model_bypassed",
           "neighbour_candidates", "parse_train_config", "relation_templates", "sequence_logprobs",
           "subject_neighbour_candidates"]
