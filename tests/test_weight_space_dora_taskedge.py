"""DoRA and TaskEdge in weight space (strategies/weight_space.py): hand-made uploads on
mobilenet_v2_035, checked against peft's own merge (DoRA) and a real TaskEdge adapter (the way back)."""
import pytest
import torch

from fedpeft.errors import UsageError
from fedpeft.methods import make_method
from fedpeft.models import build_model
from strategies.weight_space import COVERAGE, average, from_dense, lora_scaling, merge, to_dense

LAYER = "features.1.conv.1.weight"  # a pointwise conv: DoRA adapts it, TaskEdge masks it
PEFT_LAYER = "base_model.model.features.1.conv.1"
HEAD = "classifier.1.weight"
RANK, ALPHA = 2, 4.0


def fresh():
    torch.manual_seed(0)
    return build_model("mobilenet_v2_035", num_classes=10)


@pytest.fixture(scope="module")
def pre():
    return fresh().state_dict()


def dora_upload(scale_magnitude: float, seed: int = 1):
    """A DoRA upload: random A, B; magnitudes the pre-trained channel norms x (1 + noise)."""
    adapter = make_method("dora", rank=RANK, alpha=ALPHA).attach(fresh())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in adapter.delta().items():
        if "lora_A" in key or "lora_B" in key:
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
        elif key.endswith("lora_magnitude_vector"):
            out[key] = value * (1 + scale_magnitude * torch.randn(value.shape, generator=g))
        else:
            out[key] = value + 0.01 * torch.randn(value.shape, generator=g)
    return adapter, out


def channel_norms(w):
    return w.reshape(w.shape[0], -1).norm(dim=1)


def test_dora_dense_change_is_what_peft_merges(pre):
    """to_dense's change of a DoRA layer equals the weight peft itself merges, minus W0; by hand too."""
    adapter, upload = dora_upload(0.05)
    dense = to_dense("dora", upload, pre, ALPHA)
    a, b = upload[f"{PEFT_LAYER}.lora_A.weight"].double(), upload[f"{PEFT_LAYER}.lora_B.weight"].double()
    w0 = pre[LAYER].double()
    v = w0 + lora_scaling(RANK, ALPHA) * (b.reshape(b.shape[0], RANK) @ a.reshape(RANK, -1)).reshape(w0.shape)
    m = upload[f"{PEFT_LAYER}.lora_magnitude_vector"].double().reshape(-1)
    by_hand = v * (m / channel_norms(v)).reshape(-1, 1, 1, 1) - w0
    torch.testing.assert_close(dense[LAYER].double(), by_hand, rtol=1e-5, atol=1e-7)
    adapter.load_delta(upload)
    merged = adapter.model.merge_and_unload().state_dict()
    torch.testing.assert_close(dense[LAYER], merged[LAYER] - pre[LAYER], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dense[HEAD], upload["base_model.model.classifier.1.weight"] - pre[HEAD])
    assert not any("magnitude" in k or "lora_" in k for k in dense)  # the magnitude is folded into the layer


