"""Availability traces and run-time budgets (REDS) on the virtual clock.

A client is reachable only inside its windows, half-open intervals [start_s, end_s) of simulated
seconds. A window may also say how much training RAM and what fraction of its FLOP/s the device
lends while it is open. A trace comes from a file (`load_trace`) or from a seeded generator
(`generate_trace`); both answer `available_at` and `budget_at`.

Trace file, CSV (a header row, then one window a row) or JSON (a list of objects, or
{"windows": [...]}), with these columns / keys:

    client            client id; or
    device            a device name: the row applies to every client of that device
    start_s, end_s    the window, seconds on the clock; start_s >= 0, end_s > start_s ("inf": open)
    ram_train_bytes   optional: training RAM while the window is open (default: the device's)
    compute_fraction  optional, in (0, 1]: share of the device's FLOP/s it lends (default 1)

A client's own rows replace its device's rows; a client with no rows at all is always available
with its catalog budget. A client's windows may touch but not overlap. Errors name the file, the
row (CSV: its line, the header being line 1; JSON: its 0-based index) and the field.

The generator, per client and seeded by (seed, client id), keeps each device's `availability` as
the long-run fraction of time it is reachable:
- phones (kind "phone", battery powered) are reachable once a day, while idle and charging: one
  window a day starting at the client's own hour (uniform in PHONE_START_HOURS, local time; the
  clock's t = 0 is CLOCK_START_HOUR), +- up to PHONE_START_JITTER_S from day to day, lasting
  availability x 24 h +- PHONE_LENGTH_SPREAD (capped so days never overlap: at most
  1 - 2 x jitter / 24 h of the time, 92%);
- every other kind (boards and microcontrollers are mains powered in the catalog) is always on
  but for outages: alternating exponential up and down times, down ones of mean
  `outage_mean_s`, up ones of mean outage_mean_s x a / (1 - a).
Its budget process: the clock is cut into BUDGET_PERIOD_S slots; in each, a client's training RAM
is ram_train_bytes x U[ram_min_fraction, 1] and its compute fraction U[compute_min_fraction, 1].
These parameters (`Dynamics`) default by device kind (DEFAULT_DYNAMICS); `generate_trace(...,
dynamics={device name: Dynamics(...)})` sets them per device.
"""
from __future__ import annotations

import bisect
import csv
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.devices import ClientSpec, Device
from fedpeft.errors import UsageError, choice, require

PATTERNS = ("daily", "always_on")
TRACE_FIELDS = ("client", "device", "start_s", "end_s", "ram_train_bytes", "compute_fraction")
DAY_S = 86_400.0
CLOCK_START_HOUR = 22.0  # a run starts in the evening, when phones begin to charge
PHONE_START_HOURS = (21.0, 24.0)
PHONE_START_JITTER_S = 3_600.0
PHONE_LENGTH_SPREAD = 0.25
BUDGET_PERIOD_S = 600.0


@dataclass(frozen=True)
class Window:
    start_s: float
    end_s: float
    ram_train_bytes: int | None = None  # None: the device's catalog value (or the budget process)
    compute_fraction: float | None = None
    row: str = field(default="", compare=False)  # where it came from, for error messages


@dataclass(frozen=True)
class Dynamics:
    """How a device moves on the clock; proposed catalog fields in brackets."""

    pattern: str  # "daily" (battery: charging windows) | "always_on" (mains: outages) [power_source]
    outage_mean_s: float = 1_800.0  # always_on: mean outage (reboot, network loss) [outage_mean_s]
    ram_min_fraction: float = 1.0  # [ram_train_min_fraction]
    compute_min_fraction: float = 1.0  # [compute_min_fraction]
    jitter_sigma: float = 0.1  # clock.jitter_factor's sigma [time_jitter_sigma]

    def __post_init__(self) -> None:
        choice("dynamics.pattern", self.pattern, PATTERNS)
        require(self.outage_mean_s > 0, f"dynamics.outage_mean_s: must be > 0 seconds, got {self.outage_mean_s}")
        for name in ("ram_min_fraction", "compute_min_fraction"):
            require(0 < getattr(self, name) <= 1, f"dynamics.{name}: must be in (0, 1], got {getattr(self, name)}")
        require(self.jitter_sigma >= 0, f"dynamics.jitter_sigma: must be >= 0, got {self.jitter_sigma}")


