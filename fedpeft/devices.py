"""Device catalog, fleet files, and the simulated cost of one client update.

The catalog (`fedpeft/devices.toml`, package data) describes edge devices by what a training
client needs: RAM left for training tensors, sustained fp32 training FLOP/s, link throughput,
power and availability. Each number carries its source or reasoning in a TOML comment.

A fleet file says which devices take part, either group by group or client by client:

    [devices.my_board]                 # optional custom device, inline
    extends = "raspberry_pi_4_4gb"     # optional: inherit the fields of another device
    ram_train_bytes = 1_000_000_000

    [[group]]                          # `count` clients of one device
    device = "raspberry_pi_4_4gb"
    count = 3
    availability = 0.8                 # optional per-client overrides of any device field
    method = "lora"                    # optional: the method these clients request ("auto": the
    rank = 8                           #   first of method_order that fits), and its rank

    [[client]]                         # one client
    device = "my_board"

Clients get ids 0, 1, ... : all `[[group]]` entries in file order first, then all
`[[client]]` entries in file order. Error messages name the field with 0-based indices
(`group[1].count` is the second `[[group]]`).

Simulated cost (no real device is involved):

    device_time_s = compute_s + bytes_up * 8 / uplink_bps + bytes_down * 8 / downlink_bps
    compute_s     = sum over the step's ops of max(flops / flops_per_s, bytes / memory_bytes_per_s)

the roofline: an op is bound by the ALUs or by the memory, whichever is slower (ops grouped by
arithmetic intensity in the profile's `traffic`, fedpeft/profiling/traffic.py). Without the step's
traffic, or for a device without `memory_bytes_per_s`, compute_s = flops / flops_per_s.
Catalog devices get no kernel-efficiency factors (fedpeft/profiling/kernel_efficiency.py): those
are measured on the machine that runs the microbenchmarks, and no catalog device's kernels have
been, so their compute_s stays the roofline: a lower bound where kernels run below their roofs.
Link bandwidths are in bits per second, payloads in bytes, hence the factor 8; memory bandwidth
is in bytes per second. Energy is one power
level for the whole update: `energy_j = power_w * (compute_s + comm_s)`. fedpeft does not model
a separate radio power; for boards where the radio draws less than a training CPU this
overstates the communication energy (a bound, not an estimate).
"""
from __future__ import annotations

import math
import random

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from fedpeft.errors import UsageError, choice, require

#: Fields a device table may hold (besides `extends`), with whether each is required.
_REQUIRED = ("ram_train_bytes", "flops_per_s", "uplink_bps", "downlink_bps", "power_w", "availability")
_OPTIONAL = ("description", "kind", "ram_total_bytes", "memory_bytes_per_s")
DEVICE_FIELDS = _REQUIRED + _OPTIONAL
#: Fields a fleet entry may override per client.
OVERRIDABLE = ("ram_train_bytes", "flops_per_s", "uplink_bps", "downlink_bps", "power_w", "availability",
               "ram_total_bytes", "memory_bytes_per_s")
KINDS = ("sbc", "gpu_board", "phone", "mcu", "other")


@dataclass(frozen=True)
class Device:
    """One edge device. Bandwidths in bits/s, RAM in bytes, power in W."""

    name: str
    ram_train_bytes: int
    flops_per_s: float
    uplink_bps: float
    downlink_bps: float
    power_w: float
    availability: float
    description: str = ""
    kind: str = "other"
    ram_total_bytes: int | None = None
    memory_bytes_per_s: float | None = None  # sustained memory bandwidth, BYTES/s (None: FLOPs-only time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None, where: str | None = None) -> "Device":
        """Build and validate a device from a mapping (e.g. `Device.to_dict()` sent in a node config)."""
        data = {k: v for k, v in data.items() if v is not None}  # an unset optional field is absent, not None
        name = name if name is not None else data.pop("name", None)
        data.pop("name", None)
        require(isinstance(name, str) and name != "", f"{where or 'device'}.name: must be a non-empty string")
        return _validated_device(name, data, where or name)


