"""What a simulated fleet costs beyond the local training it simulates.

    .venv/bin/python experiments/benchmarks/sim_overhead.py [--rounds 3] [--num-clients 10]
        [--evaluate-every 1] [--model mobilenet_v2] [--out runs/benchmarks/sim_overhead.json]

1. Runs `fedpeft simulate` (LoRA, the default fleet: num_clients devices, every client every
   round) as a subprocess and times it from launch to exit.
2. Then, in this process, a bare sequential PyTorch loop does exactly the client work the
   simulation logged in clients.jsonl: for every client-round that trained (status ok), in round
   order, build the pre-trained model and the adapter of the logged method and rank, and train the
   logged number of steps at the logged batch size on that client's partition. The pre-trained
   state dict and the dataset are loaded once, as any hand-written loop would; each client-round
   builds its model and adapter, as the simulated client does. Torch uses its default threads
   (every core), where the simulation runs one single-threaded client per core.
3. Prints `simulate / bare` wall time (target <= 1.15) and the breakdown of the simulated run from
   its timers (DIR/timings.jsonl, strategies/run_timings.py): process start-up and imports, pre-
   training lookup, Ray and Flower start, roll call, the clients' own laps (lookup of the task and
   cached profile, model build, training, upload) summed over client-rounds, aggregation,
   evaluation, logging, report, Ray shutdown.

The pre-trained checkpoint is built first (or found in the cache), so pre-training never counts.
Timings on a shared machine are noisy: --repeat N runs both N times and reports the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
TARGET = 1.15


def simulate(args, out: Path) -> float:
    """Wall seconds of one `fedpeft simulate` run, launch to exit."""
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--model", args.model, "--method", "lora",
           "--num-clients", str(args.num_clients), "--rounds", str(args.rounds), "--pretrain-epochs",
           str(args.pretrain_epochs), "--out", str(out), "--overwrite", "--set", f"evaluate_every={args.evaluate_every}"]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"fedpeft simulate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def bare_loop(run_dir: Path) -> dict:
    """The client work of run_dir/clients.jsonl in a plain loop; wall seconds and their split."""
    started = time.perf_counter()
    import torch

    import fedpeft  # noqa: F401  (torchvision shim first)
    from fedpeft.data.partition import partition_for
    from fedpeft.fleet import setup
    from fedpeft.fleet.config import RunConfig
    from fedpeft.methods import make_method
    from fedpeft.models import MODELS
    from fedpeft.train import train

    imported = time.perf_counter()
    cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    task = setup.task_for(cfg)  # the decoded dataset, once
    state = torch.load(setup.checkpoint_for(cfg), map_location="cpu", weights_only=True)  # once
    target = task.target_train
    records = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    work = sorted((r for r in records if r["status"] == "ok" and r["round"] >= 1), key=lambda r: (r["round"], r["client_id"]))
    loaded = time.perf_counter()
    build_s = train_s = 0.0
    steps = 0
    for rec in work:
        t0 = time.perf_counter()
        indices = partition_for(target.labels, rec["client_id"], cfg.num_clients, scheme=cfg.partition,
                                alpha=cfg.dirichlet_alpha, seed=cfg.seed)
        data = target.subset(indices)
        model = MODELS[cfg.model](task.num_classes, cfg.input_size)
        own = model.state_dict()  # a head of another size (task=unseen) stays as built
        model.load_state_dict({k: v for k, v in state.items() if own[k].shape == v.shape}, strict=False)
        torch.manual_seed(cfg.seed)
        adapter = make_method(rec["method"], **cfg.method_hparams(rec["method"], rec["rank"])).attach(model)
        t1 = time.perf_counter()
        result = train(adapter, data.images, data.labels, epochs=cfg.local_epochs, batch_size=rec["batch_size"],
                       max_steps=rec["steps"], seed=cfg.seed * 100003 + rec["round"] * 1009 + rec["client_id"])
        adapter.delta()
        build_s += t1 - t0
        train_s += time.perf_counter() - t1
        steps += result.steps
        assert result.steps == rec["steps"], (rec, result.steps)
    end = time.perf_counter()
    return {"wall_s": end - started, "imports_s": imported - started, "load_s": loaded - imported,
            "build_s": build_s, "train_s": train_s, "client_rounds": len(work), "steps": steps,
            "threads": torch.get_num_threads()}


def breakdown(run_dir: Path, wall_s: float) -> dict:
    """The simulated run's wall time split by its timers."""
    from strategies import run_timings

    lines = run_timings.read(run_dir)
    driver = next(r for r in lines if r["kind"] == "driver")
    setup = next(r for r in lines if r["kind"] == "setup")
    servers = [r for r in lines if r["kind"] == "server"]
    clients = [r for r in lines if r["kind"] == "client"]
    report = next((r for r in lines if r["kind"] == "report"), {})
    first_client = min(c["started_unix"] for c in clients)
    sim_s = driver["simulation_end_unix"] - driver["simulation_start_unix"]
    total = lambda key, rows: sum(r.get(key, 0.0) for r in rows)  # noqa: E731
    return {
        "command_wall_s": wall_s,
        "process_start_and_imports_s": wall_s - sim_s - driver["pretrain_s"] - driver["ray_shutdown_s"],
        "pretrain_lookup_s": driver["pretrain_s"] + setup.get("pretrain_s", 0.0),
        "ray_flower_start_s": setup["server_start_unix"] - driver["simulation_start_unix"],
        "server_build_s": setup.get("build_s", 0.0),
        "roll_call_s": setup.get("wait_for_nodes_s", 0.0) + setup.get("roll_call_s", 0.0),
        "start_to_first_client_s": first_client - driver["simulation_start_unix"],
        "client_lookup_s_sum": total("lookup_s", clients),
        "client_build_s_sum": total("build_s", clients),
        "client_train_s_sum": total("train_s", clients),
        "client_upload_s_sum": total("upload_s", clients),
        "client_rounds": len(clients),
        "rounds_exchange_s": total("exchange_s", servers),
        "aggregate_s": total("aggregate_s", servers),
        "evaluate_s": total("evaluate_s", servers),
        "evaluations": sum(1 for r in servers if r.get("evaluate_s", 0) > 0.01),
        "log_s": total("log_s", servers) + total("configure_s", servers),
        "report_s": report.get("report_s", 0.0),
        "ray_shutdown_s": driver["ray_shutdown_s"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--evaluate-every", type=int, default=1)
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--runs-dir", default="runs/benchmarks/sim_overhead")
    p.add_argument("--out", default="runs/benchmarks/sim_overhead.json")
    args = p.parse_args(argv)
    if args.cache_dir:
        os.environ["FEDPEFT_CACHE"] = args.cache_dir
    import fedpeft  # noqa: F401
    from fedpeft.fleet import setup
    from fedpeft.fleet.config import RunConfig

    setup.checkpoint_for(RunConfig(model=args.model, pretrain_epochs=args.pretrain_epochs,
                                   cache_dir=args.cache_dir))  # pre-training never counts
    sims, bares, parts = [], [], []
    for i in range(args.repeat):
        run_dir = Path(args.runs_dir) / f"run{i}"
        wall = simulate(args, run_dir)
        sims.append(wall)
        parts.append(breakdown(run_dir, wall))
        bares.append(bare_loop(run_dir))
        print(f"run {i}: simulate {wall:.1f} s, bare {bares[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    sim_s, bare_s = statistics.median(sims), statistics.median(b["wall_s"] for b in bares)
    ratio = sim_s / bare_s
    result = {"benchmark": "sim_overhead", "config": vars(args), "simulate_s": sims, "bare": bares, "breakdown": parts,
              "ratio": ratio, "target": TARGET, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    b, last = bares[0], parts[-1]
    print(f"sim overhead: {args.model}, lora, {b['client_rounds']} client-rounds ({b['steps']} steps), "
          f"{args.rounds} rounds, evaluate_every={args.evaluate_every}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"simulate / bare = {sim_s:.1f} s / {bare_s:.1f} s = {ratio:.2f}x (target <= {TARGET}x; "
          f"median of {args.repeat})")
    print(f"bare: imports {b['imports_s']:.1f} s, data+checkpoint {b['load_s']:.1f} s, build {b['build_s']:.1f} s, "
          f"train {b['train_s']:.1f} s ({b['threads']} threads)")
    print("simulate breakdown (last run; client_* are sums over client-rounds, which run side by side):")
    for key, value in last.items():
        print(f"  {key:<30} {value:8.2f}" if isinstance(value, float) else f"  {key:<30} {value:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
