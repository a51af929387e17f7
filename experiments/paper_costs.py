"""Reproduce the seed paper's cost comparison (arXiv 2507.23536) with fedpeft's profiler.

    .venv/bin/python experiments/paper_costs.py --out runs/paper_costs [--input-size 224] [--quick]

For each model (MobileNetV2, MobileNetV3-Small/Large, ResNet-18, and a tiny ViT) at 224x224,
batch 1, 1000 classes, and each method (fft, bn_head, lora, dora, galore, taskedge; r=4,
alpha=4), one training step is profiled (fedpeft.profiling.profile_step, cached). Writes:
  costs.csv    one row per (model, method): memory by category (at peak and each category's
               max), FLOPs per step in both conventions (exact and the paper's groups-unaware)
  memory.png   stacked bars of the memory at the peak by category, one panel per model
  flops.png    FLOPs per step, exact vs paper convention
  summary.md   reductions vs fft and the comparison with the paper; every number in it is
               computed by this script.
--quick: mobilenet_v2 and resnet18 only, at 64x64 unless --input-size is given.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedpeft  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fedpeft.commands.profile import write_csv  # noqa: E402
from fedpeft.profiling import profile_step  # noqa: E402
from fedpeft.profiling.flops import layer_flops  # noqa: E402

MODELS = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "vit_tiny"]
METHODS = ["fft", "bn_head", "lora", "dora", "galore", "taskedge"]
CATEGORY_ORDER = ["parameter", "buffer", "gradient", "activation", "temporary", "optimizer_state", "other"]
COLORS = ["#4c72b0", "#8172b2", "#c44e52", "#dd8452", "#ccb974", "#55a868", "#937860"]
MIB = 1024 * 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/paper_costs", help="output folder (default runs/paper_costs)")
    p.add_argument("--input-size", type=int, default=None, help="image side (default 224; 64 with --quick)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--quick", action="store_true", help="mobilenet_v2 and resnet18 only, 64x64 by default")
    p.add_argument("--cache-dir", default=None, help="profile cache (default $FEDPEFT_CACHE or ~/.cache/fedpeft)")
    p.add_argument("--no-cache", action="store_true")
    return p.parse_args(argv)


def pct_less(value: float, reference: float) -> float:
    return 100.0 * (1 - value / reference) if reference else float("nan")


def ratio(num: float, den: float) -> str:
    """A ratio as "x.y:1" (one decimal everywhere in the summary)."""
    return f"{num / den:.1f}:1" if den else "n/a"


def bwd_fwd(r: dict, convention: str) -> str:
    f = r["flops_by_convention"][convention]
    return ratio(f["backward"], f["forward"])


def depthwise_ratio(channels: int, size: int) -> dict:
    """Backward/forward FLOPs of one 3x3 depthwise conv (batch 1) in both conventions."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
    x = torch.randn(1, channels, size, size)
    fw, bw = layer_flops(conv, x, "exact")
    _, bw_paper = layer_flops(conv, x, "paper")
    return {"channels": channels, "size": size, "forward": fw, "backward_exact": bw, "backward_paper": bw_paper}


