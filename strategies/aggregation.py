"""Aggregation math on deltas (dict[str, Tensor]): pure functions, no Flower.

Conventions
- `weights` are the clients' example counts (any non-negative numbers, sum > 0); they are
  normalized to p_i = w_i / sum(w). A client with weight 0 contributes nothing.
- Floating tensors are averaged in float64 and cast back to the first client's dtype.
- Integer tensors (e.g. BatchNorm `num_batches_tracked`) take the element-wise MAX over the
  clients with weight > 0 (a counter of steps seen; a weighted mean of counters has no meaning),
  bool tensors the element-wise OR. Keys ending in `.indices` are never combined that way: they
  must be identical across clients (otherwise use `taskedge_average`).
- LoRA keys are paired by name: a key containing `lora_A` (followed by `.` or the end, so also
  `dw_lora_A`) pairs with the same key with `lora_B`. A: (r, in) or (r, in, k, k) or (r, k*k);
  B: (out, r) or (out, r, 1, 1) or (C, r). As matrices A is (r, prod(A.shape[1:])) and B is
  (B.shape[0], r), so B @ A is the layer's low-rank update.
- LoRA scaling: peft applies W = W0 + s * B @ A with s = lora_alpha / r (or lora_alpha / sqrt(r)
  with rsLoRA). Clients of different ranks therefore have different s. `lora_exact` and
  `lora_stack` aggregate the EFFECTIVE update s_i * B_i @ A_i when `lora_alpha` is given and
  factor the result for the receiving rank's own scaling s' (so s' * B' @ A' is the aggregate).
  With `lora_alpha=None` the scaling is taken as 1 for everyone (raw products), which is correct
  whenever all clients share one scaling.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from fedpeft.errors import UsageError, choice, require

Delta = dict[str, torch.Tensor]

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# -- input checks ----------------------------------------------------------------------------------

def _probs(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> list[float]:
    require(len(deltas) > 0, "deltas: need at least one client delta")
    require(len(weights) == len(deltas), f"weights: got {len(weights)} weights for {len(deltas)} deltas")
    for i, w in enumerate(weights):
        require(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
                f"weights[{i}]: must be a finite number >= 0 (examples), got {w!r}")
    total = float(sum(weights))
    require(total > 0, "weights: sum must be > 0")
    return [float(w) / total for w in weights]


def _check_same(deltas: Sequence[Mapping[str, torch.Tensor]], keys: Iterable[str], hint: str = "") -> None:
    keys = list(keys)
    for i, d in enumerate(deltas):
        for k in keys:
            require(k in d, f"deltas[{i}]: missing key {k!r} that deltas[0] has{hint}")
            require(tuple(d[k].shape) == tuple(deltas[0][k].shape),
                    f"deltas[{i}][{k}]: shape {tuple(d[k].shape)} differs from deltas[0] {tuple(deltas[0][k].shape)}{hint}")


def _check_keysets(deltas: Sequence[Mapping[str, torch.Tensor]]) -> None:
    ref = set(deltas[0])
    for i, d in enumerate(deltas[1:], start=1):
        extra = sorted(set(d) - ref)
        require(not extra, f"deltas[{i}]: key {extra[0]!r} not in deltas[0]" if extra else "")


# -- FedAvg ----------------------------------------------------------------------------------------

def _average_key(key: str, tensors: Sequence[torch.Tensor], probs: Sequence[float]) -> torch.Tensor:
    ref = tensors[0]
    live = [t for t, p in zip(tensors, probs) if p > 0]
    if ref.is_floating_point():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for t, p in zip(tensors, probs):
            if p > 0:
                acc += p * t.detach().to(torch.float64)
        return acc.to(ref.dtype)
    if key.endswith(".indices"):
        for t in live[1:]:
            require(torch.equal(t, live[0]),
                    f"{key}: clients sent different indices; average sparse TaskEdge deltas with taskedge_average")
        return live[0].clone()
    stacked = torch.stack([t.detach() for t in live])
    if ref.dtype == torch.bool:
        return stacked.any(dim=0)
    return stacked.max(dim=0).values


def fedavg(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Delta:
    """Weighted (by examples) mean of every key; integer tensors take the max (see module doc)."""
    probs = _probs(deltas, weights)
    _check_keysets(deltas)
    _check_same(deltas, deltas[0].keys())
    return {k: _average_key(k, [d[k] for d in deltas], probs) for k in deltas[0]}


# -- LoRA ------------------------------------------------------------------------------------------

def _pair_key(key: str) -> str | None:
    """The lora_B key paired with a lora_A key, or None when `key` is not a lora_A key."""
    pos = key.rfind("lora_A")
    if pos < 0:
        return None
    end = pos + len("lora_A")
    if end < len(key) and key[end] != ".":
        return None
    return key[:pos] + "lora_B" + key[end:]


def lora_pairs(delta: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{lora_A key: lora_B key} for every adapted layer in `delta` (each A must have its B)."""
    pairs = {}
    for key in delta:
        b = _pair_key(key)
        if b is not None:
            require(b in delta, f"{key}: lora_A without its lora_B {b!r}")
            pairs[key] = b
    b_keys = set(pairs.values())
    for key in delta:
        if "lora_B" in key and key not in b_keys and _pair_key(key.replace("lora_B", "lora_A")) is not None:
            raise UsageError(f"{key}: lora_B without its lora_A")
    return pairs


