"""Time per training step and peak memory of each head, measured in the same run.

A step is forward + cross-entropy + backward + optimiser step (+ the standard head's row
re-normalisation). Heads: ``standard``, ``fixed`` (fixed simplex ETF), ``implicit`` (nearest ETF
with the DDN gradient) and ``implicit-no-ddn`` (nearest ETF, gradient only through the logits and
the bias). Each head gets its own copy of the same initial backbone; repeats are interleaved
(one step of each head in turn) so machine noise hits every head alike, and the median is
reported.

Settings (paper Table 3 / Figure 5):

* ``resnet18-cifar``: ResNet18 (CIFAR stem) on random 3x32x32 images, d = 512, K = 10,
  batch 256 (``--batch-size`` smaller for a CPU); ``--no-backbone`` times the head alone.
* ``imagenet-head``: a ResNet50-ImageNet-sized head, d = 2048, K = 1000, batch 256, on free
  random features (a batch of features trained as parameters, as in the unconstrained-feature
  model); ``--backbone`` adds a ResNet50 on 3x224x224 images (a GPU job).
* ``fmnist-mlp``: the Fashion-MNIST MLP of docs/results.md (3 hidden layers of 512, batch
  norm without affine parameters) on random 1x28x28 images, d = 512, K = 10, batch 256.
* ``head``: the head alone, d = 512, K = 10 (ResNet18 on CIFAR-10's head), batch 256: forward,
  cross-entropy and backward into a leaf batch of features, no optimiser; eager and, with
  ``--compile``, ``torch.compile(head, fullgraph=True)`` too. On a CPU the implicit head also
  gets a row for its accelerator default route (``solver="newton-schulz"``,
  ``validation="deferred"``), whose operation count is what a GPU would launch.

Every table also gives the top-level aten operations of one step (``torch.profiler``, counted
after the timing): on a GPU each is at least one kernel launch and microseconds of host time,
so on a CPU the count stands in for what a GPU pays per step.

Peak memory: ``torch.cuda.max_memory_allocated`` per head on CUDA. On a CPU there is no
resettable allocator peak, so the benchmark reports the memory autograd saves for the backward
pass (unique storages packed by ``saved_tensors_hooks``): the part of the peak that differs
between heads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guided_nc.methods import TIMED_METHODS
from guided_nc.runfiles import environment_info

__all__ = ["HEADS", "SETTINGS", "add_arguments", "run"]

HEADS = TIMED_METHODS
SETTINGS = {
    # name: (backbone, image shape, d, K)
    "resnet18-cifar": ("resnet18", (3, 32, 32), 512, 10),
    "imagenet-head": ("resnet50", (3, 224, 224), 2048, 1000),
    "fmnist-mlp": ("mlp", (1, 28, 28), 512, 10),  # the MLP of docs/results.md
    "head": (None, None, 512, 10),  # the head alone: forward, loss, backward
}

#: The row of the ``head`` setting for the implicit head on the accelerator default route
#: (Newton-Schulz, deferred validation), timed and counted on the CPU.
ACCELERATOR_ROUTE = "implicit (accelerator route)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``guided-nc bench step``."""
    parser.add_argument(
        "--setting",
        choices=(*SETTINGS, "all"),
        default="all",
        help="which configuration to time (default: all)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per head")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per head first")
    parser.add_argument(
        "--heads",
        default=",".join(HEADS),
        help=f"comma-separated subset of {','.join(HEADS)}",
    )
    backbone = parser.add_mutually_exclusive_group()
    backbone.add_argument(
        "--backbone",
        dest="backbone",
        action="store_true",
        default=None,
        help="time with the backbone (default for resnet18-cifar)",
    )
    backbone.add_argument(
        "--no-backbone",
        dest="backbone",
        action="store_false",
        help="time the head on free random features (default for imagenet-head)",
    )
    parser.add_argument("--optimizer", choices=("agd", "sgd"), default="agd")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="setting head: also time torch.compile(head, fullgraph=True)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")


