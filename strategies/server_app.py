"""The Flower ServerApp: pre-trained model (cached), global adapter state, AdapterFedAvg rounds,
server-side evaluation on the held-out target test set, the run log and the final report.

`app` reads the run config from Flower's context (`flwr run .`); `make_server_app(cfg)` binds
a config directly (the in-process simulation)."""
from __future__ import annotations

import io
import sys
import time

import fedpeft  # noqa: F401  (torchvision shim first)
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from fedpeft.fleet import setup
from fedpeft.fleet.config import RunConfig
from fedpeft.fleet.runlog import RunLog
from fedpeft.payload import decode, encode
from fedpeft.paths import atomic_write_bytes
from fedpeft.train import evaluate
from strategies.adapter_fedavg import AdapterFedAvg


def evaluate_global(cfg: RunConfig, global_delta: dict) -> tuple[float, float]:
    """Accuracy and loss of the pre-trained model carrying the global adapter, on the target test set."""
    adapter = setup.attach(cfg, cfg.method, cfg.rank, calibration=None)
    if global_delta:
        adapter.start_from(global_delta)
    test = setup.task_for(cfg).target_test
    result = evaluate(adapter.model, test.images, test.labels)
    return result.accuracy, result.loss


def run_server(grid: Grid, cfg: RunConfig) -> dict:
    log = RunLog(cfg.out, cfg.to_dict())
    setup.checkpoint_for(cfg, log=lambda m: print(m, file=sys.stderr))  # pre-train once (cached)
    template = setup.attach(cfg, cfg.method, cfg.rank, calibration=None).delta()
    # Round 1 sends the method's initial adapter (the base model is already on every device).
    # TaskEdge clients pick their own masks from local data, so there is nothing to send yet;
    # taskedge_lora clients adopt the server's mask (magnitude-based: the server has no data) so that
    # their LoRA pairs can be averaged.
    initial = {} if cfg.method == "taskedge" else template
    strategy = AdapterFedAvg(cfg, log, initial, template)
    bar = tqdm(total=cfg.rounds, desc=f"{cfg.method} fleet", unit="round", file=sys.stderr,
               disable=None, dynamic_ncols=True)
    last = {"t": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        global_delta = decode(arrays) if len(arrays) else {}
        accuracy, loss = evaluate_global(cfg, global_delta)
        stats = strategy.round_stats.get(server_round, {})
        now = time.perf_counter()
        log.round({"round": server_round, "accuracy": accuracy, "loss": loss,
                   "clients_sampled": stats.get("clients_sampled", 0),
                   **{k: stats.get(k, 0) for k in ("clients_ok", "clients_failed", "clients_over_budget",
                                                    "clients_unavailable", "clients_rejected", "bytes_up", "bytes_down")},
                   "wall_s": round(now - last["t"], 3)})
        last["t"] = now
        if global_delta:
            buffer = io.BytesIO()
            torch.save(global_delta, buffer)
            atomic_write_bytes(log.dir / "global_adapter.pt", buffer.getvalue())
        if server_round > 0:
            bar.update(1)
            bar.set_postfix(acc=f"{accuracy:.3f}", ok=stats.get("clients_ok", 0),
                            up=f"{stats.get('bytes_up', 0) / 1e6:.2f}MB")
        else:
            bar.set_postfix(acc=f"{accuracy:.3f}")
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    try:
        strategy.start(grid=grid, initial_arrays=encode(initial)[0] if initial else ArrayRecord(), num_rounds=cfg.rounds,
                       train_config=ConfigRecord({}), evaluate_fn=evaluate_fn)
    finally:
        bar.close()
    from fedpeft.report import plot_run, summarize

    summary = summarize(log.dir)
    plot_run(log.dir, summary)
    return summary


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg or RunConfig.from_mapping(context.run_config))

    return app


app = make_server_app()
