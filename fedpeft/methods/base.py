"""The one small interface every fine-tuning method implements.

A `Method` is a validated configuration (name + hyper-parameters). `method.attach(model,
calibration)` takes a pre-trained model, freezes what the method does not train, installs its
adapters, and returns an `Adapter` bound to that model. The adapter says which tensors train,
builds the optimizer, extracts the delta (exactly what it trained, as named tensors) and applies
a delta. Applying a delta to `method.attach(fresh_pretrained_copy)` reproduces the trained model.

No Flower here: the fleet sends `Adapter.delta()` over the wire and calls `load_delta` on the
other side.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

Delta = dict[str, torch.Tensor]


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Adapter(ABC):
    """A model prepared for one method. `model` is what trains (it may wrap the original)."""

    #: BatchNorm running statistics stay frozen (eval mode) unless the method trains them.
    trains_bn_stats: ClassVar[bool] = False

    def __init__(self, method: "Method", model: nn.Module):
        self.method = method
        self.model = model

    # -- what trains ---------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def train_mode(self) -> None:
        """model.train(), but BatchNorm layers stay in eval mode when the method freezes their statistics."""
        self.model.train()
        if not self.trains_bn_stats:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def optimizer(self, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.trainable().values()), lr=lr, weight_decay=weight_decay)

    # -- what crosses the wire -----------------------------------------------------------------
    @abstractmethod
    def delta(self) -> Delta:
        """Exactly the tensors this method trained (detached CPU copies), by name."""

    @abstractmethod
    def load_delta(self, delta: Delta) -> None:
        """Set the adapted state from a delta (this adapter was attached to the same pre-trained model)."""

    def start_from(self, global_delta: Delta) -> None:
        """Begin local training from the server's global adapter state. For most methods that is
        `load_delta`; methods whose clients train different tensors (TaskEdge masks) override it."""
        self.load_delta(global_delta)

    def delta_bytes(self) -> int:
        return tensor_bytes(self.delta())


@dataclass
class Method(ABC):
    """A fine-tuning method's configuration. Subclasses are dataclasses with validated fields."""

    name: ClassVar[str]
    lr: float = field(default=1e-3, kw_only=True)

    def __post_init__(self) -> None:
        from fedpeft.errors import require

        require(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the bad hyper-parameter."""

    @abstractmethod
    def attach(self, model: nn.Module, calibration: torch.Tensor | None = None) -> Adapter:
        """Prepare `model` (modified in place) and return its adapter."""

    def hparams(self) -> dict:
        """Everything that changes the cost or the result; used as a cache key."""
        from dataclasses import asdict

        return {"method": self.name, **asdict(self)}
