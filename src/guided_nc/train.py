"""Real-network training: ``fit(config)`` and the ``guided-nc train`` command.

One function, :func:`fit`, runs a whole experiment in the order it is read: setup, data, model
and head, optimiser, resume, the epoch loop (train, evaluate at chosen epochs, checkpoint) and
teardown. Under ``torchrun`` (``WORLD_SIZE > 1``) the same function trains with
DistributedDataParallel: every global batch is split across ranks, the heads and metrics sum their
statistics over ranks, and only rank 0 writes files.

Run folder (``config.out``)::

    config.json      resolved TrainConfig + environment versions
    metrics.csv      one row per evaluated epoch (train/test accuracy and NC metrics)
    summary.json     time per step, peak memory, epochs run (machine-dependent numbers)
    tensorboard/     SummaryWriter event files
    checkpoint.pt    model, head, optimiser, scheduler, sampler and RNG state (each epoch)
    done             written last; ``compare`` skips runs that have it
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guided_nc import distributed
from guided_nc.checkpoint import (
    atomic_write_text,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from guided_nc.config import TrainConfig, add_config_arguments
from guided_nc.heads import renormalize_heads_
from guided_nc.report import write_long_csv

__all__ = [
    "Classifier",
    "build_head_for",
    "fit",
    "peak_memory_mb",
    "register_cli",
    "training_step",
]

CHECKPOINT_NAME = "checkpoint.pt"
DONE_NAME = "done"


class Classifier(nn.Module):
    """Backbone and head as one module, so DDP synchronises the learnable head's gradient too.

    ``forward(inputs, labels=None) -> logits`` of shape (B, K); the implicit head needs the labels
    in training (class means of the batch), every head ignores them in evaluation.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(inputs), labels)


