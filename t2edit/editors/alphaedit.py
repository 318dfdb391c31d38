"""AlphaEdit (Fang et al., ICLR 2025, "Null-Space Constrained Knowledge Editing"): MEMIT's layer-by-layer update,
projected so that it cannot change the output of the keys the model already uses.

P = Û Ûᵀ, Û = the eigenvectors of the key second moment C = E[k kᵀ] (`t2edit.editors.keys`) whose eigenvalues are
below a threshold: the directions typical keys (almost) never take. Any Δ = X P then leaves W k unchanged for keys
in C's dominant subspace. The paper's closed form, with the keys K_p of earlier edits in a sequential stream:

    Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + l2·I)⁻¹,

whose rows lie in P's range (Δ = R Kᵀ (P M + l2·I)⁻¹ P, M = K_p K_pᵀ + K Kᵀ), so preserved keys are untouched
whatever the residuals; K_p K_pᵀ keeps earlier edits' keys mapped where those edits put them.

Threshold. The paper and EasyEdit count eigenvalues below 2e-2 as null on Llama-3-8B's C (about 70 % of them).
On SmolLM2-135M's C (the model's own samples) the same absolute rule leaves a similar share null in the early
layers edited (results/locate_tuning_smollm2.json lists it per layer), so the absolute rule is the default. Keys of
another scale (a tiny model's are far smaller) call for `nullspace_relative=True`: null then means below
threshold × the mean eigenvalue (trace(C) / d). `null_fraction` in the editor's report gives the share per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from t2edit.editors.base import EditInputError
from t2edit.editors.memit import MEMIT_DEPTHS, MEMITEditor, check_layer_list
from t2edit.editors.rome import check_value_settings


@dataclass
class AlphaEditEditorConfig:
    layers: tuple[int, ...] | None = None  # None: the layers at EasyEdit's depths (4-8 of 32)
    v_num_grad_steps: int = 25
    v_lr: float = 0.1
    v_weight_decay: float = 0.5  # times ‖δ‖² / ‖h‖²
    v_stop_loss: float = 5e-2
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    nullspace_threshold: float = 2e-2
    nullspace_relative: bool = False  # True: threshold × the mean eigenvalue of C (for keys of another scale)
    l2: float = 10.0  # EasyEdit's L2
    context_templates: tuple = ((10, 5),)
    key_samples: int = 1000
    key_sample_length: int = 64
    key_cache_dir: str | None = None
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        check_value_settings(self, "alphaedit")
        check_layer_list(self.layers, "alphaedit")
        if self.nullspace_threshold <= 0:
            raise EditInputError(f"alphaedit: nullspace_threshold={self.nullspace_threshold!r}; it must be positive "
                                 "(the paper uses 2e-2)")
        if self.l2 <= 0:
            raise EditInputError(f"alphaedit: l2={self.l2!r}; it must be positive (EasyEdit uses 10)")


def null_space_projection(second_moment: torch.Tensor, threshold: float, relative: bool = False) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of C whose eigenvalues are below `threshold` (× the mean eigenvalue when
    `relative`), float64."""
    C = second_moment.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(C)
    limit = threshold * (eigenvalues.mean() if relative else 1.0)
    null = eigenvectors[:, eigenvalues < limit]
    return null @ null.T


def alphaedit_update(residuals: torch.Tensor, keys: torch.Tensor, projection: torch.Tensor,
                     preserved: torch.Tensor | None, l2: float) -> torch.Tensor:
    """Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + l2·I)⁻¹; `preserved` is K_p K_pᵀ (None: no earlier edits)."""
    R, K, P = (t.double() for t in (residuals, keys, projection.to(keys.device)))
    M = K @ K.T
    if preserved is not None:
        M = M + preserved.to(M)
    system = M @ P + l2 * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    right = R @ K.T @ P  # Δ · system = right
    return torch.linalg.solve(system.T, right.T).T


class AlphaEditEditor(MEMITEditor):
    """MEMIT's editor with the null-space-projected solve; it keeps each call's keys (per model) as K_p for the
    calls after it, and restore() drops that call's keys."""

    name = "alphaedit"
    sequential = True
    default_depths = MEMIT_DEPTHS

    def __init__(self, config: AlphaEditEditorConfig | None = None):
        super().__init__(config or AlphaEditEditorConfig())
        self.past_keys: dict[int, list[dict[int, torch.Tensor]]] = {}  # model id -> each open call's K Kᵀ by layer
        self.null_fraction: dict[int, float] = {}

    def projection(self, fingerprint: str, layer: int, second_moment: torch.Tensor) -> torch.Tensor:
        config = self.config
        key = ("projection", fingerprint, layer, config.nullspace_threshold, config.nullspace_relative)

        def compute():
            P = null_space_projection(second_moment, config.nullspace_threshold, config.nullspace_relative)
            self.null_fraction[layer] = round(torch.trace(P).item() / P.shape[0], 4)
            return P

        return self.memo.get(key, compute)

    def layer_update(self, model, fingerprint, layer, residuals, keys, second_moment):
        P = self.projection(fingerprint, layer, second_moment)
        calls = self.past_keys.get(id(model), [])
        preserved = sum(call[layer] for call in calls if layer in call) if calls else None
        if isinstance(preserved, int):  # no earlier call edited this layer
            preserved = None
        return alphaedit_update(residuals, keys, P, preserved, self.config.l2)

    def after_edit(self, model, keys_by_layer):
        call = {layer: (k.T.double() @ k.double()) for layer, k in keys_by_layer.items()}  # K Kᵀ, keys as rows
        self.past_keys.setdefault(id(model), []).append(call)
        self.last_report["null_fraction"] = dict(self.null_fraction)
        return call

    def after_restore(self, model, call) -> None:
        calls = self.past_keys.get(id(model), [])
        for i, stored in enumerate(calls):
            if stored is call:
                del calls[i]
                break


__all__ = ["AlphaEditEditor", "AlphaEditEditorConfig", "alphaedit_update", "null_space_projection"]
