"""Weight-space aggregation across methods (strategies/weight_space.py, strategies/mixed.py): hand-made
fft + LoRA + BN+H deltas on mobilenet_v2_035, then a real simulation where budgets force fallbacks."""
import json

import pytest
import torch

from fedpeft.methods import make_method
from fedpeft.models import build_model
from strategies.weight_space import average, from_dense, lora_scaling, to_dense

LAYER = "features.1.conv.1.weight"  # a pointwise conv: LoRA adapts it, BN+H does not
DEPTHWISE = "features.1.conv.0.0.weight"  # only fft changes it
BN = "features.0.1.weight"
STAT = "features.0.1.running_mean"
HEAD = "classifier.1.weight"
RANK, ALPHA = 2, 4.0


def fresh():
    torch.manual_seed(0)
    return build_model("mobilenet_v2_035", num_classes=10)


@pytest.fixture(scope="module")
def fleet():
    pre = fresh().state_dict()
    templates = {"fft": make_method("fft").attach(fresh()).delta(),
                 "lora": make_method("lora", rank=RANK, alpha=ALPHA).attach(fresh()).delta(),
                 "bn_head": make_method("bn_head").attach(fresh()).delta()}
    g = torch.Generator().manual_seed(1)

    def nudged(delta, scale):
        return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in delta.items()}

    uploads = {"fft": nudged(templates["fft"], 0.01), "bn_head": nudged(templates["bn_head"], 0.01),
               "lora": {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in templates["lora"].items()}}
    weights = {"fft": 3.0, "lora": 1.0, "bn_head": 2.0}
    denses = {m: to_dense(m, uploads[m], pre, ALPHA) for m in uploads}
    avg = average([denses[m] for m in uploads], [weights[m] for m in uploads])
    return pre, templates, uploads, weights, avg


def lora_product(upload, layer):
    a = upload[f"base_model.model.{layer.removesuffix('.weight')}.lora_A.weight"]
    b = upload[f"base_model.model.{layer.removesuffix('.weight')}.lora_B.weight"]
    return lora_scaling(RANK, ALPHA) * (b.reshape(b.shape[0], -1).double() @ a.reshape(RANK, -1).double())


def test_each_tensor_is_the_mean_over_the_clients_that_changed_it(fleet):
    pre, _, up, w, avg = fleet
    change = {m: {k: up[m][k] - pre[k] for k in (LAYER, DEPTHWISE, BN, STAT, HEAD) if k in up[m]} for m in ("fft", "bn_head")}
    lora_layer = lora_product(up["lora"], LAYER).reshape(pre[LAYER].shape).float()
    lora_head = up["lora"]["base_model.model.classifier.1.weight"] - pre[HEAD]
    expected = {
        LAYER: (w["fft"] * change["fft"][LAYER] + w["lora"] * lora_layer) / (w["fft"] + w["lora"]),
        DEPTHWISE: change["fft"][DEPTHWISE],
        BN: (w["fft"] * change["fft"][BN] + w["bn_head"] * change["bn_head"][BN]) / (w["fft"] + w["bn_head"]),
        STAT: (w["fft"] * change["fft"][STAT] + w["bn_head"] * change["bn_head"][STAT]) / (w["fft"] + w["bn_head"]),
        HEAD: (w["fft"] * change["fft"][HEAD] + w["lora"] * lora_head + w["bn_head"] * change["bn_head"][HEAD]) / 6.0,
    }
    for key, value in expected.items():
        torch.testing.assert_close(avg[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert not any(k.endswith("num_batches_tracked") for k in avg)  # counters carry no change


def test_each_client_gets_its_own_form_back(fleet):
    pre, templates, _, _, avg = fleet
    lora = from_dense("lora", avg, pre, templates["lora"], ALPHA)
    assert lora.keys() == templates["lora"].keys()
    got = lora_product(lora, LAYER)
    u, s, vh = torch.linalg.svd(avg[LAYER].double().reshape(avg[LAYER].shape[0], -1), full_matrices=False)
    best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]  # Eckart-Young: the best rank-r approximation
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lora["base_model.model.classifier.1.weight"], pre[HEAD] + avg[HEAD])

    bn = from_dense("bn_head", avg, pre, templates["bn_head"])
    assert bn.keys() == templates["bn_head"].keys() and DEPTHWISE not in bn and LAYER not in bn
    torch.testing.assert_close(bn[BN], pre[BN] + avg[BN])
    torch.testing.assert_close(bn[STAT], pre[STAT] + avg[STAT])

    fft = from_dense("fft", avg, pre, templates["fft"])
    assert fft.keys() == templates["fft"].keys()
    torch.testing.assert_close(fft[DEPTHWISE], pre[DEPTHWISE] + avg[DEPTHWISE])
    nbt = next(k for k in fft if k.endswith("num_batches_tracked"))
    assert torch.equal(fft[nbt], pre[nbt])

    galore = from_dense("galore", avg, pre, make_method("galore", rank=RANK).attach(fresh()).delta())
    torch.testing.assert_close(galore[LAYER], avg[LAYER])


