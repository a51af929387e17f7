"""GaLore's low-rank upload: within one local round, GaLore's update to a projected weight lies in
its projector's subspace, so it travels as two factors instead of the dense matrix.

GaLoreAdamW projects each weight's gradient (viewed as an m x n matrix) onto r orthonormal
directions: on the left (P, m x r: the step is P @ X) or on the right (Q, r x n: the step is
X @ Q). The projector is computed at the round's first step and kept while `update_proj_gap`
steps have not passed, and fedpeft's GaLore uses no weight decay, so the round's whole update U
satisfies U = P P^T U (or U Q^T Q). The client uploads, per projected weight,

    <name>.galore_L   m x r   (P, or U Q^T)
    <name>.galore_R   r x n   (P^T U, or Q)

and the server rebuilds the weight's delta as (what it sent) + L @ R. A weight whose update is not
in one subspace (the projector was refreshed mid-round) travels dense, under its own name, and
the client counts it. Other parameters (BatchNorm affine, biases) are always dense.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpeft.errors import UsageError, require

LEFT, RIGHT = ".galore_L", ".galore_R"
#: the factors stand for the update when ||U - L R|| <= IN_SUBSPACE_TOL ||U|| + ROUNDING_ULPS x
#: eps32 x ||W||: every optimizer step rounds the float32 weight W, and that rounding (a few ulps
#: of |W| per element, ~1e-4 of a small round's update) lies outside the subspace; a refreshed
#: projector leaves a residual of the update's own order
IN_SUBSPACE_TOL = 1e-4
ROUNDING_ULPS = 32.0
EPS32 = float(torch.finfo(torch.float32).eps)


def factors_of(update: torch.Tensor, basis: torch.Tensor,
               weight_norm: float = 0.0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(L, R) with L @ R == `update` viewed as (shape[0], -1), from the projector's orthonormal
    `basis` (m x r: left, r x n: right); None when the update is not in that subspace (up to the
    rounding of a weight of norm `weight_norm`)."""
    mat = update.reshape(update.shape[0], -1).float()
    m, n = mat.shape
    basis = basis.float()
    if basis.dim() == 2 and basis.shape[0] == m:  # left (r < n, so a right basis never has m rows)
        left, right = basis, basis.T @ mat
    elif basis.dim() == 2 and basis.shape[1] == n:  # right
        left, right = mat @ basis.T, basis
    else:
        return None
    residual = float((mat - left @ right).norm())
    allowed = IN_SUBSPACE_TOL * float(mat.norm()) + ROUNDING_ULPS * EPS32 * weight_norm
    return (left.contiguous(), right.contiguous()) if residual <= allowed else None


def factored_upload(delta: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                    bases: Mapping[str, torch.Tensor],
                    weights: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """The upload of a GaLore round: each weight in `bases` (name -> the projector's basis) as the
    factors of its round update (`delta` - `start`, the state the round began from), other tensors
    and weights whose update left the subspace dense. `weights`: the trained weights themselves,
    whose float32 rounding the subspace check allows for. Returns (upload, weights sent dense)."""
    out, dense = {}, 0
    for name, value in delta.items():
        basis = bases.get(name)
        if basis is None:
            out[name] = value
            continue
        weight_norm = float(weights[name].detach().norm()) if weights and name in weights else 0.0
        pair = factors_of(value - start[name] if name in start else value, basis, weight_norm)
        if pair is None:
            out[name], dense = value, dense + 1
        else:
            out[name + LEFT], out[name + RIGHT] = pair
    return out, dense


def expand_upload(upload: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor],
                  shapes: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """The dense GaLore delta of an upload: factors become `sent[name]` + L @ R. `shapes` is the
    dense delta's keys and shapes; anything else (a key twice, a missing or unknown key, factors
    of the wrong size or a rank above min(m, n)) raises UsageError."""
    out = {}
    for name, shape in shapes.items():
        has_dense, has_left, has_right = name in upload, name + LEFT in upload, name + RIGHT in upload
        if has_dense:
            require(not (has_left or has_right), f"payload[{name}]: sent both dense and as GaLore factors")
            out[name] = upload[name]
            continue
        require(has_left and has_right, f"payload: missing {name!r} (dense, or {name}{LEFT} and {name}{RIGHT})")
        left, right = upload[name + LEFT], upload[name + RIGHT]
        m, n = shape[0], int(torch.Size(shape[1:]).numel())
        ok = (left.dim() == 2 and right.dim() == 2 and left.shape[0] == m and right.shape[1] == n
              and left.shape[1] == right.shape[0] and 0 < left.shape[1] <= min(m, n))
        require(ok, f"payload[{name}{LEFT}]: factors {tuple(left.shape)} x {tuple(right.shape)} do not make {m} x {n} "
                    f"with a rank of at most {min(m, n)}")
        require(left.dtype == right.dtype == torch.float32,
                f"payload[{name}{LEFT}]: GaLore factors must be float32 (fp16/int8 uploads decode to it), "
                f"got {left.dtype} and {right.dtype}")
        base = sent.get(name)
        change = (left @ right).reshape(shape)
        out[name] = change if base is None else base.float() + change
    known = set(shapes) | {k + LEFT for k in shapes} | {k + RIGHT for k in shapes}
    extra = sorted(k for k in upload if k not in known)
    if extra:
        raise UsageError(f"payload: {len(extra)} unexpected key(s), e.g. {extra[:3]}")
    return out
