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

DoRA and TaskEdge have weight-space forms too:

    dora      to: m * V / ||V|| - W0 per adapted layer, V = W0 + s * B @ A, norms per output channel
              (peft's DoRA forward; the magnitude is folded into the layer's change), the head as
              value - pre-trained. Exact.
              back: s * B @ A = the best rank-r approximation of the change D (truncated SVD), and
              m = the output-channel norms of W0 + D: the weight comes back as
              ||W0 + D|| * (W0 + [D]_r) / ||W0 + [D]_r||, exact when D has rank <= r, a projection
              otherwise (each channel's norm is still exact, its direction is the rank-r one).
    taskedge  to: the values scattered at the client's mask (exact), with a *coverage* mask: the
              average of such a tensor is taken per entry, over the clients that trained that entry
              (an fft, GaLore or LoRA change covers the whole tensor), and an entry nobody changed
              keeps its previous value, as `taskedge_average` does in a same-method run. The head
              as value - pre-trained.
              back: the server cannot know the mask a TaskEdge client will pick from its own data
              before it trains, so it sends, per masked layer, the fleet's change at every entry
              where it is non-zero (flat indices + values; dense where fft/LoRA/GaLore clients
              changed the layer) and the head. The client folds them into its frozen weights and
              trains its own mask on top (the path of local-mask TaskEdge in a same-method run):
              exact on the masked layers and the head; BN and other layers' changes, which TaskEdge
              does not train, are not held (a projection). Shared-mask TaskEdge has no form here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedpeft.errors import require
from fedpeft.fleet.config import WEIGHT_SPACE_METHODS
from strategies.aggregation import _factor, _probs, lora_pairs

Delta = dict[str, torch.Tensor]
PEFT_PREFIX = "base_model.model."
#: a partial change's companion key: which entries of `key` it changed (TaskEdge's mask); a key
#: without one changed every entry
COVERAGE = "@coverage"
MAGNITUDE = ".lora_magnitude_vector"
VALUES, INDICES = ".values", ".indices"


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
    plain-model key, float32. Integer tensors (BN step counters) carry no change and are left out.
    A TaskEdge layer comes with its `COVERAGE` key (the entries it trained)."""
    require(method in WEIGHT_SPACE_METHODS, f"method: {method} has no weight-space form; allowed: "
                                            f"{', '.join(WEIGHT_SPACE_METHODS)}")
    if method == "taskedge":
        return _taskedge_to_dense(upload, pretrained)
    out: Delta = {}
    if method in ("lora", "dora"):
        pairs = lora_pairs(upload)
        used = set(pairs) | set(pairs.values())
        for a_key, b_key in pairs.items():
            a, b = upload[a_key], upload[b_key]
            layer = lora_layer_key(a_key)
            require(layer in pretrained, f"{a_key}: no layer {layer!r} in the pre-trained model")
            r = a.shape[0]
            product = b.to(torch.float64).reshape(b.shape[0], r) @ a.to(torch.float64).reshape(r, -1)
            change = (lora_scaling(r, alpha) * product).reshape(pretrained[layer].shape)
            if method == "dora":
                m_key = a_key.rsplit(".lora_A", 1)[0] + MAGNITUDE
                require(m_key in upload, f"{a_key}: DoRA layer without its magnitude {m_key!r}")
                used.add(m_key)
                w0 = pretrained[layer].to(torch.float64)
                v = w0 + change
                m = upload[m_key].to(torch.float64).reshape(-1)
                require(m.numel() == v.shape[0], f"{m_key}: {m.numel()} magnitudes for {v.shape[0]} output channels")
                change = _per_channel(m / _channel_norms(v), v) - w0
            out[layer] = change.to(torch.float32)
        rest = {k: v for k, v in upload.items() if k not in used}
        return {**out, **_changes(rest, pretrained, relative=True)}
    return _changes(upload, pretrained, relative=method != "galore")


def _channel_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel (row) of a weight: peft's DoRA `weight_norm`."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


def _per_channel(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))


def _taskedge_to_dense(upload: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor]) -> Delta:
    out: Delta = {}
    value_keys = [k for k in upload if k.endswith(VALUES)]
    for v_key in value_keys:
        layer = v_key[: -len(VALUES)]
        i_key = layer + INDICES
        require(i_key in upload, f"{v_key}: values without {i_key} (a shared-mask TaskEdge upload has no "
                                 "weight-space form)")
        values, indices = upload[v_key], upload[i_key]
        require(layer in pretrained, f"{v_key}: no layer {layer!r} in the pre-trained model")
        numel = pretrained[layer].numel()
        require(values.dim() == 1 and indices.dim() == 1 and values.numel() == indices.numel()
                and values.is_floating_point() and not indices.is_floating_point(),
                f"{layer}: values and indices must be 1-D float and integer tensors of one length")
        idx = indices.to(torch.int64)
        if idx.numel():
            require(int(idx.min()) >= 0 and int(idx.max()) < numel, f"{i_key}: index outside 0..{numel - 1}")
            require(torch.unique(idx).numel() == idx.numel(), f"{i_key}: duplicate indices")
        change = torch.zeros(numel, dtype=torch.float32)
        change[idx] = values.float()
        covered = torch.zeros(numel, dtype=torch.bool)
        covered[idx] = True
        out[layer] = change.reshape(pretrained[layer].shape)
        out[layer + COVERAGE] = covered.reshape(pretrained[layer].shape)
    stray = [k for k in upload if k.endswith(INDICES) and k[: -len(INDICES)] + VALUES not in upload]
    require(not stray, f"{stray[:1]}: indices without values")
    rest = {k: v for k, v in upload.items() if not k.endswith((VALUES, INDICES))}
    return {**out, **_changes(rest, pretrained, relative=True)}


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
    """Each tensor's example-weighted mean over the clients whose dense change has it; a tensor
    some client changed only in part (its `COVERAGE` key) is averaged per entry over the clients
    that changed that entry, and keeps its coverage (the union) for `merge`."""
    _probs(denses, weights)  # validates the weights
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, torch.Tensor] = {}
    for dense, w in zip(denses, weights):
        if w <= 0:
            continue
        for key, value in dense.items():
            if key.endswith(COVERAGE):
                continue
            cover = dense.get(key + COVERAGE)
            weight = torch.full(value.shape, float(w), dtype=torch.float64)
            if cover is not None:
                require(cover.shape == value.shape, f"{key}: coverage of another shape")
                weight = weight * cover.to(torch.float64)
            if key in sums:
                require(sums[key].shape == value.shape, f"{key}: shape {tuple(value.shape)} differs between clients")
                sums[key] += weight * value.to(torch.float64)
                totals[key] += weight
            else:
                sums[key], totals[key] = weight * value.to(torch.float64), weight
    out: Delta = {}
    for key, total in totals.items():
        covered = total > 0
        out[key] = torch.where(covered, sums[key] / total.clamp_min(1e-300), 0.0).to(torch.float32)
        if not bool(covered.all()):
            out[key + COVERAGE] = covered
    return out


def merge(previous: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]) -> Delta:
    """The fleet's dense state after a round: this round's averages, the previous value elsewhere
    (per entry, for a tensor changed only in part; coverage keys do not stay in the state)."""
    out = {k: v for k, v in previous.items() if not k.endswith(COVERAGE)}
    for key, value in averaged.items():
        if key.endswith(COVERAGE):
            continue
        cover = averaged.get(key + COVERAGE)
        if cover is None:
            out[key] = value
        else:
            before = out.get(key, torch.zeros_like(value))
            out[key] = torch.where(cover, value, before)
    return out


def from_dense(method: str, dense: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
               template: Mapping[str, torch.Tensor], alpha: float = 1.0) -> Delta:
    """`dense` in `method`'s own form, shaped like `template` (that method's upload at the client's
    rank, freshly initialised): what a client of that method starts its round from. (TaskEdge's
    form is sparse, of the state's own support: not shaped like the template's mask.)"""
    require(method in WEIGHT_SPACE_METHODS, f"method: {method} has no weight-space form; allowed: "
                                            f"{', '.join(WEIGHT_SPACE_METHODS)}")
    out: Delta = {}
    pairs = lora_pairs(template) if method in ("lora", "dora") else {}
    for a_key, b_key in pairs.items():
        layer = lora_layer_key(a_key)
        change = dense.get(layer)
        a_like, b_like = template[a_key], template[b_key]
        m_key = a_key.rsplit(".lora_A", 1)[0] + MAGNITUDE
        if change is None or not bool(change.abs().max() > 0):
            out[a_key], out[b_key] = a_like.clone(), b_like.clone()  # nobody changed it: LoRA's own init
            if method == "dora":
                out[m_key] = template[m_key].clone()  # DoRA's init: the pre-trained channel norms
            continue
        r = a_like.shape[0]
        matrix = change.to(torch.float64).reshape(change.shape[0], -1) / lora_scaling(r, alpha)
        out[a_key], out[b_key] = _factor(matrix, r, a_like, b_like)
        if method == "dora":  # the magnitude: the target's channel norms, so each channel's norm is exact
            w0 = pretrained[layer].to(torch.float64)
            like = template[m_key]
            out[m_key] = _channel_norms(w0 + change.to(torch.float64)).reshape(like.shape).to(like.dtype)
    if method == "taskedge":
        return _taskedge_from_dense(dense, pretrained, template)
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


def _taskedge_from_dense(dense: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
                         template: Mapping[str, torch.Tensor]) -> Delta:
    """Per masked layer the state's change at every entry where it is non-zero (sorted flat
    indices in the template's index dtype, float32 values); the head as pre-trained + change."""
    out: Delta = {}
    for v_key in (k for k in template if k.endswith(VALUES)):
        layer = v_key[: -len(VALUES)]
        change = dense.get(layer)
        flat = change.reshape(-1) if change is not None else torch.zeros(0)
        idx = torch.nonzero(flat, as_tuple=True)[0]
        out[v_key] = flat[idx].to(template[v_key].dtype)
        out[layer + INDICES] = idx.to(template[layer + INDICES].dtype)
    for key, like in template.items():
        if key.endswith((VALUES, INDICES)):
            continue
        name = plain_key(key)
        change = dense.get(name)
        base = pretrained[name].to(like.dtype)
        out[key] = base + change.to(like.dtype) if change is not None else base.clone()
    return out