def _lora_rank(a_key: str, a: torch.Tensor, b: torch.Tensor) -> int:
    require(a.dim() >= 2 and b.dim() >= 2, f"{a_key}: lora_A/lora_B must have >= 2 dimensions")
    r = a.shape[0]
    require(b.shape[1] == r, f"{a_key}: lora_B has {b.shape[1]} rank columns, lora_A has rank {r}")
    require(all(s == 1 for s in b.shape[2:]), f"{a_key}: lora_B trailing dims must be 1, got {tuple(b.shape)}")
    return r


def _scaling(r: int, lora_alpha: float | None, use_rslora: bool) -> float:
    if lora_alpha is None:
        return 1.0
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r = a.shape[0]
    return b.detach().to(torch.float64).reshape(b.shape[0], r) @ a.detach().to(torch.float64).reshape(r, -1)


def _other_keys(deltas, pairs) -> list[str]:
    lora = set(pairs) | set(pairs.values())
    return [k for k in deltas[0] if k not in lora]


def _check_lora_layers(deltas) -> dict[str, str]:
    pairs = lora_pairs(deltas[0])
    require(pairs, "deltas[0]: no lora_A/lora_B keys; this aggregation is for LoRA deltas")
    _check_keysets(deltas)
    for i, d in enumerate(deltas[1:], start=1):
        require(lora_pairs(d).keys() == pairs.keys(), f"deltas[{i}]: adapts other layers than deltas[0]")
    return pairs


