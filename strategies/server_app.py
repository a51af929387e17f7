"""The Flower ServerApp: pre-trained model (cached), global adapter state, AdapterFedAvg rounds,
server-side evaluation on the held-out target test set, the run log and the final report.

`app` reads the run config from Flower's context (`flwr run .`); `make_server_app(cfg)` binds
a config directly (the in-process simulation)."""
from __future__ import annotations

import io
import os
import sys
import time

import fedpeft  # noqa: F401  (torchvision shim first)
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from fedpeft.fleet import setup
from fedpeft.fleet.config import RunConfig
from fedpeft.fleet.runlog import RunLog, check_out_dir, check_same_run, load_checkpoint
from fedpeft.paths import atomic_write_bytes
from fedpeft.payload import encode
from fedpeft.train import evaluate
from fedpeft.devices import with_overrides
from fedpeft.fleet.budget import RANKED, choose_setting, round_timing
from fedpeft.fleet.config import AUTO
from strategies.adapter_fedavg import AdapterFedAvg
from strategies.aggregation import client_upload
from strategies.run_loop import exchange, roll_call, run_rounds, wait_for_nodes
from strategies.run_timings import RunTimings
from strategies.mixed import MixedFleet
from strategies.virtual_clock import FleetClock


def evaluate_global(cfg: RunConfig, global_delta: dict, method: str | None = None) -> tuple[float, float]:
    """Accuracy and loss of the pre-trained model carrying the global adapter (of `method`, default
    the run's), on the target test set."""
    adapter = setup.attach(cfg, method or cfg.method, cfg.rank, calibration=None)
    if cfg.fedbn:  # BatchNorm is the devices' own: the server's copy keeps the pre-trained BN
        global_delta = {**adapter.delta(), **global_delta}
    if global_delta:
        adapter.start_from(global_delta)
    test = setup.task_for(cfg).target_test
    result = evaluate(adapter.model, test.images, test.labels)
    return result.accuracy, result.loss


def evaluates(cfg: RunConfig, server_round: int) -> bool:
    """Whether the server evaluates the global model after `server_round`: the last round always,
    else every `evaluate_every`-th round (round 0, the pre-trained model, included); 0: the last only."""
    return server_round >= cfg.rounds or (cfg.evaluate_every > 0 and server_round % cfg.evaluate_every == 0)


def _taskedge_numels(adapter) -> dict[str, int] | None:
    layers = getattr(adapter, "layers", None)
    return {f"{n}.weight": layer.base.weight.numel() for n, layer in layers.items()} if layers else None


def _calibration_shapes(cfg: RunConfig) -> dict[str, tuple[int]]:
    """Shapes of a client's calibration statistics: one sum per input element of each masked layer."""
    from fedpeft.methods import make_method
    from fedpeft.methods.taskedge import target_layers

    method = make_method(cfg.method, **cfg.method_hparams())
    return {name: (layer.weight[0].numel(),) for name, layer in target_layers(setup.pretrained_model(cfg), method).items()}


def initial_state(grid: Grid, cfg: RunConfig, strategy: AdapterFedAvg, template_adapter, nodes: list[int]) -> dict:
    """What round 1 sends down: the method's initial adapter (the base model is already on every
    device). Local-mask TaskEdge clients pick their own masks, so nothing; a shared mask is built
    from the fleet's calibration statistics (|W| alone if no client answered)."""
    if cfg.method == AUTO or (cfg.method == "taskedge" and not cfg.shares_mask):
        return {}  # auto: the weight-space state starts empty (no change); local TaskEdge: each client's mask
    if cfg.shares_mask:
        replies, missing = exchange(grid, strategy.calibration_messages(nodes), cfg.round_timeout_s)
        sums = strategy.calibration_sums(replies, _calibration_shapes(cfg), missing)
        if sums is None:
            print("calibration: no client answered; the shared mask ranks weights by |W| alone", file=sys.stderr)
        return setup.attach(cfg, cfg.method, cfg.rank, calibration=sums).delta()  # the mask, zero values, head
    return client_upload(cfg, template_adapter.delta(), template_adapter.model)


