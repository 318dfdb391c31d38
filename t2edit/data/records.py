"""The one record type every loader returns and every editor and metric consumes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Probe:
    """A question asked of the model and the answers that count as right.

    `answers` is a flat list of aliases (KnowEdit's list-of-alias-lists is flattened); the first alias is the
    canonical one, used for teacher-forced scoring as EasyEdit does. Never empty.
    """

    prompt: str
    answers: list[str]

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass
class EditRecord:
    """One edit: make `prompt` (about `subject`) answer `target_new` instead of `ground_truth`.

    `locality` and `portability` map a kind (lower-case, e.g. "relation_specificity", "reasoning",
    "subject_aliasing") to its probes. `rephrase` holds paraphrases of the edit prompt when the source has them.
    """

    subject: str
    prompt: str
    target_new: list[str]
    ground_truth: list[str] = field(default_factory=list)
    locality: dict[str, list[Probe]] = field(default_factory=dict)
    portability: dict[str, list[Probe]] = field(default_factory=dict)
    rephrase: list[Probe] = field(default_factory=list)
    index: int = -1  # position in the source file, for messages

    @property
    def target(self) -> str:
        return self.target_new[0]

    @property
    def edit_probe(self) -> Probe:
        return Probe(self.prompt, list(self.target_new))

    def scored_prompts(self) -> set[str]:
        """Every prompt the evaluation scores for this record besides the edit prompt itself.

        Editors and trainers must never train on these (no test leakage)."""
        prompts = {p.prompt for p in self.rephrase}
        for probes in list(self.locality.values()) + list(self.portability.values()):
            prompts.update(p.prompt for p in probes)
        return prompts