def test_a_layer_nobody_changed_keeps_loras_own_initialisation(fleet):
    pre, templates, *_ = fleet
    untouched = from_dense("lora", {}, pre, templates["lora"], ALPHA)
    assert all(torch.equal(untouched[k], templates["lora"][k]) for k in templates["lora"])


def test_weight_space_refuses_what_it_cannot_express(fleet):
    from fedpeft.errors import UsageError

    pre, *_ = fleet
    with pytest.raises(UsageError, match="weight-space"):
        to_dense("taskedge_lora", {}, pre)
    with pytest.raises(UsageError, match="no tensor"):
        to_dense("fft", {"features.0.0.weight": torch.zeros(3)}, pre)


# -- a real simulation: budgets force fallbacks ---------------------------------------------------
# Two Raspberry Pis with the full budget run LoRA (rank 4); two with 3.56 MB of training RAM fit no
# LoRA setting (batch 2 needs 3.71 MB) but BN+H at batch 2 (3.42 MB): under `adapt` they fall back.
FALLBACK_FLEET = ('[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 2\navailability = 1.0\n\n'
                  '[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 2\navailability = 1.0\nram_train_bytes = 3560000\n')


def fallback_run(tmp_path, mode: str):
    from fedpeft.fleet.config import RunConfig
    from fedpeft.fleet.simulation import run_fleet
    from fedpeft.report import read_jsonl

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FALLBACK_FLEET)
    cfg = RunConfig(model="mobilenet_v2_035", num_clients=4, rounds=2, pretrain_epochs=1, fleet=str(fleet),
                    out=str(tmp_path / mode), cache_dir=str(tmp_path.parent / "fleet-cache"), trace="off",
                    mixed_aggregation=mode)
    summary = run_fleet(cfg)
    return summary, read_jsonl(tmp_path / mode / "clients.jsonl")


@pytest.mark.slow
def test_fallback_updates_are_aggregated_in_weight_space(tmp_path):
    _, lines = fallback_run(tmp_path, "weight_space")
    by = {(c["round"], c["client_id"]): c for c in lines}
    for n in (1, 2):
        assert [by[(n, i)]["method"] for i in range(4)] == ["lora", "lora", "bn_head", "bn_head"]
        assert all(by[(n, i)]["status"] == "ok" and by[(n, i)]["aggregated"] for i in range(4)), n
        assert all(by[(n, i)]["start"] == "global" for i in range(4))  # each got its own form
    # round 2's forms differ in size: LoRA's pairs + head, BN+H's BatchNorm + head
    assert by[(2, 0)]["bytes_down"] != by[(2, 2)]["bytes_down"]
    state = torch.load(tmp_path / "weight_space" / "global_adapter.pt", weights_only=True)
    assert STAT in state  # BN statistics: only the BN+H clients change them, so they were aggregated
    assert HEAD in state and LAYER in state  # the head (all four) and the LoRA layers (LoRA clients)


@pytest.mark.slow
def test_same_method_only_keeps_dropping_fallbacks(tmp_path):
    summary, lines = fallback_run(tmp_path, "same_method_only")
    bn = [c for c in lines if c["round"] >= 1 and c["method"] == "bn_head"]
    assert bn and all(c["status"] == "ok" and not c["aggregated"] for c in bn)
    assert all(c["aggregated"] for c in lines if c["round"] >= 1 and c["method"] == "lora")
    assert json.loads((tmp_path / "same_method_only" / "config.json").read_text())["mixed_aggregation"] == "same_method_only"
    assert summary["final_accuracy"] is not None


# -- method = auto --------------------------------------------------------------------------------
# mobilenet_v2_035 at 32x32, batch 32 needs (MB): fft 27.6, lora 25.4, galore 24.95, bn_head 24.55.
AUTO_FLEET = ('[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 1\navailability = 1.0\nram_train_bytes = 28000000\n\n'
              '[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 1\navailability = 1.0\nram_train_bytes = 25100000\n\n'
              '[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 2\navailability = 1.0\nram_train_bytes = 24700000\n')