def build_backbone_for(config: TrainConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """The backbone of ``config.model`` for inputs of ``input_shape`` (C, H, W) or (L,).

    ``config.bias`` switches the biases and the norm-layer affine parameters together (off for
    AGD); ``batch_norm`` only applies to the MLP and the small CNN.
    """
    from guided_nc.models import build_backbone

    return build_backbone(
        config.model,
        input_shape=input_shape,
        affine=config.bias,
        bias=config.bias,
        width=config.width,
        depth=config.depth,
        **({"batch_norm": config.batch_norm} if config.model in ("mlp", "cnn") else {}),
    )


def build_head_for(config: TrainConfig, num_features: int, num_classes: int) -> nn.Module:
    """The head of ``config.method`` with the config's tau (and delta / DDN gradient).

    The standard head has no bias (method.md section 1), whatever ``config.bias`` says: that flag
    is about the backbone's biases and norm-layer affine parameters.
    """
    from guided_nc.heads import build_head

    options: dict[str, Any] = {"temperature": config.temperature}
    if config.method == "implicit":
        options.update(delta=config.delta, ddn_grad=config.ddn_grad)
    return build_head(config.method, num_features, num_classes, **options)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on GPU, else the process's max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use --device cpu")
        # torchrun sets LOCAL_RANK; one GPU per process.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    """Seed the global generators (model init, augmentation); samplers own their generators."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (third-party code may use it)
    torch.manual_seed(seed)


class _OnDevice:
    """Re-iterable view of a loader that moves labels to ``device`` (metrics take two passes)."""

    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for inputs, labels in self.loader:
            yield inputs, labels.to(self.device)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    inputs: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """One step: forward, cross-entropy, backward, optimiser, schedule, head re-normalisation.

    ``model`` maps ``(inputs, labels)`` to logits (B, K) (a :class:`Classifier`, possibly wrapped
    in DDP). Under DDP each rank's loss is its shard's mean and DDP averages the gradients over
    equal shards, which is the gradient of the global batch's mean loss. Returns the detached
    loss (0-dim).
    """
    logits = model(inputs, labels)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()  # per-step schedules (constant with --schedule none)
    renormalize_heads_(model)  # standard head: unit-norm rows after every step (method.md 1)
    return loss.detach()


def _gather_rank_states(state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a uint8 state tensor (e.g. a generator's), via one all-reduce sum."""
    size, rank = distributed.world_size(), distributed.rank()
    table = torch.zeros(size, state.numel(), dtype=torch.int64)
    table[rank] = state.to(torch.int64)
    distributed.all_reduce_sum(table)
    return [row.to(torch.uint8) for row in table]


def _augmentation_state(dataset) -> torch.Tensor:
    """The in-memory dataset's augmentation-generator state; empty for file-backed datasets
    (ImageFolder), whose torchvision transforms draw from torch's global generator instead."""
    if hasattr(dataset, "state_dict"):
        return dataset.state_dict()["generator"]
    return torch.empty(0, dtype=torch.uint8)


def fit(config: TrainConfig) -> Path:
    """Train ``config.model`` with the ``config.method`` head; return the run folder.

    Writes ``config.json``, ``metrics.csv`` (one row per epoch of
    :meth:`TrainConfig.eval_epoch_set`), ``summary.json``, TensorBoard events, ``checkpoint.pt``
    after each epoch, and ``done`` last. With ``config.resume`` it continues from the
    checkpoint and produces the same numbers as an uninterrupted run (same device, threads and
    number of processes). Resuming a finished run with a larger ``epochs`` (``schedule="none"``
    only) trains it further, exactly as if it had been that long from the start.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from guided_nc.data import build_datasets, build_loader
    from guided_nc.models import check_no_one_dimensional_parameters
    from guided_nc.optim import build_optimizer, build_scheduler, orthogonal_init_
    from guided_nc.sampler import StratifiedBatchSampler

    # ---------------------------------------------------------------- setup
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    if not config.resume and (checkpoint_path.exists() or (out / DONE_NAME).exists()):
        raise ValueError(
            f"out={config.out!r} already holds a run (checkpoint or done marker); pass --resume "
            "to continue it or choose another --out"
        )
    extending = False
    if config.resume and (out / "config.json").exists():
        saved = TrainConfig.load(out / "config.json")
        changed = config.resume_mismatches(saved)
        if changed:
            raise ValueError(
                f"--resume with a different configuration: {changed} differ from "
                f"{out / 'config.json'}; resume with the saved values (--epochs may only grow, "
                "and only with --schedule none) or choose another --out"
            )
        extending = config.extends(saved)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = _resolve_device(config.device)
    created_group = distributed.init_from_environment(device.type)
    writer = None
    try:
        world_size, rank = distributed.world_size(), distributed.rank()
        is_main = distributed.is_main_process()
        if config.batch_size % world_size:
            raise ValueError(
                f"batch_size={config.batch_size} is not divisible by the {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        _seed_everything(config.seed)

        # ------------------------------------------------------------ data
        # Each rank augments its own shard, from its own stream (seed, rank).
        data = build_datasets(
            config.dataset,
            root=config.data_root,
            download=config.download,
            augment=config.augment,
            long_tail=config.long_tail,
            imbalance_factor=config.imbalance_factor,
            label_noise=config.label_noise,
            seed=config.seed,
            augmentation_seed=config.seed * 1000 + rank,
        )
        num_classes = data.num_classes
        # The same global batches for every method at a seed; each rank takes a strided slice.
        sampler = StratifiedBatchSampler(
            data.train_labels, config.batch_size, config.seed, world_size, rank
        )
        train_loader = build_loader(data.train, batch_sampler=sampler)
        eval_loaders = {  # whole splits, no augmentation, sharded over ranks
            split: build_loader(
                dataset,
                batch_size=config.batch_size,
                sampler=range(rank, len(dataset), world_size),
            )
            for split, dataset in (("train", data.train_eval), ("test", data.test))
        }

        # ------------------------------------------------------------ model and head
        backbone = build_backbone_for(config, data.input_shape)
        if config.method != "standard" and backbone.num_features < num_classes:
            raise ValueError(
                f"method={config.method!r} needs feature dimension d >= number of classes K "
                f"(a simplex ETF lives in a K-dimensional subspace of R^d), but "
                f"model={config.model!r} has d={backbone.num_features} < K={num_classes}; use a "
                "wider backbone (e.g. --width) or --method standard"
            )
        head = build_head_for(config, backbone.num_features, num_classes)
        model = Classifier(backbone, head)
        if config.optimizer == "agd":
            check_no_one_dimensional_parameters(model, "AGD")
            # AGD's own initialisation (method.md section 4), from a seeded generator.
            orthogonal_init_(model.backbone, torch.Generator().manual_seed(config.seed))
        model.to(device)
        train_model: nn.Module = model
        if world_size > 1:
            if device.type == "cuda":  # global-batch statistics, as in one process
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            train_model = nn.parallel.DistributedDataParallel(model)

        # ------------------------------------------------------------ optimiser
        optimizer = build_optimizer(
            config.optimizer,
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            gain=config.gain,
        )
        steps_per_epoch = len(train_loader)
        total_steps = config.epochs * steps_per_epoch
        scheduler = build_scheduler(
            optimizer,
            config.schedule,
            total_steps=total_steps,
            step_size=max(1, total_steps // 5),  # "step": x0.1 every 20 % (release: 40 of 200)
        )

        # ------------------------------------------------------------ resume
        start_epoch, rows, timings = 0, [], []
        if config.resume and checkpoint_path.exists():
            distributed.barrier()
            state = load_checkpoint(checkpoint_path, map_location="cpu")
            if len(state["rank_states"]) != world_size:
                raise ValueError(
                    f"the checkpoint was written by {len(state['rank_states'])} processes but "
                    f"this run has {world_size}; resume with the same number of processes"
                )
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["sampler"])
            restore_rng_state(state["rng"])
            torch.set_rng_state(state["rank_states"][rank]["torch"])
            if hasattr(data.train, "load_state_dict"):  # in-memory datasets own their stream
                data.train.load_state_dict({"generator": state["rank_states"][rank]["data"]})
            start_epoch, rows, timings = state["epoch"], state["rows"], state["timings"]
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            if extending:  # the run is unfinished again until its new last epoch
                (out / DONE_NAME).unlink(missing_ok=True)
            config.save(out / "config.json")
            writer = SummaryWriter(out / "tensorboard", purge_step=start_epoch + 1)

        # ------------------------------------------------------------ loop
        eval_epochs = set(config.eval_epoch_set())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        progress = tqdm(
            total=total_steps,
            initial=start_epoch * steps_per_epoch,
            disable=not (config.progress and is_main and sys.stderr.isatty()),
            desc=f"{config.method} seed {config.seed}",
            unit="step",
        )
        for epoch in range(start_epoch + 1, config.epochs + 1):
            sampler.set_epoch(epoch)
            train_model.train()
            loss_sum = torch.zeros((), dtype=torch.float64)
            step_times = []
            for inputs, labels in train_loader:
                inputs, labels = inputs.to(device), labels.to(device)
                _synchronize(device)
                start = time.perf_counter()
                loss = training_step(train_model, optimizer, scheduler, inputs, labels)
                _synchronize(device)
                step_times.append(time.perf_counter() - start)
                loss_sum += loss.double().cpu() * labels.numel()
                progress.update()
            train_loss = distributed.all_reduce_sum(loss_sum).item() / (
                steps_per_epoch * config.batch_size
            )
            timings.append(
                {
                    "epoch": epoch,
                    "time_per_step_s": statistics.median(step_times),
                    "epoch_time_s": sum(step_times),
                    "peak_memory_mb": peak_memory_mb(device),
                }
            )

            if epoch in eval_epochs:
                # Evaluation may draw random numbers (data-loader seeds), so it runs on a forked
                # RNG: which epochs are evaluated never changes the training that follows.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    row = {
                        "epoch": epoch,
                        "train_loss": train_loss,
                        **evaluate(model, eval_loaders, num_classes, config.temperature, device),
                    }
                rows.append(row)
                if is_main:
                    # Rewritten whole each time; the rows also live in the checkpoint.
                    write_long_csv(out / "metrics.csv", rows)
                    for key, value in row.items():
                        if key != "epoch" and math.isfinite(value):
                            writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            if is_main:
                writer.add_scalar("train/loss_epoch", train_loss, epoch)
                writer.add_scalar("time/step_s", timings[-1]["time_per_step_s"], epoch)

            # Checkpoint. Per-rank states (global RNG, augmentation stream) are gathered to
            # rank 0; the barriers keep every rank from running ahead of a half-written file.
            rank_states = zip(
                _gather_rank_states(torch.get_rng_state()),
                _gather_rank_states(_augmentation_state(data.train)),
                strict=True,
            )
            distributed.barrier()
            if is_main:
                save_checkpoint(
                    checkpoint_path,
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "sampler": sampler.state_dict(),
                        "rng": capture_rng_state(),
                        "rank_states": [{"torch": t, "data": d} for t, d in rank_states],
                        "rows": rows,
                        "timings": timings,
                        "config": config.to_dict(),
                    },
                )
            distributed.barrier()
        progress.close()

        # ------------------------------------------------------------ teardown
        if is_main:
            times = [t["time_per_step_s"] for t in timings]
            summary = {
                "epochs": config.epochs,
                "world_size": world_size,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "steps_per_epoch": steps_per_epoch,
                "time_per_step_s": statistics.median(times) if times else None,
                "peak_memory_mb": max((t["peak_memory_mb"] for t in timings), default=None),
                "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "max_rss",
                "per_epoch": timings,
            }
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            atomic_write_text(out / DONE_NAME, "done\n")  # last: the run is complete
        distributed.barrier()
        return out
    finally:
        if writer is not None:
            writer.close()
        if created_group:
            distributed.destroy_process_group()


def evaluate(
    model: Classifier,
    loaders: dict[str, Any],
    num_classes: int,
    temperature: float,
    device: torch.device,
) -> dict[str, float]:
    """Accuracy and NC metrics of ``model`` in eval mode on each loader's whole split.

    Args:
        model: backbone plus head; left in eval mode.
        loaders: ``{split: loader of (inputs, labels)}``, un-augmented.
        num_classes: K.
        temperature: the head's feature norm tau (metrics see the features the head sees).
        device: where the model runs.

    Returns:
        ``{f"{split}_{key}": value}`` over :data:`guided_nc.metrics.METRIC_KEYS` (float64 sums).
    """
    from guided_nc.heads import normalize_features
    from guided_nc.metrics import collect_metrics

    model.eval()

    def features_and_logits(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = model.backbone(inputs.to(device))
        return normalize_features(features, temperature), model.head(features)

    row: dict[str, float] = {}
    for split, loader in loaders.items():
        metrics = collect_metrics(
            features_and_logits,
            _OnDevice(loader, device),
            num_classes,
            weight=model.head.weight,
            bias=model.head.bias,
            progress=False,
        )
        row.update({f"{split}_{key}": value for key, value in metrics.items()})
    return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def register_cli(subparsers) -> None:
    """Add ``guided-nc train``: every :class:`TrainConfig` field is a flag."""
    parser = subparsers.add_parser(
        "train",
        help="train a real network with a standard, fixed-ETF or implicit-ETF head",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(parser)
    parser.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    config = TrainConfig.from_namespace(args)
    out = fit(config)
    if os.environ.get("RANK", "0") == "0":  # fit has left the process group by now
        print(f"run folder: {out}")
    return 0