def lora_fedit(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Delta:
    """FedIT: average A and B separately (plain FedAvg; all clients must share the ranks)."""
    _check_lora_layers(deltas)
    _check_same(deltas, deltas[0].keys(), hint="; clients with different ranks need mode exact or stack")
    return fedavg(deltas, weights)


def lora_ffa(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
             global_state: Mapping[str, torch.Tensor] | None = None) -> Delta:
    """FFA-LoRA: A stays frozen at its initialization, only B is averaged.

    A is passed through untouched from `global_state` (the server's adapter state). Without
    `global_state`, every client must have sent the same A (it is frozen), which is returned.
    Uploads without any lora_A (FFA clients send only B: A is the same seeded init on every
    device) are averaged key by key, and the result holds no A either."""
    probs = _probs(deltas, weights)
    if not any(_pair_key(k) for d in deltas for k in d):
        require(any("lora_B" in k for k in deltas[0]), "deltas[0]: no lora_B keys; this aggregation is for LoRA deltas")
        _check_keysets(deltas)
        _check_same(deltas, deltas[0].keys(), hint="; FFA needs one rank for all clients")
        return {k: _average_key(k, [d[k] for d in deltas], probs) for k in deltas[0]}
    pairs = _check_lora_layers(deltas)
    _check_same(deltas, deltas[0].keys(), hint="; FFA needs one rank for all clients")
    out: Delta = {}
    for a_key, b_key in pairs.items():
        if global_state is not None:
            require(a_key in global_state, f"global_state: missing {a_key!r} (the frozen lora_A)")
            a = global_state[a_key]
            require(tuple(a.shape) == tuple(deltas[0][a_key].shape),
                    f"global_state[{a_key}]: shape {tuple(a.shape)} differs from the clients' {tuple(deltas[0][a_key].shape)}")
            out[a_key] = a.detach().clone()
        else:
            for i, d in enumerate(deltas[1:], start=1):
                require(torch.equal(d[a_key], deltas[0][a_key]),
                        f"deltas[{i}][{a_key}]: differs from deltas[0]; FFA freezes lora_A: pass global_state")
            out[a_key] = deltas[0][a_key].detach().clone()
        out[b_key] = _average_key(b_key, [d[b_key] for d in deltas], probs)
    for k in _other_keys(deltas, pairs):
        out[k] = _average_key(k, [d[k] for d in deltas], probs)
    return out


def _factor(m: torch.Tensor, rank: int, a_like: torch.Tensor, b_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of m (out, n) into B' (out, rank) and A' (rank, n) with B' = U sqrt(S),
    A' = sqrt(S) V^T; zero-padded when rank exceeds min(out, n). Shaped like b_like / a_like."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b = torch.zeros(m.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, m.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    a = a.reshape((rank,) + tuple(a_like.shape[1:])).to(a_like.dtype)
    b = b.reshape((b_like.shape[0], rank) + tuple(b_like.shape[2:])).to(b_like.dtype)
    return a, b


def lora_exact(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
               ranks_out: Sequence[int] | int | None = None, lora_alpha: float | None = None,
               use_rslora: bool = False) -> list[Delta] | Delta:
    """Exact aggregation (FlexLoRA / HetLoRA style): per layer, the weighted mean of the effective
    updates s_i * B_i @ A_i, re-factored by truncated SVD for each requested rank.

    ranks_out: a list -> one delta per entry (e.g. each client's own rank); an int -> one delta;
    None -> one delta per client, each layer at that client's own rank. Non-LoRA keys (DoRA
    magnitudes, heads, BN) are FedAvg'd and included in every output. When a requested rank is
    at least the rank of the averaged update, the product is reproduced exactly."""
    probs = _probs(deltas, weights)
    pairs = _check_lora_layers(deltas)
    others = _other_keys(deltas, pairs)
    _check_same(deltas, others)
    single = isinstance(ranks_out, int) and not isinstance(ranks_out, bool)
    if ranks_out is None:
        plan = [{a: deltas[i][a].shape[0] for a in pairs} for i in range(len(deltas))]
    else:
        ranks = [ranks_out] if single else list(ranks_out)
        require(len(ranks) > 0, "ranks_out: empty")
        for j, r in enumerate(ranks):
            require(isinstance(r, int) and not isinstance(r, bool) and r > 0, f"ranks_out[{j}]: must be an integer > 0, got {r!r}")
        plan = [{a: r for a in pairs} for r in ranks]

    outs: list[Delta] = [dict() for _ in plan]
    for a_key, b_key in pairs.items():
        ref_a, ref_b = deltas[0][a_key], deltas[0][b_key]
        m = None
        for d, p in zip(deltas, probs):
            a, b = d[a_key], d[b_key]
            r = _lora_rank(a_key, a, b)
            require(tuple(a.shape[1:]) == tuple(ref_a.shape[1:]) and b.shape[0] == ref_b.shape[0],
                    f"{a_key}: clients disagree on the layer's input/output shape")
            if p > 0:
                term = (p * _scaling(r, lora_alpha, use_rslora)) * _product(a, b)
                m = term if m is None else m + term
        for out, ranks in zip(outs, plan):
            r_out = ranks[a_key]
            a_new, b_new = _factor(m / _scaling(r_out, lora_alpha, use_rslora), r_out, ref_a, ref_b)
            out[a_key], out[b_key] = a_new, b_new
    for k in others:
        avg = _average_key(k, [d[k] for d in deltas], probs)
        for out in outs:
            out[k] = avg.clone()
    return outs[0] if single else outs


def lora_stack(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
               lora_alpha: float | None = None, use_rslora: bool = False) -> Delta:
    """FLoRA-style stacking: concatenate the A's along the rank dim and the B's (each multiplied by
    p_i * s_i / s_out) along theirs, so s_out * B_stack @ A_stack = sum_i p_i s_i B_i A_i exactly.
    The output rank is the sum of the clients' ranks (clients with weight 0 are left out)."""
    probs = _probs(deltas, weights)
    pairs = _check_lora_layers(deltas)
    others = _other_keys(deltas, pairs)
    _check_same(deltas, others)
    live = [(d, p) for d, p in zip(deltas, probs) if p > 0]
    out: Delta = {}
    for a_key, b_key in pairs.items():
        ranks = [_lora_rank(a_key, d[a_key], d[b_key]) for d, _ in live]
        s_out = _scaling(sum(ranks), lora_alpha, use_rslora)
        out[a_key] = torch.cat([d[a_key].detach() for d, _ in live], dim=0)
        out[b_key] = torch.cat([(d[b_key].detach().to(torch.float64) * (p * _scaling(r, lora_alpha, use_rslora) / s_out))
                                .to(d[b_key].dtype) for (d, p), r in zip(live, ranks)], dim=1)
    for k in others:
        out[k] = _average_key(k, [d[k] for d in deltas], probs)
    return out


def lora_effective_update(delta: Mapping[str, torch.Tensor], a_key: str, lora_alpha: float | None = None,
                          use_rslora: bool = False) -> torch.Tensor:
    """s * B @ A (float64 matrix, (out, prod(A.shape[1:]))) for one adapted layer: handy for checks."""
    b_key = _pair_key(a_key)
    require(b_key is not None and a_key in delta and b_key in delta, f"{a_key}: not a lora_A key of this delta")
    r = _lora_rank(a_key, delta[a_key], delta[b_key])
    return _scaling(r, lora_alpha, use_rslora) * _product(delta[a_key], delta[b_key])


# -- TaskEdge --------------------------------------------------------------------------------------

def _sparse_modules(delta: Mapping[str, torch.Tensor]) -> list[str]:
    mods = []
    for key in delta:
        if key.endswith(".values"):
            prefix = key[: -len(".values")]
            require(prefix + ".indices" in delta, f"{key}: values without {prefix}.indices")
            mods.append(prefix)
    for key in delta:
        if key.endswith(".indices"):
            require(key[: -len(".indices")] + ".values" in delta, f"{key}: indices without values")
    return mods


def taskedge_average(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                     numels: Mapping[str, int] | None = None) -> Delta:
    """Per-entry weighted mean over only the clients that trained the entry.

    For each `<module>.weight` with `.values` (1-D float) and `.indices` (1-D int, flat indices):
    value[j] = sum_{i trains j} w_i v_i[j] / sum_{i trains j} w_i, over the union of the indices
    (output indices sorted ascending, in the clients' index dtype). A client may omit a module (it trained none of its
    entries); clients with weight 0 are ignored, and a module no weighted client trained comes back
    with empty values/indices. Other keys (BN, head, LoRA of taskedge_lora) are FedAvg'd.
    `numels` ({`<module>.weight`: weight.numel()}) additionally checks the index range."""
    probs = _probs(deltas, weights)
    modules: list[str] = []
    for d in deltas:
        for m in _sparse_modules(d):
            if m not in modules:
                modules.append(m)
    sparse_keys = {m + s for m in modules for s in (".values", ".indices")}
    dense = [k for k in deltas[0] if k not in sparse_keys]
    for i, d in enumerate(deltas):
        extra = [k for k in d if k not in sparse_keys and k not in deltas[0]]
        require(not extra, f"deltas[{i}]: key {extra[0]!r} not in deltas[0]" if extra else "")
    _check_same(deltas, dense)
    out: Delta = {}
    for m in modules:
        idx_parts, val_parts, w_parts = [], [], []
        dtype = idx_dtype = None
        for i, (d, p) in enumerate(zip(deltas, probs)):
            if m + ".values" not in d:
                continue
            v, ix = d[m + ".values"], d[m + ".indices"]
            where = f"deltas[{i}][{m}]"
            require(v.dim() == 1 and v.is_floating_point(), f"{where}.values: must be a 1-D float tensor, got {v.dtype} {tuple(v.shape)}")
            require(ix.dim() == 1 and not ix.is_floating_point() and ix.dtype != torch.bool,
                    f"{where}.indices: must be a 1-D integer tensor, got {ix.dtype} {tuple(ix.shape)}")
            require(v.numel() == ix.numel(), f"{where}: {v.numel()} values for {ix.numel()} indices")
            ix = ix.to(torch.int64)
            if ix.numel():
                require(int(ix.min()) >= 0, f"{where}.indices: negative index {int(ix.min())}")
                if numels is not None and m in numels:
                    require(int(ix.max()) < numels[m], f"{where}.indices: index {int(ix.max())} >= numel {numels[m]}")
                require(torch.unique(ix).numel() == ix.numel(), f"{where}.indices: duplicate indices")
            dtype = v.dtype if dtype is None else dtype
            idx_dtype = d[m + ".indices"].dtype if idx_dtype is None else idx_dtype
            if p > 0:
                idx_parts.append(ix)
                val_parts.append(v.detach().to(torch.float64) * p)
                w_parts.append(torch.full((ix.numel(),), p, dtype=torch.float64))
        if not idx_parts:
            out[m + ".values"] = torch.zeros(0, dtype=dtype or torch.float32)
            out[m + ".indices"] = torch.zeros(0, dtype=idx_dtype or torch.int64)
            continue
        union, inverse = torch.unique(torch.cat(idx_parts), sorted=True, return_inverse=True)
        num = torch.zeros(union.numel(), dtype=torch.float64).index_add_(0, inverse, torch.cat(val_parts))
        den = torch.zeros(union.numel(), dtype=torch.float64).index_add_(0, inverse, torch.cat(w_parts))
        out[m + ".values"] = (num / den).to(dtype)
        out[m + ".indices"] = union.to(idx_dtype)  # the clients' index dtype (int32 on the wire)
    for k in dense:
        out[k] = _average_key(k, [d[k] for d in deltas], probs)
    return out


# -- FedBN -----------------------------------------------------------------------------------------

def bn_keys(delta: Mapping[str, torch.Tensor], bn_modules: nn.Module | Iterable[str] | None = None) -> list[str]:
    """The BatchNorm keys of `delta`. `bn_modules`: a model (its _BatchNorm modules' names), names of
    BN modules, or None to infer them from `<module>.running_mean` keys (needs running stats)."""
    if bn_modules is None:
        prefixes = {k[: -len(".running_mean")] for k in delta if k.endswith(".running_mean")}
    elif isinstance(bn_modules, nn.Module):
        prefixes = {n for n, mod in bn_modules.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    else:
        prefixes = set(bn_modules)
    return [k for k in delta if "." in k and k.rsplit(".", 1)[0] in prefixes and k.rsplit(".", 1)[1] in BN_SUFFIXES]


def drop_bn(delta: Mapping[str, torch.Tensor], bn_modules: nn.Module | Iterable[str] | None = None) -> Delta:
    """FedBN: the delta without its BatchNorm keys, so BN parameters and statistics stay local."""
    drop = set(bn_keys(delta, bn_modules))
    return {k: v for k, v in delta.items() if k not in drop}


def client_upload(cfg, delta: Mapping[str, torch.Tensor], model: nn.Module) -> Delta:
    """What a client of run `cfg` (a RunConfig) uploads of its method's full delta on `model`: no
    BatchNorm under FedBN, no mask indices when the server holds the shared TaskEdge mask. The
    clients send it and the server checks replies against it, so both use this one definition."""
    if cfg.fedbn:
        delta = drop_bn(delta, model)
    if cfg.shares_mask:
        delta = {k: v for k, v in delta.items() if not k.endswith(".indices")}
    return dict(delta)


# -- dispatcher ------------------------------------------------------------------------------------

DENSE_METHODS = ("fft", "bn_head", "galore")
LORA_METHODS = ("lora", "dora")
MODES = {
    "dense": ("fedavg",),
    "lora": ("fedit", "fedavg", "ffa", "exact", "stack"),
    "taskedge": ("masked",),
}
DEFAULT_MODE = {"dense": "fedavg", "lora": "fedit", "taskedge": "masked"}
_OPTIONS = {
    "fedavg": (), "fedit": (), "ffa": ("global_state",), "exact": ("ranks_out", "lora_alpha", "use_rslora"),
    "stack": ("lora_alpha", "use_rslora"), "masked": ("numels",),
}


def method_family(method_name: str) -> str:
    """dense (fft, bn_head, galore), lora (lora, dora and lora_*/dora_* variants) or taskedge (taskedge*)."""
    if method_name in DENSE_METHODS:
        return "dense"
    if method_name.startswith("taskedge"):
        return "taskedge"
    if method_name in LORA_METHODS or method_name.startswith(("lora_", "dora_")):
        return "lora"
    raise UsageError(f"method: unknown value {method_name!r}; allowed: {', '.join(DENSE_METHODS + LORA_METHODS)}, "
                     "taskedge (and variants lora_*, dora_*, taskedge_*)")


def aggregate(method_name: str, mode: str | None, deltas: Sequence[Mapping[str, torch.Tensor]],
              weights: Sequence[float], *, fedbn: bool = False,
              bn_modules: nn.Module | Iterable[str] | None = None, **kw) -> Delta | list[Delta]:
    """Aggregate client deltas of `method_name` with `mode` (None -> the method's default).

    Modes: fft/bn_head/galore: fedavg. lora/dora: fedit (= fedavg), ffa (global_state=),
    exact (ranks_out=, lora_alpha=, use_rslora=; returns a list unless ranks_out is an int),
    stack (lora_alpha=, use_rslora=). taskedge*: masked (numels=). `fedbn=True` drops the BN keys
    of every delta first (FedBN), so the result holds no BN keys."""
    family = method_family(method_name)
    mode = DEFAULT_MODE[family] if mode in (None, "default") else mode
    choice(f"aggregation mode for {method_name}", mode, MODES[family])
    allowed = _OPTIONS[mode]
    for key in kw:
        require(key in allowed, f"aggregate: option {key!r} is not used by mode {mode}; "
                                f"allowed: {', '.join(allowed) or 'none'}")
    if fedbn:
        deltas = [drop_bn(d, bn_modules) for d in deltas]
    if mode in ("fedit", "fedavg") and family == "lora":
        return lora_fedit(deltas, weights)
    if mode == "fedavg":
        return fedavg(deltas, weights)
    if mode == "ffa":
        return lora_ffa(deltas, weights, **kw)
    if mode == "exact":
        return lora_exact(deltas, weights, **kw)
    if mode == "stack":
        return lora_stack(deltas, weights, **kw)
    return taskedge_average(deltas, weights, **kw)