@pytest.mark.slow
def test_auto_gives_each_device_the_most_expressive_method_that_fits_and_aggregates_them_all(tmp_path):
    from fedpeft.fleet.config import RunConfig
    from fedpeft.fleet.simulation import run_fleet
    from fedpeft.report import read_jsonl

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(AUTO_FLEET)
    cfg = RunConfig(model="mobilenet_v2_035", num_clients=4, rounds=2, pretrain_epochs=1, fleet=str(fleet), method="auto",
                    out=str(tmp_path / "auto"), cache_dir=str(tmp_path.parent / "fleet-cache"), trace="off")
    summary = run_fleet(cfg)
    lines = [c for c in read_jsonl(tmp_path / "auto" / "clients.jsonl") if c["round"] >= 1]
    for n in (1, 2):
        this = {c["client_id"]: c for c in lines if c["round"] == n}
        assert [this[i]["method"] for i in range(4)] == ["fft", "galore", "bn_head", "bn_head"], n
        for c in this.values():
            assert c["status"] == "ok" and c["aggregated"] and c["start"] == "global", c
            assert c["peak_memory_bytes"] <= c["ram_budget_bytes"]
        assert this[1]["galore_dense_weights"] == 0  # GaLore's factored upload, expanded in weight space
    assert summary["final_accuracy"] is not None and summary["method"] == "auto"


def test_auto_on_resnet18_spreads_methods_over_budgets(tmp_path):
    """resnet18 at 32x32, batch 32 (MiB): fft 189, galore 111, lora 59, bn_head 57."""
    from fedpeft.devices import load_catalog, with_overrides
    from fedpeft.fleet.budget import choose_setting
    from fedpeft.fleet.config import RunConfig

    cfg = RunConfig(model="resnet18", method="auto", cache_dir=str(tmp_path.parent / "fleet-cache"))
    pi = load_catalog()["raspberry_pi_4_4gb"]
    chosen = {mib: choose_setting(cfg, with_overrides(pi, ram_train_bytes=mib * 2**20), 10) for mib in (400, 150, 80)}
    assert [s.method for s in chosen.values()] == ["fft", "galore", "lora"]
    assert all(s.batch_size == 32 and s.cost.peak_bytes <= mib * 2**20 for mib, s in chosen.items())


def test_unknown_nodes_and_methods_without_a_weight_space_form_get_no_form(tmp_path):
    """A node the roll call did not identify, or a client that will pick TaskEdge-LoRA, is sent nothing
    (it starts fresh); the others get their own form, and the run turns mixed."""
    from test_fleet import small_config, strategy_for

    cfg = small_config(tmp_path)
    strategy = strategy_for(cfg, tmp_path)
    strategy.known_nodes = {100: {"client_id": 0}, 101: {"client_id": 1}}
    strategy.predict = lambda cid, conditions: ("bn_head", 0) if cid == 0 else ("taskedge_lora", 4)
    payloads = strategy.payloads({100: {}, 101: {}, 102: {}}, None)
    assert strategy.mixed is not None
    assert payloads[100][1] == {"form-method": "bn_head", "form-rank": 0} and len(payloads[100][0]) > 0
    assert payloads[101][1] == {} and len(payloads[101][0]) == 0
    assert len(payloads[102][0]) == 0 and payloads[102][1] == {}


def test_a_reply_claiming_a_form_no_client_can_have_is_refused_before_anything_is_built(tmp_path):
    from fedpeft.errors import UsageError
    from strategies.mixed import MixedFleet
    from test_fleet import small_config

    fleet = MixedFleet(small_config(tmp_path))
    with pytest.raises(UsageError, match="rank 1000000000"):
        fleet.decode(None, {"method": "lora", "rank": 10**9})
    assert ("lora", 10**9) not in fleet._templates and ("bn_head", 0) in fleet.allowed