@dataclass(frozen=True)
class ClientSpec:
    """One simulated client: its id (0..n-1), its device with overrides applied, and the overrides."""

    client_id: int
    device: Device
    overrides: dict[str, Any] = field(default_factory=dict)
    method: str | None = None  # the fine-tuning method this client requests (None: the run's); "auto"
    rank: int | None = None  # its rank (None: the run's)

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "device": self.device.to_dict(), "overrides": dict(self.overrides),
                "method": self.method, "rank": self.rank}


# -- validation ------------------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_field(where: str, key: str, value) -> Any:
    """Validate one device field; return the normalized value. `where` prefixes the error."""
    f = f"{where}.{key}"
    if key in ("ram_train_bytes", "ram_total_bytes"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        require(isinstance(value, int) and not isinstance(value, bool),
                f"{f}: must be an integer number of bytes, got {value!r}")
        require(value > 0, f"{f}: must be > 0 bytes, got {value}")
        return value
    if key in ("flops_per_s", "uplink_bps", "downlink_bps", "power_w", "memory_bytes_per_s"):
        require(_is_number(value), f"{f}: must be a number, got {value!r}")
        require(math.isfinite(value) and value > 0, f"{f}: must be a finite number > 0, got {value}")
        return float(value)
    if key == "availability":
        require(_is_number(value), f"{f}: must be a number in [0, 1], got {value!r}")
        require(0.0 <= value <= 1.0, f"{f}: must be in [0, 1], got {value}")
        return float(value)
    if key == "description":
        require(isinstance(value, str), f"{f}: must be a string, got {value!r}")
        return value
    if key == "kind":
        choice(f, value, KINDS)
        return value
    raise UsageError(f"{f}: unknown field; allowed: {', '.join(DEVICE_FIELDS)}")


def _validated_device(name: str, data: Mapping[str, Any], where: str) -> Device:
    values: dict[str, Any] = {}
    for key, value in data.items():
        values[key] = _check_field(where, key, value)
    missing = [k for k in _REQUIRED if k not in values]
    require(not missing, f"{where}: missing field(s) {', '.join(missing)}; required: {', '.join(_REQUIRED)}")
    total = values.get("ram_total_bytes")
    if total is not None:
        require(values["ram_train_bytes"] <= total,
                f"{where}.ram_train_bytes: must be <= ram_total_bytes ({total}), got {values['ram_train_bytes']}")
    return Device(name=name, **values)


def _resolve_tables(tables: Mapping[str, Any], base: Mapping[str, Device], prefix: str) -> dict[str, Device]:
    """Turn `{name: {field: value, extends?: other}}` into Devices; `extends` may name an entry of
    `tables` (resolved recursively, cycles rejected) or of `base`."""
    resolved: dict[str, Device] = {}

    def resolve(name: str, stack: tuple[str, ...]) -> Device:
        if name in resolved:
            return resolved[name]
        where = f"{prefix}{name}"
        table = tables[name]
        require(isinstance(table, Mapping), f"{where}: must be a table of device fields")
        table = dict(table)
        parent_name = table.pop("extends", None)
        merged: dict[str, Any] = {}
        if parent_name is not None:
            require(isinstance(parent_name, str), f"{where}.extends: must be a device name")
            require(parent_name not in stack, f"{where}.extends: cycle through {' -> '.join(stack + (parent_name,))}")
            if parent_name in tables:
                parent = resolve(parent_name, stack + (parent_name,))
            else:
                choice(f"{where}.extends", parent_name, sorted(set(base) | set(tables)))
                parent = base[parent_name]
            merged = {k: v for k, v in parent.to_dict().items() if k != "name" and v is not None}
        for key in table:
            if key not in DEVICE_FIELDS:
                raise UsageError(f"{where}.{key}: unknown field; allowed: extends, {', '.join(DEVICE_FIELDS)}")
        merged.update(table)
        resolved[name] = _validated_device(name, merged, where)
        return resolved[name]

    for name in tables:
        resolve(name, (name,))
    return resolved


# -- catalog ---------------------------------------------------------------------------------------

def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    require(path.is_file(), f"{what}: no such file {str(path)!r}")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what}: {path} is not valid TOML ({exc})") from None


