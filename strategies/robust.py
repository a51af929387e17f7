"""Robust aggregation: pure functions on uploads (dict[str, Tensor]), no Flower.

An upload is what a client sends (e.g. LoRA's A and B, fft's whole state); its *update* is the
upload minus the reference it started from (the global adapter the server sent, for every key
that has the same shape there; zero elsewhere, e.g. a local TaskEdge mask's values). Only
floating tensors have an update: integer tensors (indices, BatchNorm step counters) are left to
the aggregation's own rule.

- `screen`: reject an update whose L2 norm exceeds `reject_multiple` x the median norm of the
  *other* updates of the round (leave-one-out, so one attacker among two clients is still seen),
  then clip each survivor to `clip_norm` and/or `clip_median_multiple` x the round's median norm.
- `coordinate_median` / `trimmed_mean`: unweighted coordinate-wise rules (Yin et al., 2018), so an
  inflated example count buys no weight.
- `scaled_update`: reference + scale x update, the poisoned upload of fault injection.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from fedpeft.errors import require

Delta = dict[str, torch.Tensor]


def _reference(key: str, tensor: torch.Tensor, reference: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    ref = reference.get(key)
    return ref if ref is not None and tuple(ref.shape) == tuple(tensor.shape) else None


def update_of(upload: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> Delta:
    """upload - reference for every floating key (float64); keys absent from reference count from zero."""
    out = {}
    for key, tensor in upload.items():
        if tensor.is_floating_point():
            ref = _reference(key, tensor, reference)
            value = tensor.detach().to(torch.float64)
            out[key] = value - ref.detach().to(torch.float64) if ref is not None else value
    return out


def update_norm(upload: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    squares = sum(float(u.pow(2).sum()) for u in update_of(upload, reference).values())
    return math.sqrt(squares)


def scaled_update(upload: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], scale: float) -> Delta:
    """reference + scale x (upload - reference), in each tensor's own dtype; integer tensors unchanged."""
    out = dict(upload)
    for key, update in update_of(upload, reference).items():
        ref = _reference(key, upload[key], reference)
        base = ref.detach().to(torch.float64) if ref is not None else torch.zeros_like(update)
        out[key] = (base + scale * update).to(upload[key].dtype)
    return out


def screen(uploads: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor], *,
           reject_multiple: float = 0.0, clip_norm: float = 0.0,
           clip_median_multiple: float = 0.0) -> tuple[list[Delta], dict[int, str], list[float]]:
    """(the uploads, clipped where a bound applies; {index: reason} of rejected ones; every norm).

    The returned list holds the surviving uploads in order (rejected ones left out)."""
    norms = [update_norm(u, reference) for u in uploads]
    rejected: dict[int, str] = {}
    if reject_multiple > 0 and len(uploads) > 1:
        for i, norm in enumerate(norms):
            others = statistics.median(norms[:i] + norms[i + 1:])
            if norm > reject_multiple * max(others, 1e-12):
                rejected[i] = (f"update norm {norm:.4g} exceeds {reject_multiple:g} x the other clients' median "
                               f"{others:.4g} (reject_norm_multiple)")
    kept = [i for i in range(len(uploads)) if i not in rejected]
    bounds = []
    if clip_norm > 0:
        bounds.append(clip_norm)
    if clip_median_multiple > 0 and kept:
        bounds.append(clip_median_multiple * statistics.median(norms[i] for i in kept))
    out = []
    for i in kept:
        bound = min(bounds) if bounds else math.inf
        factor = bound / norms[i] if norms[i] > bound else 1.0
        out.append(scaled_update(uploads[i], reference, factor) if factor < 1.0 else dict(uploads[i]))
    return out, rejected, norms


def _combine(uploads: Sequence[Mapping[str, torch.Tensor]], rule) -> Delta:
    require(len(uploads) > 0, "uploads: need at least one")
    keys = list(uploads[0])
    for i, u in enumerate(uploads):
        require(list(u) == keys or set(u) == set(keys), f"uploads[{i}]: other keys than uploads[0]")
        for k in keys:
            require(tuple(u[k].shape) == tuple(uploads[0][k].shape),
                    f"uploads[{i}][{k}]: shape {tuple(u[k].shape)} differs from uploads[0]")
    out = {}
    for k in keys:
        stacked = torch.stack([u[k].detach() for u in uploads])
        if uploads[0][k].is_floating_point():
            out[k] = rule(stacked.to(torch.float64)).to(uploads[0][k].dtype)
        elif k.endswith(".indices"):  # a shared mask: identical on every client
            require(all(torch.equal(s, stacked[0]) for s in stacked), f"{k}: clients sent different indices")
            out[k] = stacked[0].clone()
        else:  # counters (num_batches_tracked): the max, as FedAvg does
            out[k] = stacked.max(dim=0).values
    return out


def coordinate_median(uploads: Sequence[Mapping[str, torch.Tensor]]) -> Delta:
    """Each coordinate's median over the clients (the mean of the two middle values for an even count)."""
    def rule(stacked: torch.Tensor) -> torch.Tensor:  # sort, not torch.quantile: that refuses > 16M elements
        ordered, n = stacked.sort(dim=0).values, len(stacked)
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2

    return _combine(uploads, rule)


def trimmed_mean(uploads: Sequence[Mapping[str, torch.Tensor]], fraction: float) -> Delta:
    """Each coordinate's mean after cutting floor(fraction x n) clients at each end."""
    require(0 <= fraction < 0.5, f"trim_fraction: must be in [0, 0.5), got {fraction}")
    cut = int(fraction * len(uploads))

    def rule(stacked: torch.Tensor) -> torch.Tensor:
        ordered = stacked.sort(dim=0).values
        return ordered[cut:len(stacked) - cut].mean(dim=0)

    return _combine(uploads, rule)