#: Defaults by catalog kind: boards are dedicated to the job; a phone shares RAM and CPU with its
#: owner's apps, and its radio and thermals vary more.
DEFAULT_DYNAMICS = {
    "phone": Dynamics("daily", ram_min_fraction=0.5, compute_min_fraction=0.5, jitter_sigma=0.3),
    "sbc": Dynamics("always_on"), "gpu_board": Dynamics("always_on"), "mcu": Dynamics("always_on"),
    "other": Dynamics("always_on"),
}


def dynamics_for(device: Device, by_device: Mapping[str, Dynamics] | None = None) -> Dynamics:
    """The device's dynamics: `by_device[device.name]` where given, else its kind's default."""
    if by_device and device.name in by_device:
        return by_device[device.name]
    return DEFAULT_DYNAMICS.get(device.kind, DEFAULT_DYNAMICS["other"])


class Trace:
    """Windows per client; subclasses say where they come from (`_windows`)."""

    def __init__(self, fleet: Sequence[ClientSpec]):
        require(len(fleet) > 0, "trace: the fleet has no clients")
        self.devices = {spec.client_id: spec.device for spec in fleet}

    def _windows(self, client_id: int, until_s: float) -> list[Window]:
        """The client's windows in time order, at least up to the first one starting after `until_s`."""
        raise NotImplementedError

    def _default_budget(self, client_id: int, t: float) -> tuple[int, float]:
        return self.devices[client_id].ram_train_bytes, 1.0

    def _check(self, client_id: int, t: float) -> None:
        require(client_id in self.devices,
                f"client_id: unknown client {client_id!r}; allowed: 0-{len(self.devices) - 1}")
        require(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0, f"t: must be a time >= 0 s, got {t!r}")

    def window_at(self, client_id: int, t: float) -> Window | None:
        self._check(client_id, t)
        windows = self._windows(client_id, t)
        i = bisect.bisect_right([w.start_s for w in windows], t) - 1
        return windows[i] if i >= 0 and t < windows[i].end_s else None

    def windows_between(self, client_id: int, t0: float, t1: float) -> list[Window]:
        """The client's windows that overlap [t0, t1)."""
        self._check(client_id, t0)
        return [w for w in self._windows(client_id, t1) if w.start_s < t1 and w.end_s > t0]


class FileTrace(Trace):
    def __init__(self, fleet: Sequence[ClientSpec], windows: dict[int, list[Window]]):
        super().__init__(fleet)
        self.windows = windows  # clients missing here are always available

    def _windows(self, client_id: int, until_s: float) -> list[Window]:
        return self.windows.get(client_id, [_ALWAYS])


class GeneratedTrace(Trace):
    """Generated lazily, window by window, as far as the clock asks: no horizon to run out of."""

    def __init__(self, fleet: Sequence[ClientSpec], seed: int, dynamics: Mapping[str, Dynamics] | None = None):
        super().__init__(fleet)
        self.seed = seed
        self.dynamics = {cid: dynamics_for(device, dynamics) for cid, device in self.devices.items()}
        self._made: dict[int, list[Window]] = {}
        self._streams: dict[int, Iterator[Window]] = {}

    def _windows(self, client_id: int, until_s: float) -> list[Window]:
        made = self._made.setdefault(client_id, [])
        stream = self._streams.setdefault(
            client_id, _stream(self.devices[client_id].availability, self.dynamics[client_id], self.seed, client_id))
        while not made or made[-1].start_s <= until_s:
            nxt = next(stream, None)
            if nxt is None:
                break
            made.append(nxt)
        return made

    def _default_budget(self, client_id: int, t: float) -> tuple[int, float]:
        device, dyn = self.devices[client_id], self.dynamics[client_id]
        rng = random.Random(f"budget:{self.seed}:{client_id}:{math.floor(t / BUDGET_PERIOD_S)}")
        ram_share, compute = rng.uniform(dyn.ram_min_fraction, 1.0), rng.uniform(dyn.compute_min_fraction, 1.0)
        return int(device.ram_train_bytes * ram_share), compute


_ALWAYS = Window(0.0, math.inf, row="(no rows: always available)")


def available_at(trace: Trace, client_id: int, t: float) -> Window | None:
    """The window in which `client_id` is reachable at clock time `t`, or None."""
    return trace.window_at(client_id, t)


def budget_at(trace: Trace, client_id: int, t: float) -> tuple[int, float]:
    """(training RAM in bytes, compute fraction) of `client_id` at time `t`: the open window's
    values where it gives them, else the catalog's (file) or the budget process (generated)."""
    window = trace.window_at(client_id, t)
    ram, fraction = trace._default_budget(client_id, t)
    if window is not None:
        ram = window.ram_train_bytes if window.ram_train_bytes is not None else ram
        fraction = window.compute_fraction if window.compute_fraction is not None else fraction
    return ram, fraction


