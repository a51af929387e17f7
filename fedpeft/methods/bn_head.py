"""BN+H: BatchNorm affine parameters and running statistics, plus the classifier head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedpeft.methods.base import Adapter, Delta, Method
from fedpeft.methods.layers import freeze, is_batchnorm
from fedpeft.models import head_of


class BNHeadAdapter(Adapter):
    trains_bn_stats = True

    def __init__(self, method: Method, model: nn.Module):
        super().__init__(method, model)
        head_name = head_of(model)[0]
        self._prefixes = [n for n, m in model.named_modules() if is_batchnorm(m) or n == head_name]
        freeze(model)
        for name in self._prefixes:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)

    def _owned(self, key: str) -> bool:
        return key.rpartition(".")[0] in self._prefixes

    def delta(self) -> Delta:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if self._owned(k)}

    def load_delta(self, delta: Delta) -> None:
        state = self.model.state_dict()
        for key, value in delta.items():
            if not self._owned(key):
                raise KeyError(f"bn_head delta carries {key!r}, which bn_head does not train")
            with torch.no_grad():
                state[key].copy_(value)


@dataclass
class BNHead(Method):
    name = "bn_head"

    def attach(self, model: nn.Module, calibration=None) -> Adapter:
        return BNHeadAdapter(self, model)
