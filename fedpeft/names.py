"""The names users choose from (models, methods, corruptions, ...), importable without torch.

The real registries (`fedpeft.models.MODELS`, `fedpeft.methods.METHODS`,
`fedpeft.data.corruptions.CORRUPTIONS`, ...) map these names to code that needs torch, peft and
galore-torch, which take seconds to import. The CLI's parsers, `--help` and the validation of a
run configuration only need the names, so they read them here and `fedpeft --help` or a bad
argument answers at once. `tests/test_cli_start.py` checks that every tuple below equals its
registry, so a model or method added there and forgotten here fails a test.
"""

#: fedpeft.models.MODELS
MODEL_NAMES = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "vit_tiny", "mobilenet_v2_035")
#: fedpeft.methods.METHODS
METHOD_NAMES = ("fft", "bn_head", "lora", "dora", "galore", "taskedge", "taskedge_lora")
#: fedpeft.data.corruptions.CORRUPTIONS
CORRUPTION_NAMES = ("brightness", "contrast", "gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur",
                    "defocus_blur")
#: fedpeft.data.corruptions.SEVERITIES
SEVERITIES = (1, 2, 3, 4, 5)
#: fedpeft.data.partition.SCHEMES
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")
#: fedpeft.data.tasks.TASKS
TASK_NAMES = ("shift", "unseen")
#: fedpeft.data.datasets.DATASETS
DATASET_NAMES = ("digits", "mnist5k", "cifar10")
#: fedpeft.profiling.flops.CONVENTIONS
FLOP_CONVENTIONS = ("exact", "paper")
#: fedpeft.methods.taskedge.DEFAULT_DENSITY / DEFAULT_LORA_DENSITY (TaskEdge's mask density defaults)
TASKEDGE_DENSITY = 0.001
TASKEDGE_LORA_DENSITY = 0.01
#: fedpeft.pretrain.SCHEDULES: schedule name -> its defaults (onecycle's lr is its peak, unless
#: ONECYCLE_PEAK_LR names the model). The first is the default.
PRETRAIN_SCHEDULES = {
    "onecycle": {"epochs": 12, "lr": 1e-3, "batch_size": 32},
    "legacy": {"epochs": 8, "lr": 3e-3, "batch_size": 64},
}
#: onecycle's peak learning rate per architecture, where 1e-3 is not the one to use. Held-out
#: source accuracy, digits at 32x32, 12 epochs, seed 0, one thread (2026-12-05, `OMP_NUM_THREADS=1
#: fedpeft pretrain --model M --pretrain-lr LR`): mobilenet_v2 0.9667 at 1e-2 (clean digits), 0.9422 at 5e-3, 0.6991 at 1e-3
#: (digits 0-4); mobilenet_v2_035 0.9578 at 1e-2; mobilenet_v3_small 0.9733 at 1e-3 but 0.5289 at
#: 1e-2, so it keeps 1e-3.
ONECYCLE_PEAK_LR = {"mobilenet_v2": 1e-2, "mobilenet_v2_035": 1e-2}
