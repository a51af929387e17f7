"""LoRA and DoRA through peft, plus a depthwise-aware low-rank adapter.

peft 0.21 cannot adapt depthwise convs usefully: it raises unless r is divisible by groups, and
with r = groups it builds a dense C x C x k x k branch that cannot be merged. So peft targets
only groups == 1 convs and Linear layers; with `depthwise=True` each depthwise conv instead gets
`DepthwiseLoRA`: its C x 1 x k x k weight seen as a C x k^2 matrix, updated by B @ A with
r * (C + k^2) parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import fedpeft  # noqa: F401  (torchvision shim before peft)
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from fedpeft.errors import UsageError, require
from fedpeft.methods.base import Adapter, Delta, Method
from fedpeft.methods.layers import dense_layers, depthwise_convs, freeze, set_submodule
from fedpeft.models import head_of

ADAPTER_NAME = "default"


class DepthwiseLoRA(nn.Module):
    """A frozen depthwise conv plus a low-rank update of its (C, k*k) weight matrix."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base
        channels, _, kh, kw = base.weight.shape
        self.scaling = alpha / rank
        # As in LoRA: A random, B zero, so the adapted model starts equal to the pre-trained one.
        self.dw_lora_A = nn.Parameter(torch.empty(rank, kh * kw))
        self.dw_lora_B = nn.Parameter(torch.zeros(channels, rank))
        nn.init.kaiming_uniform_(self.dw_lora_A, a=math.sqrt(5))

    def weight_delta(self) -> torch.Tensor:
        return (self.dw_lora_B @ self.dw_lora_A).view_as(self.base.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(x, b.weight + self.weight_delta(), b.bias, b.stride, b.padding, b.dilation, b.groups)


class LoRAAdapter(Adapter):
    def __init__(self, method: "LoRA", model: nn.Module, peft_model: PeftModel, depthwise: dict[str, DepthwiseLoRA]):
        super().__init__(method, peft_model)
        self.base_model = model
        self.depthwise = depthwise

    def _depthwise_params(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.depthwise.items():
            out[f"{name}.dw_lora_A"] = module.dw_lora_A
            out[f"{name}.dw_lora_B"] = module.dw_lora_B
        return out

    def delta(self) -> Delta:
        state = get_peft_model_state_dict(self.model, adapter_name=ADAPTER_NAME)
        state.update(self._depthwise_params())
        if self.method.freeze_a:
            state = {k: v for k, v in state.items() if "lora_A" not in k}
        return {k: v.detach().clone() for k, v in state.items()}

    def load_delta(self, delta: Delta) -> None:
        depthwise = self._depthwise_params()
        peft_part = {k: v for k, v in delta.items() if k not in depthwise}
        result = set_peft_model_state_dict(self.model, peft_part, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise KeyError(f"LoRA delta has keys this adapter lacks: {result.unexpected_keys[:3]}")
        with torch.no_grad():
            for key, param in depthwise.items():
                if key in delta:
                    param.copy_(delta[key])

    def export_peft(self, directory: str | Path) -> Path:
        """Write the adapter in peft's own format (adapter_config.json + adapter_model.safetensors)."""
        if self.depthwise:
            raise UsageError("export: depthwise adapters are fedpeft's own layers, not peft's; attach with depthwise=False to export")
        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        return directory


@dataclass
class LoRA(Method):
    name = "lora"
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    depthwise: bool = False
    train_head: bool = True
    freeze_a: bool = False  # FFA-LoRA: A stays at its seeded init; only B trains and is sent

    use_dora = False

    def validate(self) -> None:
        require(isinstance(self.rank, int) and self.rank > 0, f"rank: must be a positive integer, got {self.rank}")
        require(self.alpha > 0, f"alpha: must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"dropout: must be in [0, 1), got {self.dropout}")

    def config(self, model: nn.Module) -> LoraConfig:
        head_name = head_of(model)[0]
        targets = sorted(dense_layers(model, include_head=not self.train_head))
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            modules_to_save=[head_name] if self.train_head else None,
            use_dora=self.use_dora,
            bias="none",
        )

    def attach(self, model: nn.Module, calibration=None) -> Adapter:
        freeze(model)
        depthwise = {}
        if self.depthwise:
            for name, conv in depthwise_convs(model).items():
                depthwise[name] = DepthwiseLoRA(conv, self.rank, self.alpha)
                set_submodule(model, name, depthwise[name])
        config = self.config(model)
        peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        # peft freezes every parameter whose name lacks its prefix; name ours explicitly.
        for module in depthwise.values():
            module.dw_lora_A.requires_grad_(not self.freeze_a)
            module.dw_lora_B.requires_grad_(True)
        if self.freeze_a:
            for name, param in peft_model.named_parameters():
                if ".lora_A." in name:
                    param.requires_grad_(False)
        return LoRAAdapter(self, model, peft_model, depthwise)


@dataclass
class DoRA(LoRA):
    """Weight-decomposed LoRA (peft's use_dora): LoRA plus a trained magnitude per output channel."""

    name = "dora"
    use_dora = True