@pytest.mark.slow
def test_auto_with_a_deadline_spreads_methods_over_the_default_fleet(tmp_path):
    """The demo's 10 devices, mobilenet_v2 at 32x32: with a deadline that the fastest devices meet
    with fft and the slowest with nothing dearer than BN+H, `auto` gives different methods on
    different devices, each within its memory budget and predicted on time, and the server's
    prediction is each client's choice (every client starts from the form it was sent)."""
    from fedpeft.fleet import setup
    from fedpeft.fleet.budget import RoundTiming, choose_setting, predicted_round_s, round_timing, step_cost
    from fedpeft.fleet.config import RunConfig
    from fedpeft.fleet.simulation import run_fleet
    from fedpeft.report import read_jsonl

    values = dict(method="auto", num_clients=10, rounds=1, pretrain_epochs=1, trace="off", clock_jitter=False,
                  out=str(tmp_path / "auto"), cache_dir=str(tmp_path.parent / "fleet-cache"))
    probe = RunConfig(**values)
    classes, batch = setup.task_for(probe).num_classes, probe.batch_size
    examples = {s.client_id: len(setup.client_data(probe, s.client_id).labels) for s in setup.fleet_for(probe)}

    def seconds(method, spec):
        cost = step_cost(probe, method, probe.rank if method in ("lora", "galore") else None, batch, classes)
        return predicted_round_s(probe, spec.device, method, batch, cost, RoundTiming(0.0, examples[spec.client_id]))

    fleet = setup.fleet_for(probe)
    cheapest = max(seconds("bn_head", s) for s in fleet)  # every device meets the deadline with BN+H ...
    fft = [seconds("fft", s) for s in fleet]
    deadline = 1.05 * cheapest
    assert min(fft) <= deadline < max(fft), (fft, deadline)  # ... some with fft, some not
    cfg = RunConfig(**values, round_deadline_s=round(deadline, 3))
    run_fleet(cfg)
    lines = [c for c in read_jsonl(tmp_path / "auto" / "clients.jsonl") if c["round"] == 1]
    assert len(lines) == 10
    assert len({c["method"] for c in lines}) >= 2 and "fft" in {c["method"] for c in lines}
    devices = {s.client_id: s.device for s in fleet}
    for c in lines:
        assert c["peak_memory_bytes"] <= c["ram_budget_bytes"], c
        assert c["predicted_s"] <= cfg.round_deadline_s, c
        assert c["start"] == "global", c  # the server predicted this client's choice
        own = choose_setting(cfg, devices[c["client_id"]], classes, timing=round_timing(cfg, examples[c["client_id"]]))
        assert (c["method"], c["batch_size"]) == (own.method, own.batch_size)


@pytest.mark.slow
def test_a_lora_clients_round_2_download_carries_the_head_averaged_with_the_bn_head_clients(tmp_path):
    """Server and clients in one process (the real AdapterFedAvg, form predictor and client_round,
    without Flower's transport): round 1 on FALLBACK_FLEET (two LoRA clients, two that fall back to
    BN+H), then the payload the server builds for LoRA client 0's round 2, decoded in LoRA's own
    form: its head equals pre-trained + the example-weighted mean of all four clients' head changes."""
    from clients.local_update import Conditions, client_round
    from fedpeft.fleet import setup
    from fedpeft.fleet.config import RunConfig
    from fedpeft.payload import decode, encode
    from strategies.server_app import form_predictor
    from strategies.virtual_clock import FleetClock
    from test_fleet import strategy_for
    from test_hostile_replies import as_message

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FALLBACK_FLEET)
    cfg = RunConfig(model="mobilenet_v2_035", num_clients=4, rounds=2, pretrain_epochs=1, fleet=str(fleet),
                    out=str(tmp_path / "run"), cache_dir=str(tmp_path.parent / "fleet-cache"), trace="off")
    strategy = strategy_for(cfg, tmp_path)
    strategy.known_nodes = {100 + i: {"client_id": i} for i in range(4)}
    strategy.predict = form_predictor(cfg, FleetClock(cfg, setup.fleet_for(cfg)))
    nodes = {100 + i: {} for i in range(4)}
    payloads = strategy.payloads(nodes, encode(strategy.global_delta)[0])
    assert strategy.mixed is not None and [payloads[n][1]["form-method"] for n in nodes] == ["lora"] * 2 + ["bn_head"] * 2
    replies = [client_round(cfg, {"partition-id": i}, payloads[100 + i][0], 1, Conditions.from_config(payloads[100 + i][1]))
               for i in range(4)]
    assert [r.info["method"] for r in replies] == ["lora", "lora", "bn_head", "bn_head"]
    strategy.aggregate_train(1, [as_message(r, 100 + i) for i, r in enumerate(replies)])

    pre = strategy.mixed.pretrained
    heads = [decode(r.arrays)["base_model.model.classifier.1.weight" if i < 2 else HEAD] for i, r in enumerate(replies)]
    weights = [float(r.metrics["examples"]) for r in replies]
    everyone = pre[HEAD] + sum(w * (h - pre[HEAD]) for w, h in zip(weights, heads)) / sum(weights)
    lora_only = pre[HEAD] + sum(w * (h - pre[HEAD]) for w, h in zip(weights[:2], heads[:2])) / sum(weights[:2])

    strategy.mixed.begin_round()
    download = decode(strategy.payloads({100: {}}, None)[100][0])  # LoRA client 0's round-2 payload
    got = download["base_model.model.classifier.1.weight"]
    torch.testing.assert_close(got, everyone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, lora_only, atol=1e-5)  # the BN+H clients' head updates are in it
