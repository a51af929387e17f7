"""Robust aggregation rules on hand-made uploads: every expected value is computed by hand."""
import math

import pytest
import torch

from fedpeft.errors import UsageError
from fedpeft.fleet.config import RunConfig
from strategies.robust import coordinate_median, scaled_update, screen, trimmed_mean, update_norm


def upload(w: list[float], steps: int = 1) -> dict:
    return {"layer.weight": torch.tensor(w, dtype=torch.float32), "bn.num_batches_tracked": torch.tensor(steps)}


REFERENCE = upload([1.0, 1.0])


def test_update_norm_is_the_distance_from_the_reference_over_float_keys():
    assert update_norm(upload([4.0, 5.0], steps=99), REFERENCE) == 5.0  # sqrt(3^2 + 4^2); counters ignored
    assert update_norm({"new.values": torch.tensor([3.0, 4.0])}, REFERENCE) == 5.0  # no reference: from zero


def test_scaled_update_flips_and_scales_around_the_reference():
    out = scaled_update(upload([2.0, 3.0], steps=7), REFERENCE, -10.0)
    assert out["layer.weight"].tolist() == [1.0 - 10.0, 1.0 - 20.0]
    assert out["layer.weight"].dtype == torch.float32 and out["bn.num_batches_tracked"].item() == 7


def test_screen_rejects_an_outlier_by_the_others_median_and_clips_to_a_bound():
    honest = [upload([2.0, 1.0]), upload([1.0, 3.0]), upload([4.0, 1.0])]  # norms 1, 2, 3
    attacker = upload([1e6, 1.0])
    kept, rejected, norms = screen(honest + [attacker], REFERENCE, reject_multiple=10.0)
    assert list(rejected) == [3] and "reject_norm_multiple" in rejected[3]
    assert norms[:3] == [1.0, 2.0, 3.0] and len(kept) == 3
    # Two clients: the leave-one-out median still singles out the attacker.
    _, rejected, _ = screen([honest[0], attacker], REFERENCE, reject_multiple=10.0)
    assert list(rejected) == [1]

    kept, rejected, _ = screen(honest, REFERENCE, clip_norm=1.5)
    assert not rejected
    assert kept[0]["layer.weight"].tolist() == [2.0, 1.0]  # norm 1 <= 1.5: untouched
    assert kept[1]["layer.weight"].tolist() == pytest.approx([1.0, 1.0 + 1.5])  # norm 2 -> 1.5
    assert kept[2]["layer.weight"].tolist() == pytest.approx([1.0 + 1.5, 1.0])
    # A multiple of the round's median norm (2): 1 x median clips the norm-3 update to 2.
    kept, _, _ = screen(honest, REFERENCE, clip_median_multiple=1.0)
    assert kept[2]["layer.weight"].tolist() == pytest.approx([3.0, 1.0])


def test_median_and_trimmed_mean_per_coordinate():
    ups = [upload([1.0, 10.0], 1), upload([2.0, -5.0], 4), upload([100.0, 0.0], 2), upload([3.0, 1.0], 3)]
    med = coordinate_median(ups)
    assert med["layer.weight"].tolist() == [2.5, 0.5]  # (2 + 3) / 2 and (0 + 1) / 2
    assert med["bn.num_batches_tracked"].item() == 4  # counters: the max
    assert coordinate_median(ups[:3])["layer.weight"].tolist() == [2.0, 0.0]
    trimmed = trimmed_mean(ups, 0.25)  # cut one at each end
    assert trimmed["layer.weight"].tolist() == [2.5, 0.5]
    assert trimmed_mean(ups, 0.0)["layer.weight"].tolist() == pytest.approx([26.5, 1.5])
    with pytest.raises(UsageError, match="trim_fraction"):
        trimmed_mean(ups, 0.5)


def test_median_needs_uploads_of_one_shape():
    with pytest.raises(UsageError, match="shape"):
        coordinate_median([upload([1.0, 2.0]), upload([1.0])])
    with pytest.raises(UsageError, match="^aggregator median"):
        RunConfig(method="taskedge", aggregator="median")
    with pytest.raises(UsageError, match="^aggregator trimmed_mean"):
        RunConfig(method="lora", lora_mode="exact", aggregator="trimmed_mean")
    assert RunConfig(method="lora", aggregator="median").aggregator == "median"
    assert math.isclose(RunConfig().reject_norm_multiple, 10.0)