def next_opening(trace: Trace, client_ids: Sequence[int], t: float) -> float | None:
    """The earliest time >= t at which one of `client_ids` is reachable (None: never again); for a
    server whose sample is all unreachable, so the clock can skip ahead instead of standing still."""
    times = []
    for cid in client_ids:
        trace._check(cid, t)
        later = [w for w in trace._windows(cid, t) if w.end_s > t]
        if later:
            times.append(max(later[0].start_s, t))
    return min(times, default=None)


# -- generator -------------------------------------------------------------------------------------

def generate_trace(fleet: Sequence[ClientSpec], seed: int = 0,
                   dynamics: Mapping[str, Dynamics] | None = None) -> GeneratedTrace:
    """A trace for `fleet` (rules in the module docstring), deterministic for (fleet, seed);
    `dynamics` overrides DEFAULT_DYNAMICS for the devices it names."""
    return GeneratedTrace(fleet, seed, dynamics)


def _stream(a: float, dyn: Dynamics, seed: int, client_id: int) -> Iterator[Window]:
    """The windows of a device with availability `a`, in time order."""
    if a >= 1.0:
        yield _ALWAYS
        return
    if a <= 0.0:
        return
    rng = random.Random(f"trace:{seed}:{client_id}")  # a string seed: SHA-512, the same on every machine
    yield from (_daily(a, rng) if dyn.pattern == "daily" else _always_on(a, dyn.outage_mean_s, rng))


def _daily(a: float, rng: random.Random) -> Iterator[Window]:
    cap = 1.0 - 2 * PHONE_START_JITTER_S / DAY_S  # a window ends before the next day's earliest start
    spread = max(0.0, min(PHONE_LENGTH_SPREAD, cap / a - 1.0))  # keeps the mean length a x 24 h
    offset = (rng.uniform(*PHONE_START_HOURS) - CLOCK_START_HOUR) * 3600.0
    day = -1  # yesterday's window may still be open at t = 0
    while True:
        start = day * DAY_S + offset + rng.uniform(-PHONE_START_JITTER_S, PHONE_START_JITTER_S)
        length = min(a * DAY_S * rng.uniform(1 - spread, 1 + spread), cap * DAY_S)
        if start + length > 0:
            yield Window(max(start, 0.0), start + length, row=f"generated day {day}")
        day += 1


def _always_on(a: float, outage_mean_s: float, rng: random.Random) -> Iterator[Window]:
    up_mean_s = outage_mean_s * a / (1.0 - a)
    t, up = 0.0, rng.random() < a  # exponential times are memoryless: this start is the steady state
    while True:
        length = rng.expovariate(1.0 / (up_mean_s if up else outage_mean_s))
        if up:
            yield Window(t, t + length, row="generated")
        t, up = t + length, not up


# -- trace files -----------------------------------------------------------------------------------

def load_trace(path: str | Path, fleet: Sequence[ClientSpec]) -> FileTrace:
    """Read and validate a CSV or JSON trace file for `fleet`. Raises UsageError naming the file,
    the row and the field."""
    path = Path(path)
    require(path.is_file(), f"trace: no such file {str(path)!r}")
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    elif path.suffix.lower() == ".json":
        rows = _json_rows(path)
    else:
        raise UsageError(f"trace: {path}: unknown format {path.suffix!r}; allowed: .csv, .json")
    require(rows, f"trace: {path}: no windows")
    return trace_from_rows(rows, fleet)


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            for i, name in enumerate(header):
                require(name in TRACE_FIELDS,
                        f"{path} line 1: {name}: unknown column; allowed: {', '.join(TRACE_FIELDS)}")
                require(name not in header[:i], f"{path} line 1: {name}: column given twice")
            reader.fieldnames = header
            rows = []
            for row in reader:
                where = f"{path} line {reader.line_num}"
                require(None not in row, f"{where}: more cells than the header has columns ({len(header)})")
                rows.append((where, {k: v.strip() for k, v in row.items() if v is not None and v.strip() != ""}))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UsageError(f"trace: {path} is not a readable CSV file ({exc})") from None
    return rows


