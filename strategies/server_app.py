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
from fedpeft.paths import atomic_write_bytes
from fedpeft.payload import decode, encode
from fedpeft.train import evaluate
from strategies.adapter_fedavg import AdapterFedAvg
from strategies.aggregation import client_upload


def evaluate_global(cfg: RunConfig, global_delta: dict) -> tuple[float, float]:
    """Accuracy and loss of the pre-trained model carrying the global adapter, on the target test set."""
    adapter = setup.attach(cfg, cfg.method, cfg.rank, calibration=None)
    if cfg.fedbn:  # BatchNorm is the devices' own: the server's copy keeps the pre-trained BN
        global_delta = {**adapter.delta(), **global_delta}
    if global_delta:
        adapter.start_from(global_delta)
    test = setup.task_for(cfg).target_test
    result = evaluate(adapter.model, test.images, test.labels)
    return result.accuracy, result.loss


def _taskedge_numels(adapter) -> dict[str, int] | None:
    layers = getattr(adapter, "layers", None)
    return {f"{n}.weight": layer.base.weight.numel() for n, layer in layers.items()} if layers else None


def _calibration_shapes(cfg: RunConfig) -> dict[str, tuple[int]]:
    """Shapes of a client's calibration statistics: one sum per input element of each masked layer."""
    from fedpeft.methods import make_method
    from fedpeft.methods.taskedge import target_layers

    method = make_method(cfg.method, **cfg.method_hparams())
    return {name: (layer.weight[0].numel(),) for name, layer in target_layers(setup.pretrained_model(cfg), method).items()}


def initial_state(grid: Grid, cfg: RunConfig, strategy: AdapterFedAvg, template_adapter) -> dict:
    """What round 1 sends down: the method's initial adapter (the base model is already on every
    device). Local-mask TaskEdge clients pick their own masks, so nothing; a shared mask is built
    from the fleet's calibration statistics (|W| alone if no client answered)."""
    if cfg.method == "taskedge" and not cfg.shares_mask:
        return {}
    if cfg.shares_mask:
        sums = strategy.calibrate(grid, _calibration_shapes(cfg))
        if sums is None:
            print("calibration: no client answered; the shared mask ranks weights by |W| alone", file=sys.stderr)
        return setup.attach(cfg, cfg.method, cfg.rank, calibration=sums).delta()  # the mask, zero values, head
    return client_upload(cfg, template_adapter.delta(), template_adapter.model)


def run_server(grid: Grid, cfg: RunConfig) -> dict:
    log = RunLog(cfg.out, cfg.to_dict())
    setup.checkpoint_for(cfg, log=lambda m: print(m, file=sys.stderr))  # pre-train once (cached)
    template_adapter = setup.attach(cfg, cfg.method, cfg.rank, calibration=None)
    template = client_upload(cfg, template_adapter.delta(), template_adapter.model)
    strategy = AdapterFedAvg(cfg, log, {}, template, numels=_taskedge_numels(template_adapter))
    initial = initial_state(grid, cfg, strategy, template_adapter)
    strategy.global_delta = initial
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
