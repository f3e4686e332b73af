"""Named presets: paper setups and a tiny ``quick`` one. Any flag overrides them."""

from __future__ import annotations

from .errors import UsageError

PRESETS: dict[str, dict] = {
    "quick": {
        "_about": "tiny LeNet-300-100 lottery run on Fashion-MNIST for demos and tests",
        "model": "lenet_300_100",
        "dataset": "fashion_mnist",
        "init": "xavier_normal",
        "optimizer": "adam",
        "lr": 1.2e-3,
        "batch_size": 60,
        "steps": "400it",
        "eval_every": "100it",
        "prune_fraction": 0.2,
        "output_prune_fraction": 0.1,
        "scope": "layerwise",
        "levels": 4,
    },
    "lenet_fashion": {
        "_about": "LeNet-300-100 of the lottery ticket paper (Frankle & Carbin 2019), "
        "on Fashion-MNIST",
        "model": "lenet_300_100",
        "dataset": "fashion_mnist",
        "init": "xavier_normal",
        "optimizer": "adam",
        "lr": 1.2e-3,
        "batch_size": 60,
        "steps": "50000it",
        "eval_every": "100it",
        "prune_fraction": 0.2,
        "output_prune_fraction": 0.1,
        "scope": "layerwise",
        "levels": 20,
    },
    "conv2_cifar": {
        "_about": "Conv-2 of the lottery ticket paper on CIFAR-10: conv 10%, fc 20%, output 10%",
        "model": "conv2",
        "dataset": "cifar10",
        "augment": False,
        "init": "xavier_normal",
        "optimizer": "adam",
        "lr": 2e-4,
        "batch_size": 60,
        "steps": "20000it",
        "eval_every": "100it",
        "prune_fraction": 0.2,
        "conv_prune_fraction": 0.1,
        "output_prune_fraction": 0.1,
        "scope": "layerwise",
        "levels": 20,
    },
    "resnet20_cifar": {
        "_about": "ResNet-20 on CIFAR-10 with the OpenLTH defaults: SGD 0.1, 160 epochs, "
        "global 20%, output layer dense, crop+flip augmentation",
        "model": "resnet20",
        "dataset": "cifar10",
        "augment": True,
        "init": "kaiming_normal",
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "steps": "160ep",
        "schedule": "step",
        "milestones": ("80ep", "120ep"),
        "gamma": 0.1,
        "eval_every": "1ep",
        "prune_fraction": 0.2,
        "scope": "global",
        "dense_layers": ("output",),
        "levels": 20,
    },
    "resnet50_imagenet": {
        "_about": "ResNet-50 on ImageNet as OpenLTH sets it up (Frankle et al. 2020): SGD 0.4 "
        "with momentum at global batch 1024, 5 epochs of warmup, x0.1 at epochs 30/60/80 of 90, "
        "weight decay 1e-4, global 20% per level; an image folder (--data-dir with train/ and "
        "val/) read by DataLoader workers, 224x224 random-resized crops and flips; run it "
        "under torchrun",
        "model": "resnet50",
        "dataset": "imagefolder",
        "augment": True,
        "image_size": 224,
        "workers": 8,
        "init": "kaiming_normal",
        "optimizer": "sgd",
        "lr": 0.4,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 1024,
        "steps": "90ep",
        "warmup": "5ep",
        "schedule": "step",
        "milestones": ("30ep", "60ep", "80ep"),
        "gamma": 0.1,
        "eval_every": "1ep",
        "prune_fraction": 0.2,
        "scope": "global",
        "levels": 10,
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}'; choose from: {', '.join(PRESETS)}")
    return {k: v for k, v in PRESETS[name].items() if not k.startswith("_")}


def describe_presets() -> list[dict]:
    """Each preset's full settings: its own values over the spec defaults."""
    from .spec import Spec

    hidden = {"method", "data_dir", "runs_dir", "quiet"}
    rows = []
    for name, p in PRESETS.items():
        full = Spec(**preset(name)).__dict__
        rows.append(
            {
                "name": name,
                "about": p["_about"],
                **{k: v for k, v in full.items() if k not in hidden},
            }
        )
    return rows
