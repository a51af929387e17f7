"""What a reply must be before it may touch the global state. Pure checks; each raises a
UsageError whose message is the reason logged with the `rejected` line.

- metrics: every reported number finite and >= 0 (a NaN would also make clients.jsonl invalid JSON);
- examples: an integer no larger than what the server knows the client holds (its partition size x
  local epochs, or the configured `max_examples`); 0 is allowed and gets weight 0;
- tensors: each key's dtype equals the template's (the codec decodes fp16/int8 to float32, so a
  float64 or an integer tensor under a float key is an attack or a bug, never a codec).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedpeft.errors import UsageError, require


def check_metrics(metrics: Mapping) -> None:
    for key, value in metrics.items():
        require(isinstance(value, (int, float)) and not isinstance(value, bool),
                f"metrics[{key}]: must be a number, got {type(value).__name__}")
        require(math.isfinite(value), f"metrics[{key}]: must be finite, got {value!r}")
        require(value >= 0, f"metrics[{key}]: must be >= 0, got {value!r}")


def check_examples(examples, cap: int | None) -> int:
    """The example count as an int; UsageError when it is not an integer in [0, cap]."""
    require(isinstance(examples, (int, float)) and not isinstance(examples, bool) and math.isfinite(examples)
            and float(examples) == int(examples), f"examples: must be an integer, got {examples!r}")
    examples = int(examples)
    require(examples >= 0, f"examples: must be >= 0, got {examples}")
    if cap is not None:
        require(examples <= cap, f"examples: claims {examples:,}, the client holds at most {cap:,}")
    return examples


def check_dtypes(delta: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of `delta` has the dtype of the template's tensor under the same key."""
    for key, tensor in delta.items():
        if key not in template:
            raise UsageError(f"payload[{key}]: not a key of this method's upload")
        want = template[key].dtype
        require(tensor.dtype == want, f"payload[{key}]: dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                      f"expected {str(want).removeprefix('torch.')}")


def check_finite(delta: Mapping[str, torch.Tensor], what: str = "global adapter") -> None:
    for key, tensor in delta.items():
        if tensor.is_floating_point():
            require(bool(torch.isfinite(tensor).all()), f"{what}[{key}]: contains NaN or inf")