def load_catalog(path: str | Path | None = None) -> dict[str, Device]:
    """Load the device catalog (the packaged `devices.toml` by default), validated.

    Raises UsageError naming `<device>.<field>` for a bad or unknown field."""
    if path is None:
        text = resources.files("fedpeft").joinpath("devices.toml").read_text(encoding="utf-8")
        data = tomllib.loads(text)
    else:
        data = _read_toml(path, "catalog")
    require(len(data) > 0, "catalog: no devices defined")
    return _resolve_tables(data, {}, "")


# -- fleets ----------------------------------------------------------------------------------------

_ENTRY_KEYS = ("device", "count")


def _apply_overrides(device: Device, entry: Mapping[str, Any], where: str) -> tuple[Device, dict[str, Any]]:
    overrides: dict[str, Any] = {}
    for key, value in entry.items():
        if key in ("device", "count"):
            continue
        if key not in OVERRIDABLE:
            allowed = ("device", "count") if where.startswith("group") else ("device",)
            raise UsageError(f"{where}.{key}: unknown field; allowed: {', '.join(allowed + OVERRIDABLE)}")
        overrides[key] = _check_field(where, key, value)
    if not overrides:
        return device, {}
    merged = {k: v for k, v in device.to_dict().items() if k != "name"}
    merged.update(overrides)
    return _validated_device(device.name, merged, where), overrides


def load_fleet(source: str | Path | Mapping[str, Any], catalog: Mapping[str, Device] | None = None) -> list[ClientSpec]:
    """Load a fleet file (path) or an already-parsed mapping into client specs (ids from 0)."""
    data = _read_toml(source, "fleet") if isinstance(source, (str, Path)) else dict(source)
    for key in data:
        if key not in ("devices", "group", "client"):
            raise UsageError(f"fleet.{key}: unknown field; allowed: devices, group, client")
    catalog = dict(load_catalog() if catalog is None else catalog)
    custom = data.get("devices", {})
    require(isinstance(custom, Mapping), "devices: must be a table of [devices.NAME] tables")
    for name in custom:
        require(name not in catalog, f"devices.{name}: already a catalog device; pick another name "
                                     f"(use `extends = \"{name}\"` to start from it)")
    catalog.update(_resolve_tables(custom, catalog, "devices."))

    specs: list[ClientSpec] = []
    for section in ("group", "client"):
        entries = data.get(section, [])
        require(isinstance(entries, list) and all(isinstance(e, Mapping) for e in entries),
                f"{section}: must be an array of tables ([[{section}]] entries)")
        for i, entry in enumerate(entries):
            where = f"{section}[{i}]"
            require("device" in entry, f"{where}.device: missing; allowed: {', '.join(sorted(catalog))}")
            name = entry["device"]
            require(isinstance(name, str), f"{where}.device: must be a device name, got {name!r}")
            choice(f"{where}.device", name, sorted(catalog))
            if section == "group":
                count = entry.get("count")
                require("count" in entry, f"{where}.count: missing; must be an integer > 0")
                require(isinstance(count, int) and not isinstance(count, bool) and count > 0,
                        f"{where}.count: must be an integer > 0, got {count!r}")
            else:
                require("count" not in entry, f"{where}.count: not allowed in [[client]]; use [[group]] for counts")
                count = 1
            method, rank = entry.get("method"), entry.get("rank")
            require(method is None or isinstance(method, str), f"{where}.method: must be a method name or \"auto\", got {method!r}")
            require(rank is None or (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0),
                    f"{where}.rank: must be an integer > 0, got {rank!r}")
            entry = {k: v for k, v in entry.items() if k not in ("method", "rank")}
            device, overrides = _apply_overrides(catalog[name], entry, where)
            for _ in range(count):
                specs.append(ClientSpec(client_id=len(specs), device=device, overrides=dict(overrides),
                                        method=method, rank=rank))
    require(len(specs) > 0, "fleet: no clients; add [[group]] or [[client]] entries")
    return specs


#: The mix `default_fleet` cycles through (the microcontroller is left out unless asked for).
DEFAULT_MIX = (
    "raspberry_pi_4_4gb", "jetson_nano", "phone_high", "raspberry_pi_5",
    "phone_low", "raspberry_pi_4_2gb", "jetson_orin_nano", "raspberry_pi_4_8gb",
)