def _build_setting(
    setting: str, batch_size: int, with_backbone: bool, device: torch.device, seed: int
) -> tuple[nn.Module, int, torch.Tensor, torch.Tensor]:
    from guided_nc.models import build_backbone

    name, shape, num_features, num_classes = SETTINGS[setting]
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size) % num_classes
    labels = labels[torch.randperm(batch_size, generator=generator)]
    if with_backbone:
        torch.manual_seed(seed)
        backbone = build_backbone(name, input_shape=shape, affine=False, bias=False)
        inputs = torch.randn(batch_size, *shape, generator=generator)
    else:
        from guided_nc.models import FreeFeatures

        # A batch of features trained as parameters; the "inputs" are its sample indices.
        backbone = FreeFeatures(torch.randn(batch_size, num_features, generator=generator))
        inputs = torch.arange(batch_size)
    if backbone.num_features != num_features:
        raise RuntimeError(f"{name} has d={backbone.num_features}, expected {num_features}")
    return backbone.to(device), num_classes, inputs.to(device), labels.to(device)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a markdown table per setting; return 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError(
            f"batch_size={args.batch_size}, repeats={args.repeats}, warmup={args.warmup}: "
            "need batch_size >= 1, repeats >= 1, warmup >= 0"
        )
    device_name = args.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    heads = tuple(h for h in args.heads.split(",") if h)
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    report: dict[str, Any] = {
        "machine": {**environment_info(), "device": str(device)},
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "optimizer": args.optimizer,
        "settings": {},
    }
    for setting in settings:
        if setting == "head":
            _run_head_alone(args, heads, device, report)
            continue
        with_backbone = args.backbone
        if with_backbone is None:
            with_backbone = setting != "imagenet-head"
        backbone, num_classes, inputs, labels = _build_setting(
            setting, args.batch_size, with_backbone, device, args.seed
        )
        from guided_nc.timing import measure_heads  # deferred: the CLI's --help stays quick

        results = measure_heads(
            backbone,
            num_classes,
            inputs,
            labels,
            methods=heads,
            repeats=args.repeats,
            warmup=args.warmup,
            optimizer_name=args.optimizer,
        )
        report["settings"][setting] = {"backbone": with_backbone, "heads": results}
        print(f"\n{setting} (backbone: {with_backbone}, batch {args.batch_size}, {device})")
        print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _run_head_alone(args: argparse.Namespace, heads: tuple[str, ...], device, report) -> None:
    """The ``head`` setting: eager (and compiled) head steps, printed and added to ``report``."""
    _, _, num_features, num_classes = SETTINGS["head"]
    modes = (False, True) if args.compile else (False,)
    for compiled in modes:
        results = measure_head_alone(
            num_features,
            num_classes,
            args.batch_size,
            heads,
            repeats=args.repeats,
            warmup=args.warmup,
            compiled=compiled,
            device=device,
            seed=args.seed,
        )
        name = "head-compiled" if compiled else "head"
        report["settings"][name] = {"backbone": False, "heads": results}
        kind = "torch.compile(fullgraph=True)" if compiled else "eager"
        size = f"d={num_features} K={num_classes}"
        print(f"\nhead alone, {size} ({kind}, batch {args.batch_size}, {device})")
        print(format_table(results))


def measure_head_alone(
    num_features: int,
    num_classes: int,
    batch_size: int,
    methods: tuple[str, ...],
    *,
    repeats: int,
    warmup: int,
    compiled: bool = False,
    device: torch.device | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Interleaved time and top-level operations of one head step: forward, cross-entropy and
    backward into a (B, d) leaf batch, as a head costs inside any model (no optimiser).

    Returns :func:`guided_nc.timing.summarize_times` of the steps (ratios to ``standard``) with
    ``ops_per_step`` added (eager ops even for compiled heads: the count is of the eager step).
    """
    import functools

    import torch.nn.functional as F

    from guided_nc.heads import build_head
    from guided_nc.timing import count_top_level_ops, summarize_times, time_steps

    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(batch_size, num_features, generator=generator).to(device)
    labels = (torch.arange(batch_size) % num_classes).to(device)
    heads = {}
    for name in methods:
        torch.manual_seed(seed)
        heads[name] = build_head(name, num_features, num_classes).to(device).train()
        if name == "implicit" and device.type == "cpu":
            # What the same head runs on an accelerator (solver="auto" and validation="auto"
            # resolve to these there): its operation count is what a GPU would launch.
            heads[ACCELERATOR_ROUTE] = build_head(
                name, num_features, num_classes, solver="newton-schulz", validation="deferred"
            ).train()

    def step(module) -> None:
        features = batch.clone().requires_grad_(True)
        F.cross_entropy(module(features, labels), labels).backward()

    ops = {name: None for name in heads}
    for name, head in heads.items():
        step(head)
        ops[name] = count_top_level_ops(lambda head=head: step(head))
    runners = {
        name: functools.partial(step, torch.compile(head, fullgraph=True) if compiled else head)
        for name, head in heads.items()
    }
    results = time_steps(runners, repeats, warmup, device=device)
    summary = summarize_times(results)
    for name in summary:
        summary[name]["ops_per_step"] = ops[name]
    return summary


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: head, median time per step [min, max], ratio to standard, peak memory."""
    lines = [
        "| head | time per step (s), median [min, max] | / standard | top-level ops per step "
        "| memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = r.get("ratio")
        shown = "-" if ratio is None else f"{ratio:.2f}x ({r['overhead_percent']:+.1f} %)"
        peak = r["peak_memory_mb"]
        memory = "-" if peak is None else f"{peak:.1f} ({r['memory_kind']})"
        lines.append(
            f"| {name} | {r['time_per_step_s']:.4f} [{r['time_min_s']:.4f}, "
            f"{r['time_max_s']:.4f}] | {shown} | {r.get('ops_per_step', '-')} "
            f"| {memory} |"
        )
    return "\n".join(lines)
