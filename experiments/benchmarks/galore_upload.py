"""GaLore's low-rank upload against LoRA's at the same rank, and how exactly the server rebuilds it.

    .venv/bin/python experiments/benchmarks/galore_upload.py [--models mobilenet_v2 resnet18] [--rank 4]
                                                             [--steps 3] [--out runs/benchmarks/galore_upload.json]

For each model (random init; bytes do not depend on the weights, the subspace property does not
either): attach GaLore, start from a small random global state, train `--steps` real GaLoreAdamW
steps on random 32x32 images, and build the round's upload (fedpeft/methods/galore_upload.py:
each projected weight as factors L (m x r), R (r x n) of its update, the rest dense). Encode it as
the fleet does (fedpeft.payload, codec none) and print:

  * galore factored / lora: wire bytes over a LoRA upload of the same rank (head trained, every
    tensor non-zero as after training); the issue's target is <= 1.2x;
  * galore factored / galore dense: over the dense upload GaLore sent before;
  * what the rest is made of: factors of the weights LoRA also adapts, factors of depthwise convs
    (LoRA leaves them frozen by default), and dense tensors (BatchNorm affine, biases);
  * the server's rebuild, sent + L @ R, against the dense delta: largest relative error per
    tensor (must be <= 1e-5; the script exits 1 otherwise).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import fedpeft  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402

from fedpeft.methods import make_method  # noqa: E402
from fedpeft.methods.galore_upload import LEFT, RIGHT, expand_upload, factored_upload  # noqa: E402
from fedpeft.models import build_model, with_batch_statistics  # noqa: E402
from fedpeft.payload import encode, record_bytes  # noqa: E402
from fedpeft.train import train  # noqa: E402

TARGET_VS_LORA = 1.2
TOLERANCE = 1e-5


def measure(model_name: str, rank: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = with_batch_statistics(build_model(model_name, num_classes=10), torch.randn(64, 3, 32, 32))
    adapter = make_method("galore", rank=rank).attach(model)
    start = {k: 0.01 * torch.randn_like(v) for k, v in adapter.delta().items()}
    adapter.load_delta(start)
    train(adapter, torch.randn(8 * steps, 3, 32, 32), torch.randint(0, 10, (8 * steps,)), batch_size=8,
          max_steps=steps)
    delta = adapter.delta()
    upload, dense_weights = factored_upload(delta, start, adapter.bases(), dict(adapter.model.named_parameters()))
    rebuilt = expand_upload(upload, start, {k: tuple(v.shape) for k, v in delta.items()})
    error = max(float((rebuilt[k] - delta[k]).norm() / max(float(delta[k].norm()), 1e-12)) for k in delta)
    lora = make_method("lora", rank=rank).attach(build_model(model_name, num_classes=10)).delta()
    lora = {k: v + 0.01 for k, v in lora.items()}  # as after training: LoRA B is no longer zero
    params = dict(adapter.model.named_parameters())
    depthwise = {k for k in adapter.projected() if params[k].dim() == 4 and params[k].shape[1] == 1}
    numel = {"factors_depthwise": 0, "factors_other": 0, "dense": 0}
    for key, value in upload.items():
        base = key.removesuffix(LEFT).removesuffix(RIGHT)
        part = "dense" if key == base else ("factors_depthwise" if base in depthwise else "factors_other")
        numel[part] += value.numel()
    factored, dense, lora_bytes = (record_bytes(encode(x)[0]) for x in (upload, delta, lora))
    return {"model": model_name, "rank": rank, "steps": steps, "galore_factored_bytes": factored,
            "galore_dense_bytes": dense, "lora_bytes": lora_bytes, "vs_lora": factored / lora_bytes,
            "vs_dense": factored / dense, "weights_sent_dense": dense_weights, "numel": numel,
            "lora_numel": sum(v.numel() for v in lora.values()), "max_relative_error": error}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="runs/benchmarks/galore_upload.json")
    args = parser.parse_args(argv)
    rows, ok = [], True
    print(f"{'model':<14}{'galore/lora':>12}{'galore/dense':>14}{'factored':>11}{'lora':>11}  "
          f"{'numel: dw factors / other factors / dense (lora)':<50}{'rebuild err':>12}")
    for name in args.models:
        r = measure(name, args.rank, args.steps)
        rows.append(r)
        ok &= r["max_relative_error"] <= TOLERANCE
        n = r["numel"]
        print(f"{name:<14}{r['vs_lora']:>11.3f}x{r['vs_dense']:>13.4f}x{r['galore_factored_bytes']:>11,}"
              f"{r['lora_bytes']:>11,}  {n['factors_depthwise']:>8,} / {n['factors_other']:>8,} / {n['dense']:>7,}"
              f" ({r['lora_numel']:,}){'':<12}{r['max_relative_error']:>12.2e}")
    for r in rows:
        verdict = "meets" if r["vs_lora"] <= TARGET_VS_LORA else "misses"
        print(f"{r['model']}: {verdict} the <= {TARGET_VS_LORA}x-of-LoRA target ({r['vs_lora']:.3f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": platform.machine(), "rows": rows},
                              indent=2) + "\n")
    print(f"rebuild within {TOLERANCE:g} relative: {'yes' if ok else 'NO'}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
