"""Weight-space aggregation across methods: pure functions on deltas, no Flower.

A mixed fleet's updates (fft, GaLore, LoRA, BN+H) cannot be averaged as uploads: they are
different tensors. Each is turned into the *dense change it makes to the pre-trained model*,
keyed by the plain model's state-dict names (`to_dense`):

    fft, bn_head   value - pre-trained value (every floating tensor it sends: BN statistics too)
    galore         its upload already is W - W0 (factored uploads are expanded first)
    lora           s * B @ A, reshaped to the adapted layer's weight (s = alpha / r), for each
                   adapted layer; the head it trains (peft's modules_to_save) as value - pre-trained

The server averages each tensor over the clients that changed it, weighted by examples
(`average`), keeps the previous value of tensors nobody changed this round (`merge`), and sends
every client its own method's form of the result (`from_dense`):

    fft            pre-trained + change, for every tensor (exact)
    bn_head        pre-trained + change, for BN affine, BN statistics and the head (exact on those
                   tensors; changes to other tensors cannot be expressed and are not sent)
    galore         the change of every parameter (exact; BN statistics stay frozen in GaLore)
    lora           per adapted layer the best rank-r approximation of change / s (truncated SVD,
                   Eckart-Young), the head exact; a layer nobody changed keeps the client's own
                   initialisation (A seeded, B = 0), as an all-zero pair could never train. A
                   projection: BN and depthwise changes, and what lies beyond rank r, are lost
                   to LoRA clients (not to the fleet's dense state).

DoRA (its magnitude) and TaskEdge (a mask each client picks) are not in weight space: a mixed run
aggregates their clients with their own method only.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedpeft.errors import require
from strategies.aggregation import _factor, _probs, lora_pairs

Delta = dict[str, torch.Tensor]
WEIGHT_SPACE_METHODS = ("fft", "galore", "lora", "bn_head")
PEFT_PREFIX = "base_model.model."


def plain_key(key: str) -> str:
    """The plain model's name of a peft state-dict key (the head: modules_to_save drops out)."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def lora_layer_key(a_key: str) -> str:
    """'base_model.model.features.0.0.lora_A.weight' -> 'features.0.0.weight'."""
    layer = plain_key(a_key).rsplit(".lora_A", 1)[0]
    return layer + ".weight"


def lora_scaling(rank: int, alpha: float) -> float:
    return float(alpha) / rank


def to_dense(method: str, upload: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
             alpha: float = 1.0) -> Delta:
    """The change `upload` (a client's delta of `method`) makes to the pre-trained model, by
    plain-model key, float32. Integer tensors (BN step counters) carry no change and are left out."""
    require(method in WEIGHT_SPACE_METHODS, f"method: {method} has no weight-space form; allowed: "
                                            f"{', '.join(WEIGHT_SPACE_METHODS)}")
    out: Delta = {}
    if method == "lora":
        pairs = lora_pairs(upload)
        for a_key, b_key in pairs.items():
            a, b = upload[a_key], upload[b_key]
            layer = lora_layer_key(a_key)
            require(layer in pretrained, f"{a_key}: no layer {layer!r} in the pre-trained model")
            r = a.shape[0]
            product = b.to(torch.float64).reshape(b.shape[0], r) @ a.to(torch.float64).reshape(r, -1)
            out[layer] = (lora_scaling(r, alpha) * product).reshape(pretrained[layer].shape).to(torch.float32)
        rest = {k: v for k, v in upload.items() if k not in pairs and k not in pairs.values()}
        return {**out, **_changes(rest, pretrained, relative=True)}
    return _changes(upload, pretrained, relative=method != "galore")


def _changes(tensors: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor], relative: bool) -> Delta:
    out = {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            continue
        name = plain_key(key)
        require(name in pretrained and tuple(pretrained[name].shape) == tuple(value.shape),
                f"{key}: no tensor of shape {tuple(value.shape)} named {name!r} in the pre-trained model")
        out[name] = (value.float() - pretrained[name].float()) if relative else value.float()
    return out


def average(denses: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Delta:
    """Each tensor's example-weighted mean over the clients whose dense change has it."""
    _probs(denses, weights)  # validates the weights
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    for dense, w in zip(denses, weights):
        if w <= 0:
            continue
        for key, value in dense.items():
            if key in sums:
                require(sums[key].shape == value.shape, f"{key}: shape {tuple(value.shape)} differs between clients")
                sums[key] += float(w) * value.to(torch.float64)
            else:
                sums[key] = float(w) * value.to(torch.float64)
            totals[key] = totals.get(key, 0.0) + float(w)
    return {k: (v / totals[k]).to(torch.float32) for k, v in sums.items()}


def merge(previous: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]) -> Delta:
    """The fleet's dense state after a round: this round's averages, the previous value elsewhere."""
    return {**previous, **averaged}


def from_dense(method: str, dense: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
               template: Mapping[str, torch.Tensor], alpha: float = 1.0) -> Delta:
    """`dense` in `method`'s own form, shaped like `template` (that method's upload at the client's
    rank, freshly initialised): what a client of that method starts its round from."""
    require(method in WEIGHT_SPACE_METHODS, f"method: {method} has no weight-space form; allowed: "
                                            f"{', '.join(WEIGHT_SPACE_METHODS)}")
    out: Delta = {}
    pairs = lora_pairs(template) if method == "lora" else {}
    for a_key, b_key in pairs.items():
        change = dense.get(lora_layer_key(a_key))
        a_like, b_like = template[a_key], template[b_key]
        if change is None or not bool(change.abs().max() > 0):
            out[a_key], out[b_key] = a_like.clone(), b_like.clone()  # nobody changed it: LoRA's own init
            continue
        r = a_like.shape[0]
        matrix = change.to(torch.float64).reshape(change.shape[0], -1) / lora_scaling(r, alpha)
        out[a_key], out[b_key] = _factor(matrix, r, a_like, b_like)
    for key, like in template.items():
        if key in out:
            continue
        name = plain_key(key)
        change = dense.get(name)
        if not like.is_floating_point():
            out[key] = pretrained[name].clone() if name in pretrained else like.clone()
        elif method == "galore":
            out[key] = change.to(like.dtype) if change is not None else torch.zeros_like(like)
        else:
            base = pretrained[name].to(like.dtype)
            out[key] = base + change.to(like.dtype) if change is not None else base.clone()
    return out
