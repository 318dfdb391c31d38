"""Edit Success / Locality / Portability / Fluency, EasyEdit's way and the strict way; results table and plot.

- `metrics`: per-prompt metrics on a model (teacher-forced token accuracy, argmax locality tokens, greedy exact
  match, n-gram-entropy fluency).
- `runner`: `evaluate_editor` (the one scoring path for every editing method) and `MethodResult`.
- `report`: `format_table` and `write_results` (results.json / results.md / results.png).
"""
from t2edit.evaluation.metrics import (
    DEFAULT_BATCH_SIZE,
    FLUENCY_SCALE,
    EvaluationInputError,
    answer_argmax_tokens,
    answer_token_budget,
    argmax_agreement,
    exact_match_scores,
    fluency_scores,
    greedy_completions,
    ngram_entropy,
    same_answer,
    sample_texts,
    teacher_forced_accuracy,
    teacher_forced_predictions,
    token_accuracy,
)
from t2edit.evaluation.report import format_table, write_results
from t2edit.evaluation.runner import AGGREGATION, EditorRestoreError, MethodResult, evaluate_editor

__all__ = [
    "AGGREGATION", "DEFAULT_BATCH_SIZE", "FLUENCY_SCALE", "EditorRestoreError", "EvaluationInputError",
    "MethodResult", "answer_argmax_tokens", "answer_token_budget", "argmax_agreement", "evaluate_editor",
    "exact_match_scores", "fluency_scores", "format_table", "greedy_completions", "ngram_entropy", "same_answer",
    "sample_texts", "teacher_forced_accuracy", "teacher_forced_predictions", "token_accuracy", "write_results",
]