def default_fleet(n: int, seed: int = 0, include_mcu: bool = False,
                  catalog: Mapping[str, Device] | None = None) -> list[ClientSpec]:
    """A mixed fleet of `n` clients for the demo: the first n entries of DEFAULT_MIX (cycled),
    plus `esp32_s3` when `include_mcu`, shuffled by `seed`. Deterministic for a given (n, seed)."""
    require(isinstance(n, int) and not isinstance(n, bool) and n > 0, f"num_clients: must be an integer > 0, got {n!r}")
    catalog = load_catalog() if catalog is None else catalog
    mix = DEFAULT_MIX + (("esp32_s3",) if include_mcu else ())
    names = [mix[i % len(mix)] for i in range(n)]
    random.Random(seed).shuffle(names)
    return [ClientSpec(client_id=i, device=catalog[name]) for i, name in enumerate(names)]


# -- simulated cost --------------------------------------------------------------------------------

def compute_time_s(device: Device, flops: float, traffic: Mapping[str, Any] | None = None) -> float:
    """Seconds of `flops` of training work on `device`.

    With the memory traffic of the same work (a profile's `traffic` for one step and `flops` of
    one step) and a device bandwidth, the roofline: per intensity bucket
    max(flops / flops_per_s, bytes / memory_bytes_per_s), summed
    (roofline_time_s). Without either: flops / flops_per_s."""
    if not traffic or not traffic.get("bucket_bytes") or device.memory_bytes_per_s is None:
        return float(flops) / device.flops_per_s
    return roofline_time_s(float(flops), traffic, device.flops_per_s, device.memory_bytes_per_s)


def roofline_time_s(total_flops: float, traffic: dict, flops_per_s: float, bytes_per_s: float) -> float:
    """Seconds of a step on a device with sustained `flops_per_s` and memory `bytes_per_s`.

    Per intensity bucket max(flops / F, bytes / B), summed; the step's FLOPs the op formulas do
    not count (total_flops minus the buckets' sum: element-wise and analytic work) join bucket 0.
    When every bucket is compute-bound this is exactly total_flops / F."""
    flops = [float(v) for v in traffic["bucket_flops"]]
    nbytes = [float(v) for v in traffic["bucket_bytes"]]
    flops[0] += max(0.0, float(total_flops) - sum(flops))
    return sum(max(f / flops_per_s, b / bytes_per_s) for f, b in zip(flops, nbytes))


def ridge_point(flops_per_s: float, bytes_per_s: float) -> float:
    """FLOPs per byte above which an op is compute-bound on this device."""
    return flops_per_s / bytes_per_s if bytes_per_s > 0 else math.inf


def comm_time_s(device: Device, bytes_up: float, bytes_down: float) -> float:
    """Transfer time: payload bytes x 8 bits over the link rates in bits/s."""
    return float(bytes_up) * 8.0 / device.uplink_bps + float(bytes_down) * 8.0 / device.downlink_bps


def device_time_s(device: Device, flops: float, bytes_up: float, bytes_down: float,
                  traffic: Mapping[str, Any] | None = None) -> float:
    """Simulated wall time of one update on `device`: compute_time_s (flops / flops_per_s, or the
    roofline with `traffic`) + bytes_up*8 / uplink_bps + bytes_down*8 / downlink_bps (bytes -> bits)."""
    for name, value in (("flops", flops), ("bytes_up", bytes_up), ("bytes_down", bytes_down)):
        require(_is_number(value) and value >= 0, f"{name}: must be a number >= 0, got {value!r}")
    return compute_time_s(device, flops, traffic) + comm_time_s(device, bytes_up, bytes_down)


def energy_j(device: Device, compute_s: float, comm_s: float) -> float:
    """Energy of one update: power_w x (compute_s + comm_s). One power level for both phases
    (no separate radio model; see the module docstring)."""
    for name, value in (("compute_s", compute_s), ("comm_s", comm_s)):
        require(_is_number(value) and value >= 0, f"{name}: must be a number >= 0, got {value!r}")
    return device.power_w * (float(compute_s) + float(comm_s))


def is_available(device: Device, rng: random.Random) -> bool:
    """Draw whether `device` is reachable this round (Bernoulli(availability))."""
    return rng.random() < device.availability


def with_overrides(device: Device, where: str = "device", **overrides) -> Device:
    """A copy of `device` with validated field overrides."""
    return _apply_overrides(device, overrides, where)[0] if overrides else replace(device)