def test_dora_form_back_is_exact_for_a_low_rank_change_and_keeps_channel_norms_otherwise(pre):
    adapter, upload = dora_upload(0.0)  # magnitudes = pre-trained norms: the change is not low rank
    template = make_method("dora", rank=RANK, alpha=ALPHA).attach(fresh()).delta()
    low = {LAYER: torch.zeros_like(pre[LAYER])}
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(pre[LAYER].shape[0], RANK, generator=g), torch.randn(RANK, pre[LAYER][0].numel(), generator=g)
    low[LAYER] = 0.05 * (u @ v).reshape(pre[LAYER].shape)  # a rank-2 change: DoRA at rank 2 holds it exactly
    back = to_dense("dora", from_dense("dora", low, pre, template, ALPHA), pre, ALPHA)
    torch.testing.assert_close(back[LAYER], low[LAYER], rtol=1e-4, atol=1e-6)

    full = to_dense("dora", upload, pre, ALPHA)  # a change of full rank: a projection
    back = to_dense("dora", from_dense("dora", full, pre, template, ALPHA), pre, ALPHA)
    w0, d = pre[LAYER].double(), full[LAYER].double()
    uu, s, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
    approx = w0 + ((uu[:, :RANK] * s[:RANK]) @ vh[:RANK]).reshape(w0.shape)
    expected = approx * (channel_norms(w0 + d) / channel_norms(approx)).reshape(-1, 1, 1, 1) - w0
    torch.testing.assert_close(back[LAYER].double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(channel_norms(w0 + back[LAYER].double()), channel_norms(w0 + d), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(back[LAYER], full[LAYER], atol=1e-6)  # ... and not the change itself


# -- TaskEdge ----------------------------------------------------------------------------------------
def taskedge_upload(pre, calibration_seed: int | None, seed: int):
    """A local-mask TaskEdge upload: the mask a real adapter picks (from random calibration images, or
    |W| alone), random values at it, a nudged head."""
    images = None if calibration_seed is None else torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(calibration_seed))
    delta = make_method("taskedge", density=0.2).attach(fresh(), images).delta()  # dense enough to overlap
    g = torch.Generator().manual_seed(seed)
    return {k: (0.01 * torch.randn(v.shape, generator=g) + (v if not k.endswith(".values") else 0))
            if v.is_floating_point() else v for k, v in delta.items()}


def test_taskedge_entries_average_over_the_clients_that_trained_them(pre):
    one, two = taskedge_upload(pre, None, 1), taskedge_upload(pre, 5, 2)
    i1, i2 = (u[f"{LAYER}.indices"].long() for u in (one, two))
    both = set(i1.tolist()) & set(i2.tolist())
    assert both and set(i1.tolist()) != set(i2.tolist())  # the masks overlap, and differ
    fft = {LAYER: pre[LAYER] + 0.01 * torch.randn(pre[LAYER].shape, generator=torch.Generator().manual_seed(9))}
    d1, d2, d3 = to_dense("taskedge", one, pre), to_dense("taskedge", two, pre), to_dense("fft", fft, pre)
    assert d1[f"{LAYER}{COVERAGE}"].sum() == i1.numel()
    w = [1.0, 2.0, 4.0]
    avg = average([d1, d2, d3], w)
    v1 = dict(zip(i1.tolist(), one[f"{LAYER}.values"].tolist()))
    v2 = dict(zip(i2.tolist(), two[f"{LAYER}.values"].tolist()))
    f = (fft[LAYER] - pre[LAYER]).reshape(-1)
    flat = avg[LAYER].reshape(-1)
    for j in list(both)[:20] + list(set(v1) - both)[:20] + list(set(v2) - both)[:20]:
        num = 4.0 * f[j] + 1.0 * v1.get(j, 0.0) + 2.0 * v2.get(j, 0.0)
        den = 4.0 + (1.0 if j in v1 else 0.0) + (2.0 if j in v2 else 0.0)
        assert float(flat[j]) == pytest.approx(float(num / den), rel=1e-5, abs=1e-8), j
    untouched = next(j for j in range(f.numel()) if j not in v1 and j not in v2)
    assert float(flat[untouched]) == pytest.approx(float(f[untouched]), rel=1e-6)  # the fft client alone
    torch.testing.assert_close(avg[HEAD], ((one[HEAD] - pre[HEAD]) + 2 * (two[HEAD] - pre[HEAD])) / 3)

    # without a dense client, an entry nobody trained keeps the state's previous value
    previous = {LAYER: torch.full_like(pre[LAYER], 0.5)}
    state = merge(previous, average([d1, d2], [1.0, 2.0]))
    assert not any(k.endswith(COVERAGE) for k in state)
    assert float(state[LAYER].reshape(-1)[untouched]) == 0.5
    j = next(iter(both))
    assert float(state[LAYER].reshape(-1)[j]) == pytest.approx((v1[j] + 2 * v2[j]) / 3, rel=1e-5)


def test_taskedge_form_back_lands_the_fleet_state_in_a_real_adapter(pre):
    """The form back holds the state's change at every non-zero entry of each masked layer; a
    TaskEdge client that folds it in (start_from) has exactly pre-trained + state on its masked
    layers and head, whatever mask it then trains; BN changes it cannot hold are not sent."""
    g = torch.Generator().manual_seed(4)
    state = {LAYER: 0.01 * torch.randn(pre[LAYER].shape, generator=g), HEAD: 0.01 * torch.randn(pre[HEAD].shape, generator=g),
             "features.0.1.weight": torch.ones_like(pre["features.0.1.weight"])}
    state[LAYER].reshape(-1)[::3] = 0.0  # a sparse support: only non-zero entries travel
    template = make_method("taskedge", density=0.01).attach(fresh()).delta()
    form = from_dense("taskedge", state, pre, template)
    idx = form[f"{LAYER}.indices"].long()
    assert idx.numel() == int((state[LAYER] != 0).sum()) and form[f"{LAYER}.indices"].dtype == template[f"{LAYER}.indices"].dtype
    assert form["features.0.0.weight.indices"].numel() == 0  # a layer the state did not change: nothing
    assert "features.0.1.weight" not in form
    client = make_method("taskedge", density=0.01).attach(fresh(), torch.rand(8, 3, 32, 32))
    client.start_from(form)
    layer = client.layers[LAYER.removesuffix(".weight")]
    torch.testing.assert_close(layer.weight(), pre[LAYER] + state[LAYER])
    torch.testing.assert_close(client.model.get_submodule("classifier.1").weight, pre[HEAD] + state[HEAD])
    own = client.delta()  # what it would upload untrained: the state at its own entries
    mine = own[f"{LAYER}.indices"].long()
    torch.testing.assert_close(own[f"{LAYER}.values"], state[LAYER].reshape(-1)[mine])


def test_taskedge_uploads_with_bad_masks_are_refused(pre):
    good = taskedge_upload(pre, None, 1)
    dup = dict(good)
    dup[f"{LAYER}.indices"] = good[f"{LAYER}.indices"].clone()
    dup[f"{LAYER}.indices"][1] = dup[f"{LAYER}.indices"][0]
    with pytest.raises(UsageError, match="duplicate"):
        to_dense("taskedge", dup, pre)
    far = dict(good)
    far[f"{LAYER}.indices"] = good[f"{LAYER}.indices"].clone()
    far[f"{LAYER}.indices"][0] = pre[LAYER].numel()
    with pytest.raises(UsageError, match="outside"):
        to_dense("taskedge", far, pre)
    shared = {k: v for k, v in good.items() if not k.endswith(".indices")}
    with pytest.raises(UsageError, match="shared-mask"):
        to_dense("taskedge", shared, pre)


def test_taskedge_clients_report_their_realised_density_and_the_summary_records_it(tmp_path):
    """A TaskEdge client's reply carries its mask's realised density beside the requested one, and
    summary.json records their means (simulate prints them)."""
    import json

    from flwr.app import ArrayRecord

    from clients.local_update import client_round
    from fedpeft.fleet import setup
    from fedpeft.report import summarize
    from test_fleet import small_config

    cfg = small_config(tmp_path, method="taskedge")
    reply = client_round(cfg, {"partition-id": 0}, ArrayRecord(), 1)
    own = setup.attach(cfg, "taskedge", None, calibration=setup.client_data(cfg, 0).images[: setup.CALIBRATION_EXAMPLES])
    assert reply.metrics["density_requested"] == 0.001
    assert reply.metrics["density_realised"] == pytest.approx(own.realised_density)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "clients.jsonl").write_text("".join(json.dumps({"round": 1, "client_id": i, "status": "ok", "density_requested": 0.001,
                                                          "density_realised": d}) + "\n" for i, d in enumerate((0.002, 0.004))))
    assert summarize(run)["taskedge_density"] == pytest.approx({"requested": 0.001, "realised": 0.003})
