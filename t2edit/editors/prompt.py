"""Prompt-based editing (EasyEdit's ICE): IKE with no demonstrations — only `new_fact_context(prompt, target)`
of the edit goes in front of the question. In batch mode the fact is the edited one BM25 ranks highest for
the question (see ike.py)."""
from __future__ import annotations

from t2edit.editors.ike import IKEEditor


class PromptEditor(IKEEditor):
    name = "prompt"

    def __init__(self):
        super().__init__(train_records=None, k=0)
