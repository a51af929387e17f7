"""GaLore: full-parameter training with low-rank gradient projection (galore-torch's GaLoreAdamW).

galore-torch 1.0 handles 2-D weights only: a 4-D conv gradient crashes in GaLoreProjector
(`diag(): Supports 1D or 2D tensors`). `ConvGaLoreProjector` views each gradient as a
(C_out, C_in*k*k) matrix for the projection and restores the shape afterwards. GaLoreAdamW
creates a projector only `if "projector" not in state`, so we seed ours into the optimizer
state: no monkeypatching of the library.
"""
from __future__ import annotations

from dataclasses import dataclass

import fedpeft  # noqa: F401
import torch
from galore_torch import GaLoreAdamW
from galore_torch.galore_projector import GaLoreProjector
from torch import nn

from fedpeft.errors import choice, require
from fedpeft.methods.base import Adapter, Delta, Method

PROJ_TYPES = ("std", "reverse_std", "left", "right")


class ConvGaLoreProjector(GaLoreProjector):
    """GaLoreProjector for weights of any rank >= 2: projects the gradient as a 2-D matrix."""

    def project(self, full_rank_grad: torch.Tensor, iter: int) -> torch.Tensor:
        self.full_shape = full_rank_grad.shape
        return super().project(full_rank_grad.reshape(full_rank_grad.shape[0], -1), iter)

    def project_back(self, low_rank_grad: torch.Tensor) -> torch.Tensor:
        return super().project_back(low_rank_grad).reshape(self.full_shape)


class GaLoreAdapter(Adapter):
    def __init__(self, method: "GaLore", model: nn.Module):
        super().__init__(method, model)
        for p in model.parameters():
            p.requires_grad_(True)
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    def projected(self) -> dict[str, nn.Parameter]:
        """Weights whose gradients GaLore projects: matrices (and conv kernels) wider than the rank."""
        rank = self.method.rank
        return {
            n: p for n, p in self.model.named_parameters()
            if p.dim() >= 2 and min(p.shape[0], p[0].numel()) > rank
        }

    def optimizer(self, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        m = self.method
        projected = self.projected()
        ids = {id(p) for p in projected.values()}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        group = {"rank": m.rank, "update_proj_gap": m.update_proj_gap, "scale": m.scale, "proj_type": m.proj_type}
        optimizer = GaLoreAdamW(
            [{"params": rest}, {"params": list(projected.values()), **group}],
            lr=lr, weight_decay=weight_decay, no_deprecation_warning=True,
        )
        self.projectors = {}
        for name, p in projected.items():
            optimizer.state[p]["projector"] = self.projectors[name] = ConvGaLoreProjector(
                m.rank, update_proj_gap=m.update_proj_gap, scale=m.scale, proj_type=m.proj_type
            )
        return optimizer

    def bases(self) -> dict[str, torch.Tensor]:
        """Each projected weight's current projector basis (m x r or r x n, of its 2-D view), for
        the low-rank upload (fedpeft/methods/galore_upload.py); empty before the first step."""
        return {n: pr.ortho_matrix for n, pr in getattr(self, "projectors", {}).items() if pr.ortho_matrix is not None}

    def delta(self) -> Delta:
        return {n: (p.detach() - self.initial[n]) for n, p in self.model.named_parameters()}

    def load_delta(self, delta: Delta) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, change in delta.items():
                params[name].copy_(self.initial[name] + change)


@dataclass
class GaLore(Method):
    name = "galore"
    rank: int = 4
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"

    def validate(self) -> None:
        require(isinstance(self.rank, int) and self.rank > 0, f"rank: must be a positive integer, got {self.rank}")
        require(self.update_proj_gap > 0, f"update_proj_gap: must be > 0, got {self.update_proj_gap}")
        require(self.scale > 0, f"scale: must be > 0, got {self.scale}")
        choice("proj_type", self.proj_type, PROJ_TYPES)

    def attach(self, model: nn.Module, calibration=None) -> Adapter:
        return GaLoreAdapter(self, model)