def plot_memory(results: dict, models: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [results[(model, m)] for m in methods if (model, m) in results]
        bottom = [0.0] * len(rows)
        for cat, color in zip(CATEGORY_ORDER, COLORS):
            vals = [r["memory"]["by_category"][cat] / MIB for r in rows]
            ax.bar([r["method"] for r in rows], vals, bottom=bottom, color=color, label=cat)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.scatter([r["method"] for r in rows], [r["memory"]["category_max_sum"] / MIB for r in rows],
                   marker="_", s=300, color="black", label="sum of category maxima", zorder=3)
        ax.set_title(model, fontsize=10)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.set_ylabel("MiB at the peak of one step")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Training-step memory by category (bars: at the true peak; dash: paper's sum of maxima)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_flops(results: dict, models: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 4.0), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [results[(model, m)] for m in methods if (model, m) in results]
        xs = range(len(rows))
        exact = [r["flops_by_convention"]["exact"]["total"] / 1e9 for r in rows]
        paper = [r["flops_by_convention"]["paper"]["total"] / 1e9 for r in rows]
        ax.bar([x - 0.2 for x in xs], exact, width=0.4, label="exact (groups-aware)")
        ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="paper (stock PyTorch)")
        ax.set_xticks(list(xs), [r["method"] for r in rows], rotation=60, fontsize=8)
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("GFLOPs per training step")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def largest_reductions(results: dict, models: list[str], methods: list[str]) -> dict:
    """convention -> (largest % FLOPs reduction vs fft, model, method)."""
    best = {}
    for model in models:
        for method in methods:
            if method == "fft" or (model, method) not in results or (model, "fft") not in results:
                continue
            for conv in ("exact", "paper"):
                red = pct_less(results[(model, method)]["flops_by_convention"][conv]["total"],
                               results[(model, "fft")]["flops_by_convention"][conv]["total"])
                if red > best.get(conv, (-1e9,))[0]:
                    best[conv] = (red, model, method)
    return best


def claims_table(results: dict, models: list[str], methods: list[str]) -> list[str]:
    """The paper's claims quoted by this script, beside what this run measured in both conventions.

    "exact": groups-aware FLOPs, memory at the true simultaneous peak; "paper": stock
    FlopCounterMode FLOPs, memory as the sum of each category's maximum (the paper's conventions).
    """
    with_fft = [m for m in models if (m, "fft") in results]
    depthwise = [m for m in with_fft if m.startswith("mobilenet")]
    dense = [m for m in with_fft if m.startswith("resnet")]
    rows = []
    best = largest_reductions(results, models, methods)
    if best:
        rows.append(("FLOPs reduction vs fft, largest over methods and models", "up to 95%",
                     *(f"{best[c][0]:.1f}% ({best[c][2]} on {best[c][1]})" if c in best else "n/a"
                       for c in ("exact", "paper"))))
    if depthwise:
        rows.append(("backward/forward FLOPs of a depthwise-separable net (fft step)", "~20:1",
                     *(", ".join(f"{m} {bwd_fwd(results[(m, 'fft')], c)}" for m in depthwise)
                       for c in ("exact", "paper"))))

    def mem(r: dict, conv: str) -> int:
        return r["memory"]["peak_bytes"] if conv == "exact" else r["memory"]["category_max_sum"]

    def act_share(r: dict, conv: str) -> float:
        m = r["memory"]
        # activations' own maximum over the step's total: the true peak (exact) or the sum of maxima (paper)
        return 100 * m["category_max"]["activation"] / (m["peak_bytes"] if conv == "exact" else m["category_max_sum"])

    if depthwise and dense:
        for method in ("lora", "dora", "galore"):
            if method not in methods:
                continue
            cells = []
            for conv in ("exact", "paper"):
                saved = {m: pct_less(mem(results[(m, method)], conv), mem(results[(m, "fft")], conv))
                         for m in depthwise + dense if (m, method) in results}
                if not saved:
                    cells.append("n/a")
                    continue
                text = ", ".join(f"{m} {v:.1f}%" for m, v in saved.items())
                ref = [saved[m] for m in dense if m in saved]
                mobile = [saved[m] for m in depthwise if m in saved]
                if ref and mobile and ref[0] > 0:
                    low, high = f"{min(mobile) / ref[0]:.1f}", f"{max(mobile) / ref[0]:.1f}"
                    text += f" (MobileNets save {low if low == high else low + ' to ' + high}x what {dense[0]} saves)"
                cells.append(text)
            rows.append((f"{method} memory saved vs fft: far less on MobileNets than ResNet-18",
                         "about half as memory-efficient on depthwise-separable nets", *cells))
        rows.append(("activations' share of fft's step memory (why: activations dominate on MobileNets)",
                     "activations dominate on MobileNets",
                     *(", ".join(f"{m} {act_share(results[(m, 'fft')], c):.1f}%" for m in depthwise + dense)
                       for c in ("exact", "paper"))))
    if not rows:
        return []
    out = ["| claim | seed paper reports | measured here (exact count) | measured here (paper count) |",
           "|---|---|---|---|"]
    out += [f"| {' | '.join(row)} |" for row in rows]
    out += ["", "Exact count: groups-aware FLOPs, memory at the true simultaneous peak. Paper count: PyTorch's",
            "stock FlopCounterMode FLOPs, memory as the sum of each category's own maximum (the paper's conventions).",
            "Activations' share: their own maximum over the step, divided by the true peak (exact) or by the sum",
            "of category maxima (paper). (Their share *at* the true peak can be 0: the peak may come after the",
            "backward has freed them, e.g. in the optimizer step.)",
            ""]
    return out


def summary(results: dict, models: list[str], methods: list[str], args, dw: list[dict]) -> str:
    s = args.input_size
    lines = [
        "# Training-step costs: fedpeft profiler vs the seed paper (arXiv 2507.23536)",
        "",
        f"Command: `.venv/bin/python experiments/paper_costs.py {args.command_line}`; input {s}x{s}, "
        f"batch {args.batch_size}, {args.num_classes} classes, "
        f"rank {args.rank}, alpha {args.alpha:g}, float32, torch {torch.__version__}.",
        "",
        "Memory: *peak* is the true simultaneous peak of one step (categories at that moment sum to it);",
        "*max-sum* is the sum of each category's own maximum over the step, the paper's convention (an upper bound).",
        "FLOPs: *exact* counts a grouped conv's weight gradient correctly; *paper* is PyTorch's stock",
        "FlopCounterMode formula (weight gradient of a depthwise conv x groups), the count the paper's tool gives.",
        "Reductions are relative to fft on the same model.",
        "",
    ]
    for model in models:
        if (model, "fft") not in results:
            continue
        fft = results[(model, "fft")]
        lines += [f"## {model}", "",
                  "| method | trainable | peak MiB | peak -% | max-sum MiB | max-sum -% | activation share of max-sum | "
                  "GFLOPs exact | -% | GFLOPs paper | -% | bwd/fwd exact | bwd/fwd paper |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method in methods:
            r = results.get((model, method))
            if r is None:
                continue
            m = r["memory"]
            fe, fp = r["flops_by_convention"]["exact"], r["flops_by_convention"]["paper"]
            fe0, fp0 = fft["flops_by_convention"]["exact"], fft["flops_by_convention"]["paper"]
            lines.append(
                f"| {method} | {r['params_trainable']:,} | {m['peak_bytes'] / MIB:.1f} | "
                f"{pct_less(m['peak_bytes'], fft['memory']['peak_bytes']):.1f} | {m['category_max_sum'] / MIB:.1f} | "
                f"{pct_less(m['category_max_sum'], fft['memory']['category_max_sum']):.1f} | "
                f"{100 * m['category_max']['activation'] / m['category_max_sum']:.1f}% | "
                f"{fe['total'] / 1e9:.3f} | {pct_less(fe['total'], fe0['total']):.1f} | "
                f"{fp['total'] / 1e9:.3f} | {pct_less(fp['total'], fp0['total']):.1f} | "
                f"{ratio(fe['backward'], fe['forward'])} | {ratio(fp['backward'], fp['forward'])} |"
            )
        lines.append("")

    # The claims, recomputed.
    lines += ["## Comparison with the paper", ""]
    lines += claims_table(results, models, methods)
    peft = [m for m in ("lora", "dora", "galore") if m in methods]
    for model in models:
        if (model, "fft") not in results:
            continue
        fft = results[(model, "fft")]
        act = 100 * fft["memory"]["category_max"]["activation"] / fft["memory"]["category_max_sum"]
        parts = [f"{m} {pct_less(results[(model, m)]['memory']['category_max_sum'], fft['memory']['category_max_sum']):.1f}%"
                 for m in peft if (model, m) in results]
        lines.append(f"- {model}: activations (their own max) are {act:.1f}% of fft's max-sum; memory saved vs fft "
                     f"(paper's max-sum convention): {', '.join(parts)}.")
    lines += [
        "",
        "The paper finds LoRA/DoRA/GaLore only about half as memory-efficient on depthwise-separable",
        "networks as on others: where activations dominate the step's memory, shrinking gradients and",
        "optimizer state (all PEFT changes) saves a small share. Compare the lines above: the share of",
        "activations in fft's max-sum and the savings of each PEFT method, MobileNets vs ResNet-18.",
        "",
    ]
    best = largest_reductions(results, models, methods)
    if best:
        lines.append("Largest FLOPs reduction vs fft in this run: "
                     + "; ".join(f"{conv} convention {v[0]:.1f}% ({v[2]} on {v[1]})" for conv, v in sorted(best.items()))
                     + ". The paper reports up to 95%: a reduction that large comes from the groups-unaware count,"
                       " where fft's backward is inflated by the depthwise weight gradients that adapter methods"
                       " skip (their depthwise weights are frozen).")
        lines.append("")
    lines.append("One 3x3 depthwise conv, batch 1 (backward/forward FLOPs; the input gradient included):")
    lines.append("")
    lines.append("| channels | feature map | forward | backward exact | ratio exact | backward paper | ratio paper |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|")
    for d in dw:
        lines.append(f"| {d['channels']} | {d['size']}x{d['size']} | {d['forward']:,} | {d['backward_exact']:,} | "
                     f"{ratio(d['backward_exact'], d['forward'])} | {d['backward_paper']:,} | "
                     f"{ratio(d['backward_paper'], d['forward'])} |")
    lines += ["", "The true ratio of a depthwise conv is 2:1 (1:1 where the input needs no gradient); the stock",
              "count gives (1 + channels):1. The paper's ~20:1 backward/forward ratio for depthwise-separable",
              "networks is what the stock count gives for a whole step (below), not extra work: the exact",
              "count stays near 2:1, as for dense convolutions.", ""]
    fmodels = [m for m in models if (m, "fft") in results]
    if fmodels:
        lines.append("Whole-step backward/forward ratio of fft: " + "; ".join(
            f"{m} exact {bwd_fwd(results[(m, 'fft')], 'exact')}, paper {bwd_fwd(results[(m, 'fft')], 'paper')}"
            for m in fmodels) + ".")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command_line = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.input_size is None:
        args.input_size = 64 if args.quick else 224
    models = args.models.split(",") if args.models else (["mobilenet_v2", "resnet18"] if args.quick else MODELS)
    methods = args.methods.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    failures = []
    for model in models:
        for method in methods:
            try:
                cost = profile_step(model, method, {"rank": args.rank, "alpha": args.alpha}, args.input_size,
                                    args.batch_size, args.num_classes, cache_dir=args.cache_dir,
                                    use_cache=not args.no_cache)
            except Exception as exc:  # noqa: BLE001 - one failing pair must not lose the others
                failures.append(f"{model}/{method}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                print(f"FAILED {failures[-1]}", file=sys.stderr)
                continue
            r = cost.to_dict()
            results[(model, method)] = r
            print(f"{model:<20} {method:<9} peak {r['memory']['peak_bytes'] / MIB:8.1f} MiB  "
                  f"FLOPs exact {r['flops_by_convention']['exact']['total'] / 1e9:7.3f} G  "
                  f"paper {r['flops_by_convention']['paper']['total'] / 1e9:7.3f} G  "
                  f"({r['profile_seconds']} s{', cached' if r['cached'] else ''})", flush=True)
    if not results:
        print("nothing profiled", file=sys.stderr)
        return 1
    rows = list(results.values())
    write_csv(rows, out / "costs.csv")
    (out / "costs.json").write_text(json.dumps(rows, indent=1))
    plot_memory(results, models, methods, out / "memory.png")
    plot_flops(results, models, methods, out / "flops.png")
    dw = [depthwise_ratio(c, s) for c, s in ((32, 112), (144, 56), (960, 7))]
    text = summary(results, models, methods, args, dw)
    if failures:
        text += "\n## Failed\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    (out / "summary.md").write_text(text)
    print(f"wrote {out}/costs.csv, costs.json, memory.png, flops.png, summary.md")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
