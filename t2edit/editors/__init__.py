"""The editing methods, one module each behind one `Editor` interface, and the one registry of them by name.

    get_editor("lora", rank=4, lr=1e-2)      # -> an Editor; options go to the method's config field by field
    METHODS                                   # every name the CLI, the demo, the jobs and the tables accept

Options go to the method's config dataclass (`CONFIGURED`: LoRAEditorConfig, FTEditorConfig, ROMEEditorConfig, ...)
field by field, or whole as `config=...`; IKE, WISE and SERAC also take `train_records=` (the training split they
learn from, through the leakage guard), IKE `k=`; SVF's options go to `SVFEditor` as given. Per-model settings of
the configured methods come from configs/editors/<method>.yaml (`t2edit.editors.settings`).
"""
from __future__ import annotations

from dataclasses import fields

from t2edit.editors.alphaedit import AlphaEditEditor, AlphaEditEditorConfig
from t2edit.editors.base import EditedModel, EditInputError, Editor, NoEdit
from t2edit.editors.ft import FTEditor, FTEditorConfig
from t2edit.editors.grace import GraceEditor, GraceEditorConfig
from t2edit.editors.ike import IKEEditor
from t2edit.editors.lora import LoRAEditor, LoRAEditorConfig
from t2edit.editors.memit import MEMITEditor, MEMITEditorConfig
from t2edit.editors.prompt import PromptEditor
from t2edit.editors.rome import ROMEEditor, ROMEEditorConfig
from t2edit.editors.serac import SeracEditor, SeracEditorConfig
from t2edit.editors.svf import ExpertsEditor, SVFEditor
from t2edit.editors.wise import WiseEditor, WiseEditorConfig

# name -> what it is (the CLI's help and the docs read this)
METHODS = {
    "none": "the unedited model (the reference row)",
    "svf": "an SVF expert, two-pass: applied where a router picks the prompt",
    "svf-always": "the same SVF expert applied to every prompt",
    "lora": "LoRA adapters trained on the targets (PEFT)",
    "ft": "FT-M: one MLP output matrix fine-tuned on the targets",
    "ike": "in-context editing: the new fact and retrieved demonstrations in front of the question",
    "prompt": "the new fact in front of the question, no demonstrations",
    "rome": "ROME: a rank-one update of one MLP output matrix per edit",
    "memit": "MEMIT: the edits' least-squares update spread over the MLP outputs of several layers",
    "alphaedit": "AlphaEdit: MEMIT's update projected onto the null space of the preserved keys",
    "grace": "GRACE: a codebook of (key, value, radius) at one layer, growing with each edit",
    "wise": "WISE: a side copy of one MLP output matrix, routed per prompt by its activation score",
    "serac": "SERAC: a scope classifier in front of the unedited model answering with the edit in context",
}
# method -> (editor class, its config class): the methods whose settings come from configs/editors/<method>.yaml
CONFIGURED = {
    "lora": (LoRAEditor, LoRAEditorConfig), "ft": (FTEditor, FTEditorConfig), "rome": (ROMEEditor, ROMEEditorConfig),
    "memit": (MEMITEditor, MEMITEditorConfig), "alphaedit": (AlphaEditEditor, AlphaEditEditorConfig),
    "grace": (GraceEditor, GraceEditorConfig), "wise": (WiseEditor, WiseEditorConfig),
    "serac": (SeracEditor, SeracEditorConfig),
}
LEARNS_FROM_TRAINING_SPLIT = ("ike", "wise", "serac")  # take train_records= (through the leakage guard)
# methods whose edit trains or solves for something (seconds per edit are theirs, not only scoring's)
TRAINED_METHODS = ("svf", "svf-always", "lora", "ft", "rome", "memit", "alphaedit", "grace", "wise")


class UnknownEditorError(ValueError):
    """An editing method name or option that does not exist."""


def parse_methods(text: str) -> list[str]:
    """A comma-separated list of method names, each checked against the registry."""
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UnknownEditorError(f"unknown method(s) {unknown or [text]}; choose from {', '.join(METHODS)}")
    return methods


def get_editor(name: str, **options) -> Editor:
    method = name.strip().lower()
    if method in ("svf", "svf-always"):  # two-pass (routed) / the expert on every prompt
        return SVFEditor(**{"route": method == "svf", **options})
    if method in CONFIGURED:
        editor_class, config_class = CONFIGURED[method]
        pooled = {"train_records": options.pop("train_records", None)} if method in LEARNS_FROM_TRAINING_SPLIT \
            else {}
        return editor_class(_config(config_class, method, options), **pooled)
    if method in ("ike", "prompt", "none"):
        allowed = {"ike": ("train_records", "k"), "prompt": (), "none": ()}[method]
        _reject_unknown(method, options, allowed)
        return {"ike": IKEEditor, "prompt": PromptEditor, "none": NoEdit}[method](**options)
    raise UnknownEditorError(f"unknown editing method {name!r}; choose one of: {', '.join(METHODS)}")


def _config(config_class, method: str, options: dict):
    if "config" in options:
        _reject_unknown(method, options, ("config",))
        return options["config"]
    _reject_unknown(method, options, tuple(f.name for f in fields(config_class)))
    return config_class(**options)


def _reject_unknown(method: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        choices = ", ".join(allowed) if allowed else "none"
        raise UnknownEditorError(f"editing method {method!r} has no option(s) {', '.join(unknown)}; "
                                 f"its options are: {choices}")


__all__ = ["CONFIGURED", "LEARNS_FROM_TRAINING_SPLIT", "METHODS", "TRAINED_METHODS", "AlphaEditEditor",
           "AlphaEditEditorConfig", "EditInputError", "EditedModel", "Editor", "ExpertsEditor", "FTEditor",
           "FTEditorConfig", "GraceEditor", "GraceEditorConfig", "IKEEditor", "LoRAEditor", "LoRAEditorConfig",
           "MEMITEditor", "MEMITEditorConfig", "NoEdit", "PromptEditor", "ROMEEditor", "ROMEEditorConfig",
           "SVFEditor", "SeracEditor", "SeracEditorConfig", "UnknownEditorError", "WiseEditor", "WiseEditorConfig",
           "get_editor", "parse_methods"]
