"""The run configuration: one flat mapping of scalars, so it travels unchanged as Flower's run
config (`flwr run . --run-config "k=v ..."`, pyproject's [tool.flwr.app.config]) and as a
Python object in the in-process simulation. Keys may use '-' or '_'."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedpeft.errors import UsageError, choice, require

LORA_MODES = ("fedit", "ffa", "exact")
TASKEDGE_MASKS = ("local", "shared")
BUDGET_POLICIES = ("adapt", "strict")
CODECS = ("none", "fp16", "int8")


@dataclass
class RunConfig:
    # model and method
    model: str = "mobilenet_v2"
    input_size: int = 32
    method: str = "lora"
    rank: int = 4
    alpha: float = 4.0
    density: float = 0.01  # TaskEdge; denser than the paper's 0.1% so a short demo moves
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
    budget_policy: str = "adapt"
    max_flops_per_round: float = 0.0  # per client; 0: no FLOP budget
    upload_codec: str = "none"
    fleet: str = ""  # fleet TOML; "": a mixed default fleet of num_clients devices
    # data
    dataset: str = "digits"
    data_dir: str = ""
    task: str = "shift"
    corruption: str = "impulse_noise"
    severity: int = 5
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    pretrain_epochs: int = 8
    # fault injection, for testing what a fleet survives: client ids, comma-separated
    fail_clients: str = ""  # these crash after training (Flower's error reply; the server logs them as failed)
    corrupt_clients: str = ""  # these upload a malformed payload (the server rejects it)
    # bookkeeping
    seed: int = 0
    out: str = "runs/latest"
    cache_dir: str = ""

    def __post_init__(self) -> None:
        from fedpeft.data.corruptions import CORRUPTIONS
        from fedpeft.data.partition import SCHEMES
        from fedpeft.methods import METHODS, make_method
        from fedpeft.models import MODELS

        choice("model", self.model, MODELS)
        choice("method", self.method, METHODS)
        choice("lora_mode", self.lora_mode, LORA_MODES)
        choice("taskedge_mask", self.taskedge_mask, TASKEDGE_MASKS)
        choice("budget_policy", self.budget_policy, BUDGET_POLICIES)
        choice("upload_codec", self.upload_codec, CODECS)
        choice("dataset", self.dataset, ("digits", "cifar10"))
        choice("task", self.task, ("shift", "unseen"))
        choice("corruption", self.corruption, CORRUPTIONS)
        choice("partition", self.partition, SCHEMES)
        for name in ("input_size", "rounds", "num_clients", "local_epochs", "batch_size", "pretrain_epochs"):
            require(getattr(self, name) > 0, f"{name}: must be > 0, got {getattr(self, name)}")
        require(1 <= self.severity <= 5, f"severity: must be 1-5, got {self.severity}")
        require(self.clients_per_round >= 0, f"clients_per_round: must be >= 0, got {self.clients_per_round}")
        require(self.max_flops_per_round >= 0, f"max_flops_per_round: must be >= 0, got {self.max_flops_per_round}")
        require(self.dirichlet_alpha > 0, f"dirichlet_alpha: must be > 0, got {self.dirichlet_alpha}")
        require(self.lr >= 0, f"lr: must be >= 0, got {self.lr}")
        if self.fleet:
            require(Path(self.fleet).is_file(), f"fleet: no such file {self.fleet!r}")
        make_method(self.method, **self.method_hparams())  # validates rank, density, nm
        self.client_ids("fail_clients")
        self.client_ids("corrupt_clients")

    def method_hparams(self, method: str | None = None, rank: int | None = None) -> dict:
        from fedpeft.methods import method_fields

        hp = {"rank": rank or self.rank, "alpha": self.alpha, "density": self.density, "nm": self.nm or None,
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
    def per_round(self) -> int:
        return min(self.clients_per_round or self.num_clients, self.num_clients)

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
