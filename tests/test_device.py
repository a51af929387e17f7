"""`--device` / RunConfig.device: profiling and local training on CUDA when asked.

The CUDA tests are skipped on a machine without a CUDA GPU (this one, CI); the others check that
the CPU path is unchanged and that asking for CUDA without one is a one-line error."""
from __future__ import annotations

import gc
import json

import pytest
import torch

from fedpeft.cli import main
from fedpeft.errors import UsageError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def lora_adapter(model_name: str = "mobilenet_v2_035", input_size: int = 32):
    from fedpeft.methods import make_method
    from fedpeft.models import build_model

    model = build_model(model_name, num_classes=10, input_size=input_size, seed=0)
    return make_method("lora", rank=4).attach(model)


# -- without a GPU ---------------------------------------------------------------------------------
def test_auto_is_cpu_without_cuda_and_cuda_is_refused():
    from fedpeft.train import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(UsageError, match="^device: cuda requested, but torch sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="^device: unknown value 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize("command", [["profile", "--model", "mobilenet_v2_035"], ["finetune"]])
def test_cli_device_cuda_without_cuda_is_one_line_exit_2(command, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device: cuda requested, but torch sees no CUDA GPU" in err


def test_cpu_profile_reports_its_device_and_keeps_its_cache_entry(tmp_path, capsys):
    from fedpeft import profiling

    args = ["profile", "--model", "mobilenet_v2_035", "--method", "bn_head", "--cache-dir", str(tmp_path),
            "--format", "json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    runs = profiling.PROFILE_RUNS
    assert main([*args, "--device", "auto" if not torch.cuda.is_available() else "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert profiling.PROFILE_RUNS == runs and again["cached"]  # the same entry: cpu is cpu however asked
    assert first["device"] == again["device"] == "cpu"
    stored = [json.loads(p.read_text()) for p in (tmp_path / "profiles").glob("*.json")]
    assert len(stored) == 1 and "device" not in stored[0]["key_fields"]  # cpu keys as before devices


def test_train_on_cpu_device_equals_train_without_one():
    from fedpeft.train import train

    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(24, 3, 32, 32, generator=gen), torch.arange(24) % 10
    results = []
    for device in (None, "cpu"):
        torch.manual_seed(0)
        adapter = lora_adapter()
        result = train(adapter, images, labels, batch_size=8, seed=1, device=device)
        results.append((result.loss, {k: v.clone() for k, v in adapter.delta().items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


# -- on a CUDA GPU ---------------------------------------------------------------------------------
def _warm_cuda_libraries(dev: torch.device) -> None:
    """cuBLAS (and cuDNN) keep per-handle workspaces outside any tensor, allocated at first use
    (the autograd thread has its own handle): allocate them before the baseline is read."""
    lin = torch.nn.Linear(256, 256, device=dev)
    conv = torch.nn.Conv2d(3, 8, 3, device=dev)
    lin(torch.randn(4, 256, device=dev)).sum().backward()
    conv(torch.randn(2, 3, 16, 16, device=dev)).sum().backward()
    del lin, conv
    torch.cuda.synchronize(dev)
    gc.collect()
    torch.cuda.empty_cache()


def _tracker_and_allocator_peaks(dev: torch.device) -> tuple[int, int]:
    """(MemTracker's peak of one LoRA step on mobilenet_v2, the CUDA allocator's peak over that step),
    both counted from before the model existed."""
    from fedpeft.profiling.memory import measure_step_memory

    _warm_cuda_libraries(dev)
    base = torch.cuda.memory_allocated(dev)
    adapter = lora_adapter("mobilenet_v2", input_size=64)
    adapter.model.to(dev)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 64, 64, generator=gen).to(dev)
    y = (torch.arange(32) % 10).to(dev)
    optimizer = adapter.optimizer(lr=1e-3)
    steps = []

    def before_step():
        adapter.train_mode()
        steps.append(1)
        if len(steps) == 2:  # the measured step (after one warm-up): the allocator's peak restarts too
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)

    memory = measure_step_memory(adapter.model, optimizer, x, y, before_step=before_step)
    torch.cuda.synchronize(dev)
    assert len(steps) == 2
    return memory.peak_bytes, torch.cuda.max_memory_allocated(dev) - base


@cuda
def test_memtracker_cuda_peak_matches_the_allocator_without_cudnn():
    """Without cuDNN every buffer of the step is a tensor MemTracker sees: within 10% of
    torch.cuda.max_memory_allocated (the bound torch's own MemTracker test uses)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    with torch.backends.cudnn.flags(enabled=False):
        tracker, allocator = _tracker_and_allocator_peaks(dev)
    print(f"no cuDNN: MemTracker peak {tracker:,} B, allocator peak {allocator:,} B, ratio {tracker / allocator:.3f}")
    assert tracker > 0 and abs(tracker / allocator - 1) <= 0.10


@cuda
def test_memtracker_cuda_peak_against_the_allocator_with_cudnn():
    """With cuDNN (what `fedpeft profile --device cuda` runs) its convolution workspaces are raw
    allocator blocks, not tensors: MemTracker's peak may only be lower than the allocator's, and it
    counts the same tensors as without cuDNN (the ratio printed is the workspaces' share)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    with torch.backends.cudnn.flags(enabled=False):
        plain, _ = _tracker_and_allocator_peaks(dev)
    tracker, allocator = _tracker_and_allocator_peaks(dev)
    print(f"cuDNN: MemTracker peak {tracker:,} B, allocator peak {allocator:,} B, ratio {tracker / allocator:.3f}; "
          f"MemTracker without cuDNN {plain:,} B")
    assert tracker <= 1.02 * allocator
    assert abs(tracker / plain - 1) <= 0.10


@cuda
def test_profile_on_cuda_counts_what_the_cpu_profile_counts(tmp_path):
    from fedpeft.profiling import profile_step

    cpu = profile_step("mobilenet_v2_035", "lora", {"rank": 4}, cache_dir=str(tmp_path))
    gpu = profile_step("mobilenet_v2_035", "lora", {"rank": 4}, cache_dir=str(tmp_path), device="cuda")
    assert (cpu.device, gpu.device) == ("cpu", "cuda") and not gpu.cached  # the device is part of the key
    assert profile_step("mobilenet_v2_035", "lora", {"rank": 4}, cache_dir=str(tmp_path), device="cuda").cached
    assert gpu.flops_by_convention == cpu.flops_by_convention  # FLOPs depend on shapes, not the device
    assert (gpu.params_total, gpu.params_trainable, gpu.payload_bytes) == \
           (cpu.params_total, cpu.params_trainable, cpu.payload_bytes)
    # Parameters are the same tensors; the CUDA allocator rounds each to a multiple of 512 bytes.
    tensors = len(list(lora_adapter().model.parameters()))
    cpu_params, gpu_params = cpu.memory["by_category"]["parameter"], gpu.memory["by_category"]["parameter"]
    assert cpu_params <= gpu_params <= cpu_params + 512 * tensors
    assert gpu.peak_bytes > 0


@cuda
def test_train_on_cuda_and_back():
    from fedpeft.train import evaluate, train

    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 3, 32, 32, generator=gen), torch.arange(64) % 10
    adapter = lora_adapter()
    before = {k: v.clone() for k, v in adapter.delta().items()}
    result = train(adapter, images, labels, epochs=2, batch_size=16, device="cuda")
    assert result.steps == 8 and torch.isfinite(torch.tensor(result.loss))
    assert all(p.device.type == "cpu" for p in adapter.model.parameters())  # back where it was
    after = adapter.delta()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    adapter.model.to("cuda")
    assert evaluate(adapter.model, images, labels).examples == 64  # batches follow the model


@cuda
@pytest.mark.slow
def test_fleet_clients_train_on_the_gpu_share_they_reserve(tmp_path):
    from fedpeft.fleet.config import RunConfig
    from fedpeft.fleet.simulation import run_fleet

    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[group]]\ndevice = "jetson_orin_nano"\ncount = 2\navailability = 1.0\n')
    cfg = RunConfig(model="mobilenet_v2_035", num_clients=2, rounds=1, pretrain_epochs=1, fleet=str(fleet),
                    trace="off", device="cuda", client_gpus=0.5, out=str(tmp_path / "run"),
                    cache_dir=str(tmp_path.parent / "fleet-cache"))
    run_fleet(cfg)
    clients = [json.loads(line) for line in (tmp_path / "run" / "clients.jsonl").read_text().splitlines()]
    assert len(clients) == 2 and all(c["status"] == "ok" for c in clients), clients
    assert all(c["train_device"].startswith("cuda") for c in clients)