def form_predictor(cfg: RunConfig, clock: FleetClock):
    """predict(client id, conditions) -> the (method, rank) the client will pick this round: the
    client's own budget walk (its requested method, its device under this round's RAM), run on
    the server; None for a run whose clients cannot mix methods."""
    can_mix = cfg.budget_policy == "adapt" or cfg.method == AUTO or bool(setup.fleet_requests(cfg))
    if not (cfg.mixes_methods and can_mix):
        return None
    num_classes = setup.task_for(cfg).num_classes

    def predict(client_id: int, conditions: dict) -> tuple[str, int]:
        device = clock.devices.get(client_id)
        if device is None:
            return cfg.method, cfg.rank
        if "sim-ram-train-bytes" in conditions:
            device = with_overrides(device, "sim-ram-train-bytes", ram_train_bytes=conditions["sim-ram-train-bytes"])
        timing = None  # auto with a deadline: the client's walk weighs its round time, with these inputs
        if cfg.round_deadline_s > 0 and 0 <= client_id < cfg.num_clients:
            timing = round_timing(cfg, len(setup.client_data(cfg, client_id).labels),
                                  float(conditions.get("sim-compute-fraction", 1.0)), float(conditions.get("sim-jitter", 1.0)))
        setting = choose_setting(cfg, device, num_classes, *setup.request_of(cfg, client_id), timing=timing)
        return setting.method, setting.rank or 0

    return predict


