"""GaLore's low-rank uploads (fedpeft/methods/galore_upload.py) on real GaLoreAdamW training."""
import pytest
import torch

from fedpeft.errors import UsageError
from fedpeft.methods import make_method
from fedpeft.methods.galore_upload import LEFT, RIGHT, expand_upload, factored_upload
from fedpeft.models import build_model, with_batch_statistics
from fedpeft.payload import encode, record_bytes
from fedpeft.train import train


def galore_round(model_name: str, steps: int, *, rank: int = 4, update_proj_gap: int = 200, seed: int = 0):
    """One local GaLore round from a non-zero global state: (adapter, dense delta, the state it started from)."""
    torch.manual_seed(seed)
    model = with_batch_statistics(build_model(model_name, num_classes=10), torch.randn(64, 3, 32, 32))
    adapter = make_method("galore", rank=rank, update_proj_gap=update_proj_gap).attach(model)
    start = {k: 0.01 * torch.randn_like(v) for k, v in adapter.delta().items()}
    adapter.load_delta(start)
    images, labels = torch.randn(8 * steps, 3, 32, 32), torch.randint(0, 10, (8 * steps,))
    train(adapter, images, labels, batch_size=8, max_steps=steps, seed=seed)
    return adapter, adapter.delta(), start


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


@pytest.fixture(scope="module")
def mobilenet_round():
    return galore_round("mobilenet_v2", steps=3)


def test_factors_rebuild_the_dense_delta(mobilenet_round):
    adapter, delta, start = mobilenet_round
    upload, dense = factored_upload(delta, start, adapter.bases(), dict(adapter.model.named_parameters()))
    assert dense == 0 and set(adapter.projected()) and all(k + LEFT in upload for k in adapter.projected())
    rebuilt = expand_upload(upload, start, {k: tuple(v.shape) for k, v in delta.items()})
    assert rebuilt.keys() == delta.keys()
    for k in adapter.projected():
        assert relative_error(rebuilt[k], delta[k]) < 1e-5, k
        # the round's own update, to float32 storage noise (the weights' rounding lies outside the subspace)
        assert relative_error(rebuilt[k] - start[k], delta[k] - start[k]) < 1e-4, k


def test_factored_galore_upload_is_a_fraction_of_dense(mobilenet_round):
    adapter, delta, start = mobilenet_round
    upload, _ = factored_upload(delta, start, adapter.bases(), dict(adapter.model.named_parameters()))
    factored, dense = record_bytes(encode(upload)[0]), record_bytes(encode(delta)[0])
    assert factored < 0.1 * dense, (factored, dense)


def test_resnet18_galore_uploads_within_1_2x_of_lora_at_the_same_rank():
    adapter, delta, start = galore_round("resnet18", steps=2)
    upload, dense = factored_upload(delta, start, adapter.bases(), dict(adapter.model.named_parameters()))
    lora = make_method("lora", rank=4).attach(build_model("resnet18", num_classes=10)).delta()
    lora = {k: v + 0.01 for k, v in lora.items()}  # trained: no all-zero B (sent manifest-only)
    ratio = record_bytes(encode(upload)[0]) / record_bytes(encode(lora)[0])
    assert dense == 0 and ratio <= 1.2, ratio


def test_a_projector_refreshed_mid_round_sends_that_weight_dense_and_still_rebuilds():
    adapter, delta, start = galore_round("mobilenet_v2_035", steps=3, update_proj_gap=2)
    upload, dense = factored_upload(delta, start, adapter.bases(), dict(adapter.model.named_parameters()))
    assert 0 < dense <= len(adapter.projected())
    assert sum(k in upload for k in adapter.projected()) == dense  # those travel under their own name
    rebuilt = expand_upload(upload, start, {k: tuple(v.shape) for k, v in delta.items()})
    assert max(relative_error(rebuilt[k], delta[k]) for k in delta) < 1e-5


def test_bad_factor_uploads_are_refused():
    shapes = {"w": (6, 2, 2), "b": (6,)}
    good = {"w" + LEFT: torch.ones(6, 2), "w" + RIGHT: torch.ones(2, 4), "b": torch.zeros(6)}
    assert expand_upload(good, {}, shapes)["w"].shape == (6, 2, 2)
    cases = {
        "both forms": {**good, "w": torch.zeros(6, 2, 2)},
        "missing": {"b": torch.zeros(6)},
        "wrong size": {**good, "w" + RIGHT: torch.ones(2, 5)},
        "rank above min(m, n)": {**good, "w" + LEFT: torch.ones(6, 5), "w" + RIGHT: torch.ones(5, 4)},
        "integer factors": {**good, "w" + LEFT: torch.ones(6, 2, dtype=torch.int64)},
        "float64 factors": {**good, "w" + LEFT: torch.ones(6, 2, dtype=torch.float64)},
        "unexpected key": {**good, "extra" + LEFT: torch.ones(1, 1)},
    }
    for name, upload in cases.items():
        with pytest.raises(UsageError, match="payload"):
            expand_upload(upload, {}, shapes)


@pytest.mark.slow
def test_a_galore_fleet_with_factored_uploads_ends_where_dense_uploads_do(tmp_path):
    """The same seeded GaLore fleet twice, one round: factored uploads carry a fraction of the bytes
    and the server's global adapter matches the dense-upload run's to float32 rounding (a weight's
    rounding during training, ~1e-4 of a round's update, is what the subspace check allows for;
    later rounds would amplify it through training)."""
    import json

    from fedpeft.fleet.simulation import run_fleet
    from fedpeft.report import read_jsonl
    from test_fleet import small_config

    runs = {}
    for mode in ("factored", "dense"):
        cfg = small_config(tmp_path, method="galore", galore_upload=mode, rounds=1, out=str(tmp_path / mode))
        run_fleet(cfg)
        runs[mode] = read_jsonl(tmp_path / mode / "clients.jsonl")
    trained = {mode: [c for c in lines if c["round"] >= 1 and c["status"] == "ok"] for mode, lines in runs.items()}
    assert trained["factored"] and all(c["aggregated"] and c["galore_dense_weights"] == 0 for c in trained["factored"])
    assert all("galore_dense_weights" not in c for c in trained["dense"])
    up = {mode: sum(c["bytes_up"] for c in lines) for mode, lines in trained.items()}
    assert up["factored"] < 0.2 * up["dense"], up  # mobilenet_v2_035: BatchNorm and biases travel dense
    factored, dense = (torch.load(tmp_path / m / "global_adapter.pt", weights_only=True) for m in ("factored", "dense"))
    assert factored.keys() == dense.keys()
    floats = [k for k in dense if dense[k].is_floating_point()]
    overall = relative_error(torch.cat([factored[k].flatten() for k in floats]), torch.cat([dense[k].flatten() for k in floats]))
    worst = max(relative_error(factored[k], dense[k]) for k in floats)
    assert overall < 1e-5 and worst < 1e-3, (overall, worst)
    accuracy = {m: json.loads((tmp_path / m / "summary.json").read_text())["final_accuracy"] for m in runs}
    assert accuracy["factored"] == pytest.approx(accuracy["dense"], abs=0.01)
