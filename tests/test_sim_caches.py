"""Per-process caches of what every virtual client used to rebuild (fedpeft/fleet/setup.py), the
clients' and server's timers (strategies/run_timings.py), and evaluate_every."""
import json

import pytest
import torch
from flwr.app import ArrayRecord

from clients.local_update import client_round
from fedpeft.fleet import setup
from fedpeft.fleet.config import RunConfig
from fedpeft.errors import UsageError
from fedpeft.models import build_model
from fedpeft.payload import decode
from strategies.server_app import evaluates


def make_cfg(tmp_path, **overrides) -> RunConfig:
    values = dict(model="mobilenet_v2_035", num_clients=4, rounds=2, pretrain_epochs=1, batch_size=32,
                  out=str(tmp_path / "run"), cache_dir=str(tmp_path.parent / "fleet-cache"))
    return RunConfig(**{**values, **overrides})


def state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pretrained_model_is_built_once_and_each_caller_gets_its_own_copy(tmp_path):
    cfg = make_cfg(tmp_path)
    setup.checkpoint_for(cfg)
    setup.clear_caches()
    torch.manual_seed(1)
    fresh = build_model(cfg.model, num_classes=setup.task_for(cfg).num_classes, input_size=cfg.input_size,
                        checkpoint=setup.checkpoint_for(cfg), seed=cfg.seed)
    rng_fresh = torch.get_rng_state()

    a = setup.pretrained_model(cfg)
    rng_a = torch.get_rng_state()
    torch.rand(5)  # whatever ran in between, a cached copy leaves the RNG as a build would
    b = setup.pretrained_model(cfg)
    info = setup._pretrained_template.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert torch.equal(rng_a, rng_fresh) and torch.equal(torch.get_rng_state(), rng_fresh)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z), name
        assert x.data_ptr() != y.data_ptr(), f"{name} is shared between two clients' models"

    before = state(b)
    with torch.no_grad():  # one client training its copy in place must not reach anyone else's
        for p in a.parameters():
            p.add_(1.0)
    c = setup.pretrained_model(cfg)
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())


def test_a_client_round_is_the_same_with_and_without_the_caches(tmp_path):
    cfg = make_cfg(tmp_path)
    setup.checkpoint_for(cfg)

    def round_of(client: int) -> dict:
        reply = client_round(cfg, {"partition-id": client}, ArrayRecord(), 1)
        assert reply.info["status"] == "ok", reply.info
        assert {"t.lookup_s", "t.build_s", "t.train_s", "t.upload_s"} <= set(reply.metrics)
        return decode(reply.arrays)

    setup.clear_caches()
    cold = round_of(0)
    round_of(1)  # another client in the same process, from the same cached template
    warm = round_of(0)
    assert setup._pretrained_template.cache_info().hits >= 2
    assert cold.keys() == warm.keys() and all(torch.equal(cold[k], warm[k]) for k in cold)


def test_evaluate_every_picks_the_rounds_and_always_the_last():
    cfg = RunConfig(rounds=7, evaluate_every=3)
    assert [n for n in range(8) if evaluates(cfg, n)] == [0, 3, 6, 7]
    assert [n for n in range(8) if evaluates(RunConfig(rounds=7), n)] == list(range(8))
    assert [n for n in range(8) if evaluates(RunConfig(rounds=7, evaluate_every=0), n)] == [7]
    with pytest.raises(UsageError, match="evaluate_every"):
        RunConfig(evaluate_every=-1)


def test_reports_and_answers_take_rounds_that_were_not_evaluated(tmp_path):
    from fedpeft.report import plot_run, summarize
    from fedpeft.report.tables import headline, run_table

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "mobilenet_v2", "method": "lora", "rounds": 3,
                                                 "evaluate_every": 2}))
    rounds = [{"round": n, "accuracy": acc, "loss": None if acc is None else 1.0, "evaluated": acc is not None,
               "sim_clock_s": 10.0 * n, "bytes_up": 100, "bytes_down": 100, "clients_ok": 1}
              for n, acc in ((0, 0.5), (1, None), (2, 0.7), (3, 0.8))]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    clients = [{"round": n, "client_id": 0, "device": "jetson_nano", "method": "lora", "status": "ok",
                "bytes_up": 100, "bytes_down": 100, "energy_j": 1.0, "device_time_s": 1.0, "examples": 10}
               for n in (1, 2, 3)]
    (run / "clients.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clients))
    summary = summarize(run)
    assert (summary["initial_accuracy"], summary["final_accuracy"], summary["final_round"]) == (0.5, 0.8, 3)
    assert summary["rounds"] == 3
    assert [r["accuracy"] for r in summary["per_round"]] == [0.5, None, 0.7, 0.8]
    # 95% of the best (0.76) is first reached at round 3: round 1, unevaluated, cannot reach it
    assert summary["to_target"]["round"] == 3
    assert all(p.is_file() for p in plot_run(run, summary))
    assert "0.8000" in headline(summary) and run_table(summary)