def _bar_size(stream) -> dict:
    """tqdm's size options. A terminal that reports a 0 x 0 window (a pty nobody sized: `script`,
    some IDE and container terminals) makes tqdm hide its bar as below the screen's last line
    (tqdm drops bars at positions >= the height), so such a terminal gets a fixed size."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):  # not a terminal: tqdm disables itself anyway
        return {"dynamic_ncols": True}
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 40}


def server_flops_per_step(cfg: RunConfig):
    """FLOPs of one step of the setting a clients.jsonl line says it ran, from the server's own
    (cached) profile, for the virtual clock; None for a setting the budget walk would never choose
    (a hostile or broken reply must not make the server profile whatever it claims)."""
    from fedpeft.fleet.budget import all_candidates, step_cost

    allowed = all_candidates(cfg)
    num_classes = setup.task_for(cfg).num_classes

    def per_step(rec: dict) -> float | None:
        key = (rec.get("method"), rec.get("rank") if rec.get("method") in RANKED else None, rec.get("batch_size"))
        if key not in allowed:
            return None
        return float(step_cost(cfg, key[0], key[1], key[2], num_classes).total_flops)

    return per_step


def server_traffic_per_step(cfg: RunConfig):
    """Memory traffic of one step (the profile's `traffic`) of the setting a line says it ran, for
    the virtual clock's roofline; None where server_flops_per_step gives None."""
    from fedpeft.fleet.budget import all_candidates, step_cost

    allowed = all_candidates(cfg)
    num_classes = setup.task_for(cfg).num_classes

    def per_step(rec: dict) -> dict | None:
        key = (rec.get("method"), rec.get("rank") if rec.get("method") in RANKED else None, rec.get("batch_size"))
        return step_cost(cfg, key[0], key[1], key[2], num_classes).traffic if key in allowed else None

    return per_step


def _examples_cap(cfg: RunConfig):
    """The most examples a client may claim: the configured cap, else its partition size x local epochs."""
    sizes: dict[int, int] = {}

    def cap(client_id: int) -> int | None:
        if cfg.max_examples:
            return cfg.max_examples
        if not 0 <= client_id < cfg.num_clients:
            return 0  # no such partition: it holds nothing
        if client_id not in sizes:
            sizes[client_id] = len(setup.client_data(cfg, client_id).labels) * cfg.local_epochs
        return sizes[client_id]

    return cap


def run_server(grid: Grid, cfg: RunConfig) -> dict:
    check_out_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    checkpoint = None
    if cfg.resume:
        check_same_run(cfg.out, cfg.to_dict())
        checkpoint = load_checkpoint(cfg.out)
    log = RunLog(cfg.out, cfg.to_dict(), keep_lines=checkpoint["lines"] if checkpoint else None)
    timings = RunTimings(log.dir, append=bool(checkpoint))
    timings.mark("server_start")
    with timings.phase("pretrain"):
        setup.checkpoint_for(cfg, log=lambda m: print(m, file=sys.stderr))  # pre-train once (cached)
    home = "fft" if cfg.method == AUTO else cfg.method  # auto: the weight-space state's own form
    with timings.phase("build"):
        template_adapter = setup.attach(cfg, home, cfg.rank, calibration=None)
    template = client_upload(cfg, template_adapter.delta(), template_adapter.model)
    clock = FleetClock(cfg, setup.fleet_for(cfg), now_s=checkpoint.get("clock_s", 0.0) if checkpoint else 0.0,
                       flops_per_step=server_flops_per_step(cfg), traffic_per_step=server_traffic_per_step(cfg))
    strategy = AdapterFedAvg(cfg, log, {}, template, numels=_taskedge_numels(template_adapter),
                             examples_cap=_examples_cap(cfg), clock=clock)
    with timings.phase("wait_for_nodes"):
        nodes = wait_for_nodes(grid, cfg.sample_size, cfg.round_timeout_s)
    with timings.phase("roll_call"):
        strategy.known_nodes = roll_call(grid, nodes, cfg.round_timeout_s)
    clock.identify(strategy.known_nodes)
    strategy.predict = form_predictor(cfg, clock)
    done = checkpoint["round"] if checkpoint else -1
    bar = tqdm(total=cfg.rounds, initial=max(done, 0), desc=f"{cfg.method} fleet", unit="round", file=sys.stderr,
               disable=None, **_bar_size(sys.stderr))
    last = {"t": time.perf_counter(), "replies": 0}

    def end_round(server_round: int) -> None:
        """Evaluate, log the round, save the global adapter and the checkpoint (in that order: a
        checkpoint only ever covers lines already written)."""
        global_delta = strategy.global_delta
        accuracy = loss = None  # a round the server does not evaluate (evaluate_every) logs nulls
        with timings.phase("evaluate"):
            if evaluates(cfg, server_round) and strategy.mixed is not None:  # pre-trained + the weight-space state
                accuracy, loss = evaluate_global(cfg, strategy.mixed.evaluation_delta(), "fft")
            elif evaluates(cfg, server_round):
                accuracy, loss = evaluate_global(cfg, global_delta)
        log_started = time.perf_counter()
        stats = strategy.round_stats.get(server_round, {})
        now = time.perf_counter()
        log.round({"round": server_round, "accuracy": accuracy, "loss": loss, "evaluated": accuracy is not None,
                   "clients_sampled": stats.get("clients_sampled", 0),
                   **{k: stats.get(k, 0) for k in ("clients_ok", "clients_failed", "clients_over_budget",
                                                    "clients_unavailable", "clients_rejected", "clients_straggler",
                                                    "clients_dropped_out", "bytes_up", "bytes_down")},
                   "sim_time_s": stats.get("sim_time_s", 0.0), "sim_clock_s": stats.get("sim_clock_s", clock.now_s),
                   **({"error": stats["error"]} if "error" in stats else {}),
                   "wall_s": round(now - last["t"], 3)})
        last.update(t=now, replies=0)
        if global_delta:
            buffer = io.BytesIO()
            torch.save(global_delta, buffer)
            atomic_write_bytes(log.dir / "global_adapter.pt", buffer.getvalue())
        log.save_checkpoint(server_round, global_delta, clock_s=clock.now_s, mixed=strategy.mixed is not None)
        if server_round > 0:
            bar.update(1)
        timings.current["log_s"] = time.perf_counter() - log_started
        timings.flush("server", round=server_round)
        bar.set_postfix(acc="-" if accuracy is None else f"{accuracy:.3f}", ok=stats.get("clients_ok", 0), up=f"{stats.get('bytes_up', 0) / 1e6:.2f}MB")

    def on_reply(msg) -> None:
        timings.client(msg)
        last["replies"] += 1
        bar.set_postfix_str(f"round {bar.n + 1}: {last['replies']}/{cfg.per_round} clients", refresh=True)

    try:
        if checkpoint:
            strategy.global_delta = checkpoint["global_delta"]
            if checkpoint.get("mixed"):
                strategy.mixed = MixedFleet(cfg, dense=strategy.global_delta)
        else:
            if cfg.method == AUTO:
                strategy.mixed = MixedFleet(cfg)
            with timings.phase("initial_state"):
                strategy.global_delta = initial_state(grid, cfg, strategy, template_adapter, nodes)
        timings.flush("setup")
        if not checkpoint:
            end_round(0)
        initial = encode(strategy.global_delta)[0] if strategy.global_delta else ArrayRecord()
        run_rounds(grid, strategy, done + 1 if checkpoint else 1, initial, end_round, on_reply, timings.phase)
    finally:
        bar.close()
    from fedpeft.report import plot_run, summarize

    with timings.phase("report"):
        summary = summarize(log.dir)
        plot_run(log.dir, summary)
    timings.flush("report")
    return summary


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg or RunConfig.from_mapping(context.run_config))

    return app


app = make_server_app()
