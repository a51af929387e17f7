import fedpeft  # noqa: F401  (torchvision shim first)

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.devices import (
    Device, default_fleet, device_time_s, energy_j, load_catalog, load_fleet,
)
from fedpeft.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"raspberry_pi_4_2gb", "raspberry_pi_4_4gb", "raspberry_pi_4_8gb", "raspberry_pi_5", "jetson_nano",
            "jetson_orin_nano", "phone_high", "phone_low", "esp32_s3"}


def test_catalog_loads_and_is_sane():
    cat = load_catalog()
    assert REQUIRED <= set(cat)
    for name, d in cat.items():
        assert isinstance(d, Device) and d.name == name and d.description
        assert d.ram_train_bytes > 0 and d.flops_per_s > 0 and d.uplink_bps > 0 and d.downlink_bps > 0
        assert 0 <= d.availability <= 1 and d.power_w > 0
        assert d.ram_total_bytes is None or d.ram_train_bytes <= d.ram_total_bytes
    assert cat["raspberry_pi_4_2gb"].ram_train_bytes < cat["raspberry_pi_4_4gb"].ram_train_bytes < \
        cat["raspberry_pi_4_8gb"].ram_train_bytes
    # variants inherit the rest of the Pi 4 entry
    assert cat["raspberry_pi_4_2gb"].flops_per_s == cat["raspberry_pi_4_4gb"].flops_per_s
    # the microcontroller fits only tiny setups: a few MB at most
    assert cat["esp32_s3"].ram_train_bytes <= 8 * 2**20
    assert min(cat.values(), key=lambda d: d.ram_train_bytes).name == "esp32_s3"
    with pytest.raises(Exception):
        cat["jetson_nano"].ram_train_bytes = 1  # frozen


def test_every_catalog_number_has_a_comment():
    """Each numeric field line in devices.toml sits under or beside a comment giving its source."""
    lines = (ROOT / "fedpeft" / "devices.toml").read_text().splitlines()
    numeric = ("ram_train_bytes", "flops_per_s", "uplink_bps", "downlink_bps", "power_w", "availability")
    for i, line in enumerate(lines):
        if line.split("=")[0].strip() in numeric:
            nearby = lines[max(0, i - 6): i + 1]
            assert "#" in line or any(x.lstrip().startswith("#") for x in nearby), line


@pytest.mark.parametrize("field,value,msg", [
    ("ram_train_bytes", -1, r"bad\.ram_train_bytes: must be > 0"),
    ("ram_train_bytes", 0, r"bad\.ram_train_bytes"),
    ("flops_per_s", 0, r"bad\.flops_per_s"),
    ("uplink_bps", -5.0, r"bad\.uplink_bps"),
    ("downlink_bps", 0, r"bad\.downlink_bps"),
    ("availability", 1.5, r"bad\.availability: must be in \[0, 1\]"),
    ("availability", -0.1, r"bad\.availability"),
    ("colour", "red", r"bad\.colour: unknown field"),
])
def test_catalog_validation_names_the_field(tmp_path, field, value, msg):
    entry = {"description": "x", "ram_train_bytes": 10, "flops_per_s": 1.0, "uplink_bps": 1.0,
             "downlink_bps": 1.0, "power_w": 1.0, "availability": 0.5, field: value}
    text = "[bad]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in entry.items()) + "\n"
    path = tmp_path / "cat.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=msg):
        load_catalog(path)


def test_catalog_missing_field(tmp_path):
    path = tmp_path / "cat.toml"
    path.write_text('[bad]\nram_train_bytes = 10\n')
    with pytest.raises(UsageError, match="bad: missing field"):
        load_catalog(path)


