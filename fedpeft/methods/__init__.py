"""The fine-tuning methods, one module each behind the interface in methods/base.py."""
from __future__ import annotations

from dataclasses import fields

from fedpeft.errors import choice
from fedpeft.methods.base import Adapter, Delta, Method, tensor_bytes
from fedpeft.methods.bn_head import BNHead
from fedpeft.methods.fft import FFT
from fedpeft.methods.galore import GaLore
from fedpeft.methods.lora import DoRA, LoRA
from fedpeft.methods.taskedge import TaskEdge, TaskEdgeLoRA

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FFT, BNHead, LoRA, DoRA, GaLore, TaskEdge, TaskEdgeLoRA)
}


def method_fields(name: str) -> set[str]:
    choice("method", name, METHODS)
    return {f.name for f in fields(METHODS[name])}


def make_method(name: str, **hparams) -> Method:
    """Build a method by name. Hyper-parameters it does not have, or left as None, are ignored,
    so one CLI can pass --rank/--density to any method."""
    known = method_fields(name)
    return METHODS[name](**{k: v for k, v in hparams.items() if k in known and v is not None})


__all__ = ["Adapter", "Delta", "Method", "METHODS", "make_method", "method_fields", "tensor_bytes"]