def _json_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"trace: {path} is not valid JSON ({exc})") from None
    if isinstance(data, dict) and set(data) == {"windows"}:
        data = data["windows"]
    require(isinstance(data, list), f"trace: {path}: must be a list of windows or {{\"windows\": [...]}}")
    rows = []
    for i, row in enumerate(data):
        require(isinstance(row, dict), f"{path} [{i}]: must be an object with keys {', '.join(TRACE_FIELDS)}")
        for key in row:
            require(key in TRACE_FIELDS, f"{path} [{i}]: {key}: unknown key; allowed: {', '.join(TRACE_FIELDS)}")
        rows.append((f"{path} [{i}]", {k: v for k, v in row.items() if v is not None}))
    return rows


def trace_from_rows(rows: Sequence[tuple[str, dict]], fleet: Sequence[ClientSpec]) -> FileTrace:
    """A FileTrace from (where, row) pairs, `where` naming the row in errors."""
    by_client: dict[int, list[Window]] = {}
    by_device: dict[str, list[Window]] = {}
    devices = {spec.device.name: spec.device for spec in fleet}
    ids = {spec.client_id: spec.device for spec in fleet}
    for where, row in rows:
        has_client, has_device = "client" in row, "device" in row
        require(not (has_client and has_device), f"{where}: client, device: give one of them, not both")
        require(has_client or has_device, f"{where}: client: missing; name a client (id) or a device (catalog name)")
        if has_client:
            cid = _integer(where, "client", row["client"])
            require(cid in ids, f"{where}: client: unknown client {cid}; allowed: 0-{len(ids) - 1}")
            device = ids[cid]
        else:
            name = row["device"]
            require(isinstance(name, str) and name in devices,
                    f"{where}: device: no client of the fleet is a {name!r}; allowed: {', '.join(sorted(devices))}")
            device = devices[name]
        window = _window(where, row, device)
        (by_client.setdefault(cid, []) if has_client else by_device.setdefault(name, [])).append(window)
    windows = {}
    for spec in fleet:  # a client's own rows replace its device's
        own = by_client.get(spec.client_id, by_device.get(spec.device.name))
        if own is not None:
            windows[spec.client_id] = _no_overlap(spec.client_id, own)
    return FileTrace(fleet, windows)


def _window(where: str, row: dict, device: Device) -> Window:
    for key in ("start_s", "end_s"):
        require(key in row, f"{where}: {key}: missing; a window needs start_s and end_s (seconds on the clock)")
    start = _number(where, "start_s", row["start_s"])
    end = _number(where, "end_s", row["end_s"], allow_inf=True)
    require(start >= 0, f"{where}: start_s: must be >= 0 seconds, got {start:g}")
    require(end > start, f"{where}: end_s: must be > start_s ({start:g}), got {end:g}")
    ram = fraction = None
    if "ram_train_bytes" in row:
        ram = _integer(where, "ram_train_bytes", row["ram_train_bytes"])
        require(ram > 0, f"{where}: ram_train_bytes: must be > 0 bytes, got {ram}")
        total = device.ram_total_bytes
        require(total is None or ram <= total,
                f"{where}: ram_train_bytes: must be <= the {device.name}'s ram_total_bytes ({total}), got {ram}")
    if "compute_fraction" in row:
        fraction = _number(where, "compute_fraction", row["compute_fraction"])
        require(0 < fraction <= 1, f"{where}: compute_fraction: must be in (0, 1], got {fraction:g}")
    return Window(start, end, ram, fraction, row=where)


def _no_overlap(client_id: int, windows: list[Window]) -> list[Window]:
    windows = sorted(windows, key=lambda w: w.start_s)
    for before, after in zip(windows, windows[1:]):
        require(after.start_s >= before.end_s,
                f"{after.row}: start_s: client {client_id}'s window overlaps the one at {before.row} "
                f"(ends {before.end_s:g}); windows may touch, not overlap")
    return windows


def _number(where: str, key: str, raw, allow_inf: bool = False) -> float:
    value = raw
    if isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            value = None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (math.isfinite(value) or (allow_inf and value > 0))
    require(ok, f"{where}: {key}: must be a {'number or inf' if allow_inf else 'finite number'}, got {raw!r}")
    return float(value)


def _integer(where: str, key: str, value) -> int:
    if isinstance(value, str):
        try:
            value = int(value)  # "12", " 12", "-3"; not "12.0" or "1e9"
        except ValueError:
            pass
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    require(isinstance(value, int) and not isinstance(value, bool),
            f"{where}: {key}: must be an integer, got {value!r}")
    return value

