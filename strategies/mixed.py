"""The server side of a mixed-method run: every client trains what fits, every update counts.

A run becomes mixed when its clients run different methods: `method = auto`, a fleet file that
names a method per device, or a budget fallback (a LoRA client that only fits BN+H). The server
then keeps the fleet's state as a *dense change to the pre-trained model* (strategies/
weight_space.py) instead of one method's adapter, and per round:

1. predicts each sampled client's setting, with the same budget walk and this round's budget the
   client will use (fedpeft.fleet.budget.choose_setting), and sends it that method's form of the
   state at its rank; the message's `form-method`/`form-rank` say which (a client that picks
   another setting after all starts from its fresh adapter, and logs `start: fresh`);
2. validates each upload against its own method's template (keys, shapes, dtypes), turns it into
   its dense change, screens the changes by norm against the current state, and averages each
   tensor over the clients that changed it (weighted by examples).

The global model evaluated each round is pre-trained + the dense state (fft's form). Downlink
bytes are counted per client in its own form. `weight_space_bn_stats = false` leaves BatchNorm
running statistics out of the average (the fleet keeps the ones it has): they are estimates, and a
client that fell back to BN+H estimated them on batches as small as 2 (experiments/mixed_fleet.py).
`mixed_aggregation = same_method_only` keeps the old behaviour: only the run's method is
aggregated, fallbacks are logged and dropped.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from fedpeft.errors import require
from fedpeft.fleet import setup
from fedpeft.fleet.budget import all_candidates
from fedpeft.fleet.config import WEIGHT_SPACE_METHODS, RunConfig
from fedpeft.methods.galore_upload import expand_upload
from fedpeft.payload import decode, encode
from strategies.aggregation import client_upload
from strategies.validation import check_dtypes
from strategies.weight_space import COVERAGE, average, from_dense, merge, to_dense

Delta = dict[str, torch.Tensor]
Form = tuple[str, int]
BN_STATISTICS = ("running_mean", "running_var")  # (method, rank; 0 for unranked methods)


class MixedFleet:
    def __init__(self, cfg: RunConfig, dense: Mapping[str, torch.Tensor] | None = None):
        self.cfg = cfg
        self.pretrained = {k: v.detach().clone() for k, v in setup.pretrained_model(cfg).state_dict().items()}
        self.dense: Delta = dict(dense or {})
        # the forms a client of this run can have: a reply claiming another (say LoRA at rank 10^9)
        # is rejected before the server builds anything for it
        self.allowed = {(m, r or 0) for m, r, _ in all_candidates(cfg)}
        self._templates: dict[Form, Delta] = {}
        self._forms: dict[Form, tuple[Delta, ArrayRecord]] = {}

    @classmethod
    def from_global(cls, cfg: RunConfig, global_delta: Mapping[str, torch.Tensor]) -> "MixedFleet":
        """Switch a same-method run to weight space: its global adapter becomes the dense state."""
        fleet = cls(cfg)
        fleet.dense = merge({}, to_dense(cfg.method, global_delta, fleet.pretrained, cfg.alpha)) if global_delta else {}
        return fleet

    def template(self, form: Form) -> Delta:
        """A fresh upload of `form` (its keys, shapes and dtypes; LoRA's own initialisation)."""
        if form not in self._templates:
            method, rank = form
            adapter = setup.attach(self.cfg, method, rank or None, calibration=None)
            self._templates[form] = client_upload(self.cfg, adapter.delta(), adapter.model)
        return self._templates[form]

    def begin_round(self) -> None:
        self._forms = {}

    def form(self, form: Form) -> tuple[Delta, ArrayRecord]:
        """The dense state in `form`, and its record (built once per round)."""
        if form not in self._forms:
            method, _ = form
            require(method in WEIGHT_SPACE_METHODS, f"form: {method} has no weight-space form")
            delta = from_dense(method, self.dense, self.pretrained, self.template(form), self.cfg.alpha)
            self._forms[form] = (delta, encode(delta)[0])
        return self._forms[form]

    def decode(self, payload: ArrayRecord, rec: dict) -> Delta:
        """A client's upload as the dense change it makes, validated against its method's template
        (raises UsageError). A factored GaLore upload is expanded from the state the client started
        from: the form it was sent, or zero if it started fresh."""
        method, rank = rec.get("method"), int(rec.get("rank") or 0)
        require(method in WEIGHT_SPACE_METHODS, f"method: {method} has no weight-space form")
        require((method, rank) in self.allowed, f"setting: {method} at rank {rank} is not one this run's clients "
                                                "can choose")
        template = self.template((method, rank))
        shapes = {k: tuple(v.shape) for k, v in template.items()}
        if method == "galore" and self.cfg.factored_galore:
            started = self.form((method, rank))[0] if rec.get("start") == "global" else {}
            delta = expand_upload(decode(payload), started, shapes)
        else:
            delta = decode(payload, expected=shapes)
        check_dtypes(delta, template)
        dense = to_dense(method, delta, self.pretrained, self.cfg.alpha)
        for key in [k for k in dense if k.endswith(COVERAGE)]:  # TaskEdge: entries off its mask are the state's
            layer = key[: -len(COVERAGE)]  # (so its update, screened by norm, is what it trained; the
            if layer in self.dense:  # average takes only the covered entries anyway)
                dense[layer] = torch.where(dense[key], dense[layer], self.dense[layer])
        if not self.cfg.weight_space_bn_stats:  # statistics are estimates, not learned: keep the fleet's
            dense = {k: v for k, v in dense.items() if not k.endswith(BN_STATISTICS)}
        return dense

    def aggregate(self, denses: list[Delta], weights: list[float]) -> Delta:
        """The next dense state: each tensor's mean over the clients that changed it (not yet
        adopted: the caller checks it, then `commit`s)."""
        return merge(self.dense, average(denses, weights))

    def commit(self, dense: Mapping[str, torch.Tensor]) -> None:
        self.dense = dict(dense)
        self._forms = {}  # forms of the old state are stale

    def evaluation_delta(self) -> Delta:
        """The fleet's model as an fft delta (pre-trained + the dense state), for evaluation."""
        return self.form(("fft", 0))[0]