def test_fleet_groups_clients_overrides_and_custom_devices(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text("""
[devices.tiny_pi]
extends = "raspberry_pi_4_2gb"
ram_train_bytes = 500_000_000

[[group]]
device = "raspberry_pi_4_4gb"
count = 3

[[group]]
device = "tiny_pi"
count = 1
availability = 0.5

[[client]]
device = "phone_low"
ram_train_bytes = 123_456
""")
    fleet = load_fleet(path)
    assert [c.client_id for c in fleet] == [0, 1, 2, 3, 4]
    assert [c.device.name for c in fleet] == ["raspberry_pi_4_4gb"] * 3 + ["tiny_pi", "phone_low"]
    assert fleet[3].device.ram_train_bytes == 500_000_000 and fleet[3].device.availability == 0.5
    assert fleet[3].device.flops_per_s == load_catalog()["raspberry_pi_4_2gb"].flops_per_s
    assert fleet[3].overrides == {"availability": 0.5}
    assert fleet[4].device.ram_train_bytes == 123_456 and fleet[0].overrides == {}


@pytest.mark.parametrize("fleet,msg", [
    ({"group": [{"device": "raspberry_pi_9", "count": 1}]}, r"group\[0\]\.device: unknown value 'raspberry_pi_9'; allowed: .*jetson_nano"),
    ({"client": [{"device": "jetson_nano"}, {"device": "nope"}]}, r"client\[1\]\.device: unknown value 'nope'"),
    ({"client": [{"device": "jetson_nano"}] * 3 + [{"device": "phone_low", "ram_train_bytes": -1}]}, r"client\[3\]\.ram_train_bytes: must be > 0"),
    ({"group": [{"device": "jetson_nano", "count": 1}, {"device": "phone_low", "count": 0}]}, r"group\[1\]\.count: must be an integer > 0"),
    ({"group": [{"device": "jetson_nano", "count": -2}]}, r"group\[0\]\.count"),
    ({"group": [{"device": "jetson_nano"}]}, r"group\[0\]\.count: missing"),
    ({"group": [{"device": "jetson_nano", "count": 1, "speed": 3}]}, r"group\[0\]\.speed: unknown field"),
    ({"client": [{"device": "jetson_nano", "availability": 2}]}, r"client\[0\]\.availability"),
    ({"clients": []}, r"fleet\.clients: unknown field"),
    ({"devices": {"x": {"extends": "jetson_nano", "flops_per_s": -1}}, "client": [{"device": "x"}]}, r"devices\.x\.flops_per_s"),
    ({"devices": {"x": {"extends": "nothing"}}, "client": [{"device": "x"}]}, r"devices\.x\.extends: unknown value"),
    ({}, r"no clients"),
])
def test_fleet_errors_name_the_field(fleet, msg):
    with pytest.raises(UsageError, match=msg):
        load_fleet(fleet)


def test_fleet_file_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_fleet(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[group]\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_fleet(bad)


def test_default_fleet_is_mixed_and_deterministic():
    a, b = default_fleet(8, seed=1), default_fleet(8, seed=1)
    assert [c.device.name for c in a] == [c.device.name for c in b]
    assert len({c.device.name for c in a}) == 8
    assert [c.client_id for c in a] == list(range(8))
    assert [c.device.name for c in default_fleet(8, seed=2)] != [c.device.name for c in a]
    assert "esp32_s3" in {c.device.name for c in default_fleet(9, seed=0, include_mcu=True)}
    with pytest.raises(UsageError, match="num_clients"):
        default_fleet(0)


def test_device_time_and_energy():
    d = Device(name="t", ram_train_bytes=1, flops_per_s=1e9, uplink_bps=8e6, downlink_bps=16e6,
               power_w=5.0, availability=1.0)
    # 2e9 FLOPs -> 2 s; 1e6 bytes up = 8e6 bits -> 1 s; 1e6 bytes down = 8e6 bits at 16e6 -> 0.5 s
    assert device_time_s(d, 2e9, 1_000_000, 1_000_000) == pytest.approx(3.5)
    assert energy_j(d, 2.0, 1.5) == pytest.approx(17.5)
    with pytest.raises(UsageError, match="bytes_up"):
        device_time_s(d, 1, -1, 0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fedpeft", "devices", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_devices_subprocess_json_and_bad_flag():
    js = _cli("--format", "json")
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert REQUIRED <= set(data) and data["jetson_nano"]["ram_train_bytes"] == 2_000_000_000
    bad = _cli("--format", "xml")
    assert bad.returncode == 2 and "--format" in bad.stderr


def test_cli_devices_table_and_fleet_in_process(tmp_path, capsys):
    from fedpeft.cli import main

    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "raspberry_pi_4_4gb" in out and "esp32_s3" in out and "GFLOP/s" in out
    fleet = tmp_path / "f.toml"
    fleet.write_text('[[group]]\ndevice = "phone_low"\ncount = 2\n')
    assert main(["devices", "--fleet", str(fleet), "--format", "json"]) == 0
    assert [c["device"]["name"] for c in json.loads(capsys.readouterr().out)] == ["phone_low"] * 2
    fleet.write_text('[[group]]\ndevice = "nope"\ncount = 1\n')
    assert main(["devices", "--fleet", str(fleet)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group[0].device: unknown value 'nope'" in err
