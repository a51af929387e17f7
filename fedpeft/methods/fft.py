"""Full fine-tuning: the baseline. Everything trains; the delta is the full state."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedpeft.methods.base import Adapter, Delta, Method


class FullAdapter(Adapter):
    trains_bn_stats = True

    def delta(self) -> Delta:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_delta(self, delta: Delta) -> None:
        self.model.load_state_dict(delta)


@dataclass
class FFT(Method):
    name = "fft"

    def attach(self, model: nn.Module, calibration=None) -> Adapter:
        for p in model.parameters():
            p.requires_grad_(True)
        return FullAdapter(self, model)
