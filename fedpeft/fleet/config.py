"""The run configuration: one flat mapping of scalars, so it travels unchanged as Flower's run
config (`flwr run . --run-config "k=v ..."`, pyproject's [tool.flwr.app.config]) and as a
Python object in the in-process simulation. Keys may use '-' or '_'."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedpeft.errors import UsageError, choice, require
from fedpeft.names import PRETRAIN_SCHEDULES

LORA_MODES = ("fedit", "ffa", "exact")
TASKEDGE_MASKS = ("local", "shared")
BUDGET_POLICIES = ("adapt", "strict")
CODECS = ("none", "fp16", "int8")
GALORE_UPLOADS = ("factored", "dense")
MIXED_AGGREGATIONS = ("weight_space", "same_method_only")
#: methods that have a weight-space form (strategies/weight_space.py), most expressive first
WEIGHT_SPACE_METHODS = ("fft", "galore", "lora", "bn_head", "dora", "taskedge")  # strategies/weight_space.py
AUTO = "auto"
AGGREGATORS = ("fedavg", "median", "trimmed_mean")
STRAGGLER_POLICIES = ("drop", "partial")
DEVICES = ("cpu", "cuda", "auto")  # where local training runs (fedpeft/train.py: resolve_device)
#: a Ray head's HOST:PORT (IPv4, name or [IPv6])
RAY_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:]+\]|[^\s:/\[\]]+):\d{1,5}")


#: The pre-training of every figure measured before 2026-12-05, when onecycle became the default:
#: experiments whose committed results came from it pin it, so their commands still reproduce them.
LEGACY_PRETRAINING = {"pretrain_schedule": "legacy", "pretrain_epochs": 8}

@dataclass
class RunConfig:
    # model and method
    model: str = "mobilenet_v2"
    input_size: int = 32
    method: str = "lora"  # or "auto": each device the first of method_order that fits its budget
    method_order: str = "fft,galore,lora,bn_head"  # method=auto's preference, most expressive first
    rank: int = 4
    alpha: float = 4.0
    density: float = 0.0  # TaskEdge mask density; 0: the method's own default (taskedge 0.001, taskedge_lora 0.01)
    nm: str = ""
    depthwise: bool = False
    lr: float = 0.0  # 0: the method's own default
    # federation
    rounds: int = 3
    num_clients: int = 10
    clients_per_round: int = 0  # 0: every client, every round
    local_epochs: int = 1
    batch_size: int = 32
    lora_mode: str = "fedit"
    # TaskEdge: "local", each client ranks weights on its own data and uploads values + indices;
    # "shared", the server sums the clients' activation statistics once, builds one mask, and
    # clients upload values only. taskedge_lora always shares one mask (its LoRA pairs are averaged).
    taskedge_mask: str = "local"
    fedbn: bool = False
    # a client whose method differs from the run's (a budget fallback, a fleet file's per-device
    # method, method=auto): weight_space aggregates every method's update as the dense change it
    # makes (strategies/weight_space.py); same_method_only aggregates the run's method alone
    mixed_aggregation: str = "weight_space"
    weight_space_bn_stats: bool = True  # weight space also averages BatchNorm running statistics
    budget_policy: str = "adapt"
    max_flops_per_round: float = 0.0  # per client; 0: no FLOP budget
    upload_codec: str = "none"
    galore_upload: str = "factored"  # GaLore: each projected weight's round update as its two low-rank factors
    fleet: str = ""  # fleet TOML; "": a mixed default fleet of num_clients devices
    evaluate_every: int = 1  # server evaluation after every this many rounds (round 0 too); the last round always; 0: the last only
    # robustness (strategies/robust.py): how updates are combined, and which are screened out first
    aggregator: str = "fedavg"  # fedavg (weighted by examples) | median | trimmed_mean (coordinate-wise, unweighted)
    trim_fraction: float = 0.1  # trimmed_mean: share of clients cut at each end of every coordinate
    clip_norm: float = 0.0  # clip each update (upload - global) to this L2 norm; 0: off
    clip_median_multiple: float = 0.0  # clip each update to this multiple of the round's median norm; 0: off
    reject_norm_multiple: float = 10.0  # reject an update whose norm exceeds this multiple of the others' median; 0: off
    max_examples: int = 0  # cap on the examples a reply may claim; 0: the client's partition size x local_epochs
    # time limits: a round waits at most this long (real seconds) for nodes to connect and for replies
    round_timeout_s: float = 600.0
    # the virtual clock (fedpeft/fleet/clock.py, strategies/virtual_clock.py): simulated seconds
    trace: str = ""  # availability/budget trace file (CSV or JSON); "": generated from the fleet and seed; "off": always on
    round_deadline_s: float = 0.0  # a round closes this many simulated seconds after it starts; 0: no deadline
    straggler_policy: str = "drop"  # drop: a client late for the deadline is discarded; partial: it trains what fits
    over_selection: float = 0.0  # sample (1 + this) x clients_per_round, keep the first clients_per_round to finish
    clock_jitter: bool = True  # seeded lognormal slowdown per client-round (sigma by device kind)
    target_accuracy: float = 0.0  # for time/energy/bytes to accuracy; 0: 95% of the best accuracy the run reached
    # data
    dataset: str = "digits"
    data_dir: str = ""
    task: str = "shift"
    corruption: str = "impulse_noise"
    severity: int = 5
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    pretrain_epochs: int = 0  # 0: the schedule's own (onecycle 12, legacy 8)
    pretrain_schedule: str = "onecycle"  # fedpeft.pretrain.SCHEDULES: onecycle or legacy (figures before 2026-12-05)
    pretrain_lr: float = 0.0  # 0: the schedule's own for the model (fedpeft.pretrain.schedule_defaults)
    # fault injection, for testing what a fleet survives: client ids, comma-separated
    fail_clients: str = ""  # these crash after training (Flower's error reply; the server logs them as failed)
    corrupt_clients: str = ""  # these upload a malformed payload (the server rejects it)
    poison_clients: str = ""  # these upload start + poison_scale x (their update), claiming poison_examples examples
    poison_scale: float = -10.0  # -10: sign-flipped and scaled ten-fold
    poison_examples: int = 0  # examples the poisoned clients claim; 0: their true count
    # bookkeeping
    seed: int = 0
    out: str = "runs/latest"
    cache_dir: str = ""
    resume: bool = False  # continue the run in `out` from its last checkpoint
    overwrite: bool = False  # allow a new run to replace the logs of a previous run in `out`
    # where it runs (fedpeft/fleet/simulation.py): a running Ray cluster's head HOST:PORT ("": a private Ray)
    ray_address: str = ""
    client_cpus: float = 1.0  # Ray CPUs reserved per virtual client
    client_gpus: float = 0.0  # Ray GPUs (a fraction allowed) per virtual client; > 0 needs CUDA or a cluster's GPUs
    device: str = "cpu"  # local training: cpu | cuda | auto; clients use cuda only with client_gpus > 0

    def __post_init__(self) -> None:
        # Names from fedpeft.names (no torch): a bad field is named at once; only the method's own
        # hyper-parameter check (make_method, at the end) imports the methods.
        from fedpeft.names import CORRUPTION_NAMES as CORRUPTIONS, METHOD_NAMES as METHODS, MODEL_NAMES as MODELS
        from fedpeft.names import DATASET_NAMES, PARTITION_SCHEMES as SCHEMES

        choice("model", self.model, MODELS)
        choice("method", self.method, (*METHODS, AUTO))
        choice("mixed_aggregation", self.mixed_aggregation, MIXED_AGGREGATIONS)
        for m in self.auto_order():
            choice("method_order", m, WEIGHT_SPACE_METHODS)
        if self.method == AUTO:
            require(self.mixes_methods, "method=auto: needs mixed_aggregation=weight_space, fedbn=false and "
                                        "lora_mode fedit or exact (its clients run different methods)")
        choice("lora_mode", self.lora_mode, LORA_MODES)
        choice("taskedge_mask", self.taskedge_mask, TASKEDGE_MASKS)
        choice("budget_policy", self.budget_policy, BUDGET_POLICIES)
        choice("upload_codec", self.upload_codec, CODECS)
        choice("galore_upload", self.galore_upload, GALORE_UPLOADS)
        choice("aggregator", self.aggregator, AGGREGATORS)
        choice("straggler_policy", self.straggler_policy, STRAGGLER_POLICIES)
        choice("dataset", self.dataset, DATASET_NAMES)
        choice("task", self.task, ("shift", "unseen"))
        choice("corruption", self.corruption, CORRUPTIONS)
        choice("partition", self.partition, SCHEMES)
        choice("pretrain_schedule", self.pretrain_schedule, PRETRAIN_SCHEDULES)
        require(self.pretrain_epochs >= 0, f"pretrain_epochs: must be >= 0 (0: the schedule's own), got {self.pretrain_epochs}")
        require(self.pretrain_lr >= 0 and math.isfinite(self.pretrain_lr),
                f"pretrain_lr: must be a finite number >= 0 (0: the schedule's own), got {self.pretrain_lr}")
        for name in ("input_size", "rounds", "num_clients", "local_epochs", "batch_size"):
            require(getattr(self, name) > 0, f"{name}: must be > 0, got {getattr(self, name)}")
        require(1 <= self.severity <= 5, f"severity: must be 1-5, got {self.severity}")
        require(self.clients_per_round >= 0, f"clients_per_round: must be >= 0, got {self.clients_per_round}")
        require(self.evaluate_every >= 0, f"evaluate_every: must be >= 0 rounds (0: the last round only), got {self.evaluate_every}")
        require(self.fleet or self.clients_per_round <= self.num_clients,  # a fleet file's size is checked below
                f"clients_per_round: {self.clients_per_round} is more than the fleet's {self.num_clients} clients")
        require(self.max_flops_per_round >= 0, f"max_flops_per_round: must be >= 0, got {self.max_flops_per_round}")
        require(self.dirichlet_alpha > 0, f"dirichlet_alpha: must be > 0, got {self.dirichlet_alpha}")
        require(self.lr >= 0, f"lr: must be >= 0, got {self.lr}")
        require(0 <= self.trim_fraction < 0.5, f"trim_fraction: must be in [0, 0.5), got {self.trim_fraction}")
        for name in ("clip_norm", "clip_median_multiple", "reject_norm_multiple", "max_examples", "poison_examples"):
            require(getattr(self, name) >= 0, f"{name}: must be >= 0 (0: off), got {getattr(self, name)}")
        require(self.round_timeout_s > 0, f"round_timeout_s: must be > 0 seconds, got {self.round_timeout_s}")
        require(self.round_deadline_s >= 0, f"round_deadline_s: must be >= 0 seconds (0: none), got {self.round_deadline_s}")
        require(self.over_selection >= 0, f"over_selection: must be >= 0 (0: off), got {self.over_selection}")
        require(0 <= self.target_accuracy <= 1, f"target_accuracy: must be in [0, 1] (0: 95% of the best), "
                                                f"got {self.target_accuracy}")
        if self.trace and self.trace != "off":
            require(Path(self.trace).is_file(), f"trace: no such file {self.trace!r} (or \"off\", or \"\" to generate one)")
        choice("device", self.device, DEVICES)
        require(self.client_cpus > 0, f"client_cpus: must be > 0, got {self.client_cpus}")
        require(self.client_gpus >= 0, f"client_gpus: must be >= 0 (0: none), got {self.client_gpus}")
        require(self.device != "cuda" or self.client_gpus > 0,
                "device: cuda needs client_gpus > 0 (each virtual client's share of a GPU, e.g. 0.25)")
        require(self.ray_address in ("", "auto") or RAY_ADDRESS.fullmatch(self.ray_address) is not None,
                f"ray_address: expected a Ray head's HOST:PORT (e.g. 10.0.0.5:6379), 'auto', or '' to start a "
                f"private Ray; got {self.ray_address!r}")
        require(not (self.resume and self.overwrite), "resume, overwrite: choose one (resume continues a run, "
                                                      "overwrite replaces it)")
        if self.aggregator != "fedavg":
            require(self.same_shape_uploads, f"aggregator {self.aggregator}: needs uploads of one shape; not available "
                                             "for taskedge with taskedge_mask=local or lora_mode=exact (use fedavg)")
        if self.fleet:
            require(Path(self.fleet).is_file(), f"fleet: no such file {self.fleet!r}")
            from fedpeft.devices import load_fleet

            specs = load_fleet(self.fleet)
            require(self.clients_per_round <= len(specs),
                    f"clients_per_round: {self.clients_per_round} is more than the fleet's {len(specs)} clients")
            for spec in specs:  # a fleet file may name each device's method
                if spec.method is not None:
                    choice(f"fleet client {spec.client_id} method", spec.method, (*METHODS, AUTO))
                    require(spec.method not in (AUTO, *WEIGHT_SPACE_METHODS) or spec.method == self.method
                            or self.mixes_methods, f"fleet client {spec.client_id} method {spec.method}: mixing "
                            "methods needs mixed_aggregation=weight_space, fedbn=false, aggregator=fedavg, "
                            "lora_mode fedit or exact, and a run method with a weight-space form")
        self.client_ids("fail_clients")
        self.client_ids("corrupt_clients")
        self.client_ids("poison_clients")
        from fedpeft.methods import make_method

        for m in self.auto_order() if self.method == AUTO else [self.method]:
            make_method(m, **self.method_hparams(m))  # validates rank, density, nm

    def auto_order(self) -> list[str]:
        """method_order as a list (method=auto's walk)."""
        return [m.strip() for m in self.method_order.split(",") if m.strip()]

    @property
    def mixes_methods(self) -> bool:
        """Updates of other methods than the run's can be aggregated (weight space): the run's
        method has a weight-space form, BatchNorm is shared, and LoRA uploads both factors."""
        return (self.mixed_aggregation == "weight_space" and not self.fedbn and self.lora_mode in ("fedit", "exact")
                and self.aggregator == "fedavg" and self.method in (*WEIGHT_SPACE_METHODS, AUTO)
                and not self.shares_mask)  # a shared TaskEdge mask is the fleet's own: no weight-space form

    def method_hparams(self, method: str | None = None, rank: int | None = None) -> dict:
        from fedpeft.methods import method_fields

        hp = {"rank": rank or self.rank, "alpha": self.alpha, "density": self.density or None, "nm": self.nm or None,
              "depthwise": self.depthwise, "lr": self.lr or None,
              "freeze_a": self.lora_mode == "ffa"}
        known = method_fields(method or self.method)
        return {k: v for k, v in hp.items() if k in known and v is not None}

    def client_ids(self, field_name: str) -> set[int]:
        text = getattr(self, field_name).strip()
        try:
            return {int(x) for x in text.split(",") if x.strip()}
        except ValueError:
            raise UsageError(f"{field_name}: expected comma-separated client ids, got {text!r}") from None

    @property
    def shares_mask(self) -> bool:
        """One TaskEdge mask for the whole fleet, built by the server from calibration statistics."""
        return self.method == "taskedge_lora" or (self.method == "taskedge" and self.taskedge_mask == "shared")

    @property
    def same_shape_uploads(self) -> bool:
        """Every client's upload has the same keys and shapes (what coordinate-wise rules need)."""
        local_mask = self.method == "taskedge" and not self.shares_mask
        mixed_ranks = self.method in ("lora", "dora") and self.lora_mode == "exact"
        return not (local_mask or mixed_ranks or self.method == AUTO)

    @property
    def factored_galore(self) -> bool:
        """GaLore clients upload low-rank factors of their round update (fedpeft/methods/galore_upload.py)."""
        return self.galore_upload == "factored"

    @property
    def per_round(self) -> int:
        """Clients whose updates a round aggregates (at most)."""
        return min(self.clients_per_round or self.num_clients, self.num_clients)

    @property
    def sample_size(self) -> int:
        """Clients a round samples: per_round, plus the over-selection's extra ones."""
        return min(math.ceil(self.per_round * (1 + self.over_selection) - 1e-9), self.num_clients)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_mapping(cls, mapping) -> "RunConfig":
        """Build from a flat mapping (Flower run config, JSON, CLI), naming any bad field."""
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for raw_key, value in dict(mapping).items():
            key = raw_key.replace("-", "_")
            if key not in types:
                raise UsageError(f"config: unknown field {raw_key!r}; allowed: {', '.join(sorted(types))}")
            values[key] = _coerce(key, value, getattr(cls, key) if hasattr(cls, key) else None)
        return cls(**values)


def _coerce(key: str, value, default):
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                require(value.lower() in ("true", "false", "1", "0"), f"{key}: expected true or false, got {value!r}")
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int:
            require(float(value) == int(float(value)), f"{key}: expected an integer, got {value!r}")
            return int(float(value))
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}: expected a {kind.__name__}, got {value!r}") from None
