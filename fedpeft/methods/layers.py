"""Helpers to find the layers methods target, shared by the methods."""
from __future__ import annotations

from torch import nn

from fedpeft.models import head_of


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def dense_layers(model: nn.Module, include_head: bool = True) -> dict[str, nn.Module]:
    """groups == 1 convs and Linear layers (what LoRA and TaskEdge target by default).

    Depthwise convs are left out: peft cannot adapt them sensibly (see methods/lora.py) and a
    C x 1 x k x k weight has too few inputs per neuron for a sparse mask.
    """
    head_name = head_of(model)[0]
    found = {}
    for name, module in model.named_modules():
        if name == head_name and not include_head:
            continue
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            found[name] = module
        elif isinstance(module, nn.Linear) and not _inside_attention(model, name):
            found[name] = module
    return found


def depthwise_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    }


def _inside_attention(model: nn.Module, name: str) -> bool:
    # nn.MultiheadAttention's out_proj is a Linear that attention calls through F.multi_head_attention_forward
    # with its raw weight, bypassing the module: an adapter wrapped around it would never run.
    parent = name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
