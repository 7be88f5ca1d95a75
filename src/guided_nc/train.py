"""Real-network training: ``fit(config)``, one loop readable in a sitting.

:func:`fit` runs a whole experiment in the order it is read: the run folder, setup, data, model
and head, optimiser, resume, the epoch loop (train, evaluate at chosen epochs, checkpoint) and
teardown; each stage is a small named function below it. Under ``torchrun`` (``WORLD_SIZE >
1``) the same function trains with DistributedDataParallel: every global batch is split across
ranks, the heads and metrics sum their statistics over ranks, and only rank 0 writes files.

Run folder (``config.out``)::

    kind             "train", written first (see guided_nc.runfiles.check_kind)
    config.json      resolved TrainConfig + environment versions
    metrics.csv      one row per evaluated epoch (train/test accuracy and NC metrics)
    summary.json     time per step, peak memory, epochs run (machine-dependent numbers)
    tensorboard/     SummaryWriter event files
    checkpoint.pt    model, head, optimiser, scheduler, sampler and RNG state (each epoch)
    done             written last (JSON); ``compare`` skips runs that have it
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from guided_nc import distributed
from guided_nc.catalog import CUSTOM
from guided_nc.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from guided_nc.config import TrainConfig
from guided_nc.progress import LOGGER, Progress
from guided_nc.runfiles import (
    DONE_NAME,
    DiskError,
    RunFolderLocked,
    RunLock,
    atomic_write_json,
    check_kind,
    mark_done,
    mark_kind,
    remove_stale_temporaries,
    save_npy,
    write_long_csv,
)
from guided_nc.runtime import peak_memory_mb, resolve_device, seed_everything, synchronize
from guided_nc.timing import build_loss, build_optimizer_for, check_deferred, training_step

__all__ = [
    "FitResult",
    "build_backbone_for",
    "build_head_for",
    "evaluate",
    "fit",
    "load_run",
    "train_model",
]

CHECKPOINT_NAME = "checkpoint.pt"

#: What a training checkpoint must hold to be resumed.
CHECKPOINT_KEYS = (
    "epoch",
    "model",
    "optimizer",
    "scheduler",
    "sampler",
    "rng",
    "rank_states",
    "rows",
    "timings",
    "config",
)


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
    """The head of ``config.method`` with the config's head settings
    (:meth:`TrainConfig.head_settings`; a Haar rotation is drawn from a generator seeded by
    ``config.seed``), through the one builder :func:`guided_nc.heads.build_head`.

    The standard head has no bias (method.md section 1), whatever ``config.bias`` says: that flag
    is about the backbone's biases and norm-layer affine parameters.
    """
    from guided_nc.heads import build_head

    return build_head(
        config.method,
        num_features,
        num_classes,
        config.head_settings(),
        generator=torch.Generator().manual_seed(config.seed),
    )


class _OnDevice:
    """Re-iterable view of a loader that moves labels to ``device`` (metrics take two passes)."""

    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for inputs, labels in self.loader:
            yield inputs, labels.to(self.device)


@dataclass
class _Data:
    """What the loop needs of the data: the splits, the sampler and the loaders."""

    splits: Any  # guided_nc.data.DataSplits
    sampler: Any  # guided_nc.sampler.StratifiedBatchSampler
    train_loader: Any
    eval_loaders: dict[str, Any]


def fit(
    config: TrainConfig,
    *,
    backbone: nn.Module | None = None,
    data: Any = None,
    loss_fn: Any = None,
) -> Path:
    """Train ``config.model`` with the ``config.method`` head; return the run folder.

    See :func:`_fit` (which also returns the trained model; :func:`train_model` does, and
    :func:`load_run` rebuilds it from the folder).
    """
    return _fit(config, backbone=backbone, data=data, loss_fn=loss_fn)[0]


def _fit(
    config: TrainConfig,
    *,
    backbone: nn.Module | None = None,
    data: Any = None,
    loss_fn: Any = None,
) -> tuple[Path, nn.Module]:
    """Train ``config.model`` with the ``config.method`` head; return the run folder and the
    trained :class:`guided_nc.models.Classifier` (this rank's copy, unwrapped from DDP).

    Writes ``config.json``, ``metrics.csv`` (one row per epoch of
    :meth:`TrainConfig.eval_epoch_set`), ``summary.json``, TensorBoard events, ``checkpoint.pt``
    after each epoch, and ``done`` last. With ``config.resume`` it continues from the
    checkpoint and produces the same numbers as an uninterrupted run (same device, threads and
    number of processes). Resuming a finished run with a larger ``epochs`` (``schedule="none"``
    only) trains it further, exactly as if it had been that long from the start.

    Args:
        config: the run.
        backbone: your own module mapping inputs to (B, d) features, instead of
            ``config.model`` (then ``model="custom"``); d is its ``num_features`` attribute, or
            found by one forward pass. See :func:`train_model`.
        data: your own :class:`guided_nc.data.DataSplits` (e.g. ``DataSplits.from_datasets``)
            instead of ``config.dataset`` (then ``dataset="custom"``).
        loss_fn: ``(logits, labels) -> scalar`` instead of ``config.loss``.
    """
    _check_custom(config, backbone, data)
    out = Path(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    created_group = distributed.init_from_environment(device.type)
    writer, lock = None, None
    try:
        lock = _lock_run_folder(out, device)
        state, extending = _check_run_folder(config)
        world_size, rank = distributed.world_size(), distributed.rank()
        is_main = distributed.is_main_process()
        if config.batch_size % world_size:
            raise ValueError(
                f"batch_size={config.batch_size} is not divisible by the {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        seed_everything(config.seed)
        data = _build_data(config, rank, world_size, data)
        model, trained = _build_model(config, data.splits, device, world_size, backbone)
        optimizer, scheduler = _build_optimizer(config, model, len(data.train_loader))
        if loss_fn is None:
            loss_fn = build_loss(config.loss, config.label_smoothing)

        start_epoch, rows, timings = 0, [], []
        if state is not None:
            start_epoch, rows, timings = _restore(
                state, model, optimizer, scheduler, data, world_size, rank
            )
        steps_per_epoch = len(data.train_loader)
        if is_main:
            writer = _open_run_folder(config, start_epoch * steps_per_epoch, extending)
        _announce(config, model, data, device, world_size, start_epoch, steps_per_epoch)

        started = time.perf_counter()
        eval_epochs = set(config.eval_epoch_set())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        progress = Progress(
            config.epochs * steps_per_epoch,
            f"{config.method} seed {config.seed}",
            enabled=config.progress and is_main,
            initial=start_epoch * steps_per_epoch,
        )
        for epoch in range(start_epoch + 1, config.epochs + 1):
            data.sampler.set_epoch(epoch)
            loss, accuracy, step_times, step_log = _train_epoch(
                trained, optimizer, scheduler, data.train_loader, device, progress, loss_fn
            )
            timings.append(_epoch_timing(epoch, step_times, device))
            if epoch in eval_epochs:
                row, margins = _evaluate_epoch(config, model, data, device, epoch, loss)
                rows.append(row)
                if is_main:
                    write_long_csv(out / "metrics.csv", rows)  # rewritten whole
                    if margins is not None:  # the last epoch: per-sample train margins
                        save_npy(out / "final_margins.npy", margins.astype(np.float32))
            if is_main:
                row = rows[-1] if rows and rows[-1]["epoch"] == epoch else None
                _log_epoch(writer, epoch, steps_per_epoch, step_log, loss, accuracy, timings, row)
            progress.log(f"epoch {epoch}/{config.epochs}", loss=loss, acc=accuracy)
            state = (model, optimizer, scheduler, data, epoch, rows, timings)
            _checkpoint(out / CHECKPOINT_NAME, config, *state)
        progress.close()

        if is_main:
            atomic_write_json(out / "summary.json", _summary(config, timings, device, data))
            mark_done(out, config.to_dict(), time.perf_counter() - started)  # last
        distributed.barrier()
        return out, model.eval()
    finally:
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.release()
        if created_group:
            distributed.destroy_process_group()


# --- the stages of fit, in the order fit calls them ----------------------------------------------


def _check_custom(config: TrainConfig, backbone, data) -> None:
    """``model``/``dataset`` say "custom" exactly when a backbone/data is passed."""
    for name, given in (("model", backbone), ("dataset", data)):
        custom = getattr(config, name) == CUSTOM
        if custom and given is None:
            raise ValueError(
                f"{name}={CUSTOM!r} but no {'backbone' if name == 'model' else 'data'} was "
                f"passed; pass it to fit/train_model, or name a built-in {name}"
            )
        if given is not None and not custom:
            raise ValueError(
                f"a {'backbone' if name == 'model' else 'data'} was passed but "
                f"{name}={getattr(config, name)!r}; set {name}={CUSTOM!r} (train_model does)"
            )


def _lock_run_folder(out: Path, device: torch.device) -> RunLock | None:
    """Rank 0 locks the run folder and removes temp files an earlier kill left in it.

    Every rank learns whether it worked (one all-reduce), so that all of them stop together
    with the same error instead of waiting for a rank that gave up.
    """
    lock, error = None, None
    if distributed.is_main_process():
        try:
            lock = RunLock(out).acquire()
            remove_stale_temporaries(out)
        except (RunFolderLocked, DiskError) as caught:
            error = caught
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    if distributed.all_reduce_sum(flag).item() > 0:
        raise error or RunFolderLocked(f"rank 0 could not lock the run folder {str(out)!r}")
    return lock


def _check_run_folder(config: TrainConfig) -> tuple[dict[str, Any] | None, bool]:
    """Apply the kind and resume rules; returns (the checkpoint to resume from or None,
    extending).

    * a folder of another kind (a ufm or compare folder, ...) is an error;
    * without ``--resume``: a folder that holds a run (checkpoint or done) is an error;
    * ``--resume``: the checkpoint must exist, be readable and hold a run with the same
      configuration as the one requested (both the checkpoint's own copy and ``config.json``
      are compared; ``--epochs`` may only grow, with ``--schedule none``);
    * ``--resume-or-start``: the same when there is a checkpoint, else a new run (said on
      stderr).

    ``extending`` is True when a finished run is resumed with a larger ``epochs``.
    """
    out = Path(config.out)
    check_kind(out, "train")
    checkpoint = out / CHECKPOINT_NAME
    resuming = config.resume or config.resume_or_start
    if not resuming and (checkpoint.exists() or (out / DONE_NAME).exists()):
        raise ValueError(
            f"out={config.out!r} already holds a run (checkpoint or done marker); pass --resume "
            "to continue it or choose another --out"
        )
    if not resuming:
        return None, False
    if not checkpoint.exists():
        where = "does not exist" if not out.exists() else f"holds no {CHECKPOINT_NAME}"
        if config.resume:
            raise FileNotFoundError(
                f"--resume, but the run folder {str(out)!r} {where}: nothing to resume. Check "
                "--out, drop --resume to start a new run, or pass --resume-or-start to start "
                "one whenever there is no checkpoint"
            )
        LOGGER.warning("--resume-or-start: %s %s; starting a new run", out, where)
        return None, False
    state = load_checkpoint(checkpoint, map_location="cpu", required_keys=CHECKPOINT_KEYS)
    _check_finite_weights(checkpoint, state["model"])
    saved = [(f"the checkpoint {checkpoint}", TrainConfig.from_dict(state["config"]))]
    if (out / "config.json").exists():
        saved.append((str(out / "config.json"), TrainConfig.load(out / "config.json")))
    for where, previous in saved:
        changed = config.resume_mismatches(previous)
        if changed:
            values = ", ".join(
                f"{key}: {getattr(previous, key)!r} there, {getattr(config, key)!r} now"
                for key in changed
            )
            raise ValueError(
                f"--resume with a different configuration: {changed} differ from {where} "
                f"({values}); resume with the saved values (--epochs may only grow, and only "
                "with --schedule none) or choose another --out"
            )
    return state, config.extends(saved[0][1])


def _check_finite_weights(path: Path, model_state: dict[str, Any]) -> None:
    """A checkpoint whose model holds NaN or Inf cannot be resumed (training never writes one:
    the heads and AGD refuse non-finite steps), so the file itself is at fault."""
    bad = [
        key
        for key, value in model_state.items()
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all()
    ]
    if bad:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: its model holds NaN or Inf values in "
            f"{bad[:3]}{' ...' if len(bad) > 3 else ''} (the file was changed after it was "
            "written). Delete it to restart the run from scratch, or restore the file from a "
            "backup"
        )


def _build_data(config: TrainConfig, rank: int, world_size: int, splits=None) -> _Data:
    """Datasets (built-in, or the caller's ``splits``), the stratified sampler (the same global
    batches for every method at a seed; each rank takes a strided slice) and the loaders
    (evaluation: whole splits, sharded)."""
    from guided_nc.data import build_datasets, build_loader
    from guided_nc.sampler import StratifiedBatchSampler

    if splits is None:
        splits = build_datasets(
            config.dataset,
            root=config.data_root,
            download=config.download,
            augment=config.augment,
            long_tail=config.long_tail,
            imbalance_factor=config.imbalance_factor,
            label_noise=config.label_noise,
            seed=config.seed,
            augmentation_seed=config.seed * 1000 + rank,  # each rank augments its own stream
        )
    sampler = StratifiedBatchSampler(
        splits.train_labels, config.batch_size, config.seed, world_size, rank
    )
    eval_loaders = {
        split: build_loader(
            dataset, batch_size=config.batch_size, sampler=range(rank, len(dataset), world_size)
        )
        for split, dataset in (("train", splits.train_eval), ("test", splits.test))
        if dataset is not None
    }
    return _Data(splits, sampler, build_loader(splits.train, batch_sampler=sampler), eval_loaders)


def _build_model(
    config: TrainConfig, splits, device: torch.device, world_size: int, backbone=None
) -> tuple[nn.Module, nn.Module]:
    """Backbone (built-in, or the caller's) and head as one :class:`guided_nc.models.Classifier`
    (AGD's orthogonal init from a seeded generator), on ``device``; and the module to train
    (DDP-wrapped with >1 process)."""
    from guided_nc.models import Classifier, check_no_one_dimensional_parameters
    from guided_nc.optim import orthogonal_init_

    if backbone is None:
        backbone = build_backbone_for(config, splits.input_shape)
    else:
        _feature_width(backbone, splits)
    if config.method != "standard" and backbone.num_features < splits.num_classes:
        raise ValueError(
            f"method={config.method!r} needs feature dimension d >= number of classes K "
            f"(a simplex ETF lives in a K-dimensional subspace of R^d), but "
            f"model={config.model!r} has d={backbone.num_features} < K={splits.num_classes}; "
            "use a wider backbone (e.g. --width) or --method standard"
        )
    model = Classifier(backbone, build_head_for(config, backbone.num_features, splits.num_classes))
    if config.optimizer == "agd":
        check_no_one_dimensional_parameters(model, "AGD")
        if config.agd_init:
            orthogonal_init_(model.backbone, torch.Generator().manual_seed(config.seed))
    model.to(device)
    if world_size == 1:
        return model, model
    if device.type == "cuda":  # global-batch statistics, as in one process
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, nn.parallel.DistributedDataParallel(model)


def _feature_width(backbone: nn.Module, splits) -> int:
    """d of a caller's backbone: its ``num_features``, else one forward pass (set on it)."""
    width = getattr(backbone, "num_features", None)
    if not isinstance(width, int):
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            features = backbone(splits.train[0][0].unsqueeze(0))
        backbone.train(was_training)
        if features.dim() != 2:
            raise ValueError(
                f"the backbone returns shape {tuple(features.shape)} for one input; it must "
                "return (batch, d) features (flatten them, e.g. end with nn.Flatten())"
            )
        width = features.shape[1]
        backbone.num_features = width
    return width


def _build_optimizer(config: TrainConfig, model: nn.Module, steps_per_epoch: int):
    """The optimiser over the trainable parameters and its per-step schedule."""
    from guided_nc.optim import build_scheduler

    optimizer = build_optimizer_for(config, model)
    total_steps = config.epochs * steps_per_epoch
    scheduler = build_scheduler(
        optimizer,
        config.schedule,
        total_steps=total_steps,
        step_size=max(1, total_steps // 5),  # "step": x0.1 every 20 % (release: 40 of 200)
    )
    return optimizer, scheduler


def _restore(state, model, optimizer, scheduler, data: _Data, world_size: int, rank: int):
    """Restore every state of a loaded checkpoint; returns (epoch, metrics rows, timings)."""
    if len(state["rank_states"]) != world_size:
        raise ValueError(
            f"the checkpoint was written by {len(state['rank_states'])} processes but "
            f"this run has {world_size}; resume with the same number of processes"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    data.sampler.load_state_dict(state["sampler"])
    restore_rng_state(state["rng"])
    torch.set_rng_state(state["rank_states"][rank]["torch"])
    if hasattr(data.splits.train, "load_state_dict"):  # in-memory datasets own their stream
        data.splits.train.load_state_dict({"generator": state["rank_states"][rank]["data"]})
    return state["epoch"], state["rows"], state["timings"]


def _open_run_folder(config: TrainConfig, start_step: int, extending: bool):
    """Rank 0: create the folder, write config.json, open TensorBoard (events after
    ``start_step``, the optimiser steps already done, are purged: a resumed run rewrites them)
    and write the hparams; returns the writer."""
    from torch.utils.tensorboard import SummaryWriter

    out = mark_kind(config.out, "train")  # the folder's first write
    if extending:  # the run is unfinished again until its new last epoch
        (out / DONE_NAME).unlink(missing_ok=True)
    config.save(out / "config.json")
    writer = SummaryWriter(out / "tensorboard", purge_step=start_step + 1)
    _write_hparams(writer, config)
    return writer


#: The evaluation keys the TensorBoard HParams view shows next to the configuration.
HPARAM_METRICS = ("eval/train_acc1", "eval/test_acc1", "eval/train_nc1", "eval/test_nc1")


def _write_hparams(writer, config: TrainConfig) -> None:
    """The configuration as TensorBoard hparams, in the run's own event file (SummaryWriter's
    ``add_hparams`` would open a sub-run); the metrics are the ``eval/`` scalars of the run."""
    from torch.utils.tensorboard.summary import hparams

    values = {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in config.to_dict().items()
    }
    for summary in hparams(values, dict.fromkeys(HPARAM_METRICS, 0.0)):
        writer.file_writer.add_summary(summary)


def _announce(config, model, data: _Data, device, world_size, start_epoch, steps_per_epoch):
    """Rank 0 logs the resolved configuration and the numbers derived from it (nanoGPT does)."""
    if not distributed.is_main_process():
        return
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    settings = ", ".join(f"{key}={value}" for key, value in config.to_dict().items())
    verb = "resuming" if start_epoch else "starting"
    LOGGER.info("%s run %s: %s", verb, config.out, settings)
    LOGGER.info(
        "derived: K=%d, d=%d, %d training samples, %d steps/epoch x %d epochs, batch %d (%d "
        "per process x %d), %s trainable parameters, device %s, %d threads, from epoch %d",
        data.splits.num_classes,
        model.backbone.num_features,
        len(data.splits.train_labels),
        steps_per_epoch,
        config.epochs,
        config.batch_size,
        config.batch_size // world_size,
        world_size,
        f"{parameters:,}",
        device,
        torch.get_num_threads(),
        start_epoch + 1,
    )


def _train_epoch(trained, optimizer, scheduler, loader, device, progress: Progress, loss_fn):
    """One epoch of :func:`guided_nc.timing.training_step`; returns (mean loss, train top-1 %,
    per-step seconds, per-step log), the first two over the global batch (all ranks); the log
    maps ``step/loss`` (the global batch's), ``step/lr`` and, with AGD, ``step/agd_eta`` to one
    value per step."""
    trained.train()
    # Sums stay on the device (no host read per step); one all-reduce and one read per epoch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    step_times, step_losses, step_sizes, rates = [], [], [], []
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        rates.append(float(optimizer.param_groups[0]["lr"]))  # the step's learning rate
        synchronize(device)
        start = time.perf_counter()
        loss, correct = training_step(
            trained, optimizer, inputs, labels, scheduler=scheduler, loss_fn=loss_fn
        )
        step_losses.append(loss.double())
        eta = getattr(optimizer, "last_eta", None)  # AGD's automatic step size
        if eta is not None:
            step_sizes.append(eta.double())
        synchronize(device)
        step_times.append(time.perf_counter() - start)
        loss_sum += loss.double() * labels.numel()
        correct_sum += correct
        count += labels.numel()
        progress.update()
    check_deferred(trained, optimizer)  # a deferred rejection surfaces here, once an epoch
    totals = torch.stack([loss_sum, correct_sum, loss_sum.new_tensor(float(count))])
    total_loss, total_correct, total = distributed.all_reduce_sum(totals).tolist()
    # Per-step losses: each rank's shard mean, averaged over the (equal) shards = the global
    # batch's mean loss; one all-reduce and one read per epoch.
    losses = distributed.all_reduce_sum(torch.stack(step_losses)) / distributed.world_size()
    step_log = {"step/loss": losses.tolist(), "step/lr": rates}
    if step_sizes:
        step_log["step/agd_eta"] = torch.stack(step_sizes).tolist()
    return total_loss / total, 100.0 * total_correct / total, step_times, step_log


def _epoch_timing(epoch: int, step_times: list[float], device: torch.device) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "time_per_step_s": statistics.median(step_times),
        "epoch_time_s": sum(step_times),
        "peak_memory_mb": peak_memory_mb(device),
    }


def _evaluate_epoch(config, model, data: _Data, device, epoch: int, train_loss: float):
    """The metrics.csv row of an evaluated epoch, and at the last epoch the per-sample cosine
    margins of the training split (else None).

    Evaluation may draw random numbers (data-loader seeds), so it runs on a forked RNG: which
    epochs are evaluated never changes the training that follows.
    """
    last = epoch == config.epochs
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        metrics, margins = evaluate(
            model,
            data.eval_loaders,
            data.splits.num_classes,
            device,
            margins_of="train" if last else "",
        )
    return {"epoch": epoch, "train_loss": train_loss, **metrics}, margins


def _log_epoch(writer, epoch, steps_per_epoch, step_log, loss, accuracy, timings, row) -> None:
    """TensorBoard, on one x-axis (optimiser steps): per step ``step/loss``, ``step/lr`` (and
    ``step/agd_eta``); at the epoch's last step the figures of the training pass,
    ``running/train_loss`` and ``running/train_acc1`` (averaged over the epoch's steps, with
    augmentation and a changing model), ``time/step_s``, ``epoch``, and on evaluated epochs
    the evaluation pass's ``eval/<split>_<key>`` (``eval/train_acc1``: the model at the epoch's
    end on the un-augmented split, as metrics.csv)."""
    first = (epoch - 1) * steps_per_epoch + 1
    for tag, values in step_log.items():
        for offset, value in enumerate(values):
            writer.add_scalar(tag, value, first + offset)
    last = epoch * steps_per_epoch
    writer.add_scalar("running/train_loss", loss, last)
    writer.add_scalar("running/train_acc1", accuracy, last)
    writer.add_scalar("time/step_s", timings[-1]["time_per_step_s"], last)
    writer.add_scalar("epoch", epoch, last)
    for key, value in (row or {}).items():
        if key not in ("epoch", "train_loss") and math.isfinite(value):
            writer.add_scalar(f"eval/{key}", value, last)


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


def _checkpoint(path, config, model, optimizer, scheduler, data: _Data, epoch, rows, timings):
    """Save everything a resumed run needs. Per-rank states (global RNG, augmentation stream)
    are gathered to rank 0; the barriers keep every rank from running ahead of a half-written
    file."""
    rank_states = zip(
        _gather_rank_states(torch.get_rng_state()),
        _gather_rank_states(_augmentation_state(data.splits.train)),
        strict=True,
    )
    distributed.barrier()
    if distributed.is_main_process():
        save_checkpoint(
            path,
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": data.sampler.state_dict(),
                "rng": capture_rng_state(),
                "rank_states": [{"torch": t, "data": d} for t, d in rank_states],
                "rows": rows,
                "timings": timings,
                "config": config.to_dict(),
                # What load_run needs to rebuild the model without the data.
                "input_shape": list(data.splits.input_shape),
                "num_classes": data.splits.num_classes,
            },
        )
    distributed.barrier()


def _summary(config, timings, device, data: _Data) -> dict[str, Any]:
    times = [t["time_per_step_s"] for t in timings]
    return {
        "epochs": config.epochs,
        "world_size": distributed.world_size(),
        "backend": distributed.backend(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps_per_epoch": len(data.train_loader),
        "time_per_step_s": statistics.median(times) if times else None,
        "peak_memory_mb": max((t["peak_memory_mb"] for t in timings), default=None),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "max_rss",
        "per_epoch": timings,
    }


def evaluate(
    model: nn.Module,
    loaders: dict[str, Any],
    num_classes: int,
    device: torch.device,
    margins_of: str = "",
) -> tuple[dict[str, float], np.ndarray | None]:
    """Accuracy and NC metrics of ``model`` in eval mode on each loader's whole split.

    Args:
        model: a :class:`guided_nc.models.Classifier`; left in eval mode. The metrics see the
            features its head classifies (``head.normalize``).
        loaders: ``{split: loader of (inputs, labels)}``, un-augmented.
        num_classes: K.
        device: where the model runs.
        margins_of: a split whose per-sample cosine margins to return too ("" for none).

    Returns:
        ``{f"{split}_{key}": value}`` over :data:`guided_nc.metrics.METRIC_KEYS` (float64 sums),
        and the margins of ``margins_of`` ((N,) float64, all ranks) or None.
    """
    from guided_nc.metrics import collect_metrics

    model.eval()

    def features_and_logits(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.features_and_logits(inputs.to(device))

    row: dict[str, float] = {}
    margins = None
    for split, loader in loaders.items():
        metrics = collect_metrics(
            features_and_logits,
            _OnDevice(loader, device),
            num_classes,
            weight=model.head.weight,
            bias=model.head.bias,
            progress=False,
            return_margins=split == margins_of,
        )
        if split == margins_of:
            metrics, margins = metrics
        row.update({f"{split}_{key}": value for key, value in metrics.items()})
    return row, margins


@dataclass
class FitResult:
    """What :func:`train_model` returns: the run folder, its metrics and the trained model.

    Attributes:
        folder: the run folder (config.json, metrics.csv, checkpoint.pt, ...).
        rows: metrics.csv, one dict per evaluated epoch.
        model: the trained :class:`guided_nc.models.Classifier` (``.backbone``: your backbone,
            trained in place; ``.head``), in eval mode: ``model(x)`` -> logits (B, K).
            :func:`load_run` rebuilds the same model from the folder.
    """

    folder: Path
    rows: list[dict[str, Any]]
    model: nn.Module | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluated epoch's metrics (``train_acc1``, ``test_nc1``, ...)."""
        return self.rows[-1]


def train_model(
    backbone: nn.Module,
    train: Any,
    test: Any = None,
    *,
    num_classes: int | None = None,
    train_labels: Any = None,
    train_eval: Any = None,
    loss_fn: Any = None,
    **config: Any,
) -> FitResult:
    """Train your own backbone on your own data with a guided-nc head; the Python API of ``fit``.

    Args:
        backbone: ``nn.Module`` mapping a batch of inputs to (B, d) features (no classifier:
            the head is added). d is its ``num_features`` attribute or found by one forward.
            With AGD (the default) it must have no 1-D parameters: see
            :func:`guided_nc.models.remove_biases`, :func:`~guided_nc.models.remove_norm_affine`
            and :func:`~guided_nc.models.torchvision_resnet`.
        train, test: datasets of ``(input, label)`` (a DataLoader is taken as its dataset: the
            stratified sampler makes the batches, of ``batch_size``).
        num_classes, train_labels, train_eval: see :meth:`guided_nc.data.DataSplits.
            from_datasets`.
        loss_fn: ``(logits, labels) -> scalar`` instead of ``loss=`` ("ce", "mse",
            "label-smoothing").
        **config: fields of :class:`guided_nc.config.TrainConfig` (``method``, ``epochs``,
            ``batch_size``, ``optimizer``, ``out``, ``resume``, ...).

    Returns:
        a :class:`FitResult` with the run folder, its metrics and the trained model.
    """
    from guided_nc.data import DataSplits
    from guided_nc.runfiles import read_long_csv

    train, test = (getattr(split, "dataset", split) for split in (train, test))
    data = DataSplits.from_datasets(
        train, test, train_eval=train_eval, num_classes=num_classes, train_labels=train_labels
    )
    run = TrainConfig(**{"out": "runs/train", **config, "dataset": CUSTOM, "model": CUSTOM})
    folder, model = _fit(run, backbone=backbone, data=data, loss_fn=loss_fn)
    return FitResult(folder, read_long_csv(folder / "metrics.csv"), model)


def load_run(
    folder: str | Path,
    backbone: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a run's trained model from its folder (config.json and checkpoint.pt).

    Args:
        folder: a run folder of ``fit``, ``train_model``, ``guided-nc train`` or ``compare``
            (its last checkpoint: the end of the run once ``done`` exists).
        backbone: for a run of your own backbone (``model="custom"``, :func:`train_model`), a
            module of the same architecture (e.g. built as before training); its weights are
            replaced by the run's. Built-in models are rebuilt from the configuration.
        map_location: where the model is loaded.

    Returns:
        the :class:`guided_nc.models.Classifier` (backbone and head, every head buffer
        included), in eval mode: ``model(x)`` gives the logits the run's model gave.

    Raises:
        FileNotFoundError: no checkpoint in ``folder``. ValueError: ``model="custom"`` without a
        backbone, or a checkpoint without the model's shapes (written before they were saved).
    """
    from guided_nc.models import Classifier

    folder = Path(folder)
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; pass a run folder that holds a {CHECKPOINT_NAME} "
            "(written after each epoch)"
        )
    state = load_checkpoint(path, map_location=map_location, required_keys=("model", "config"))
    config = TrainConfig.from_dict(state["config"])
    weight = state["model"]["head.weight"]
    num_classes, num_features = (int(size) for size in weight.shape)
    if backbone is None:
        if config.model == CUSTOM:
            raise ValueError(
                f"the run in {str(folder)!r} trained your own backbone (model='custom'); pass "
                "load_run(folder, backbone=...) with a module of the same architecture"
            )
        if "input_shape" not in state:
            raise ValueError(
                f"the checkpoint {str(path)!r} does not record the input shape (written by an "
                "older guided-nc); pass load_run(folder, backbone=build_backbone_for(config, "
                "input_shape))"
            )
        backbone = build_backbone_for(config, tuple(state["input_shape"]))
    model = Classifier(backbone, build_head_for(config, num_features, num_classes))
    model.load_state_dict(state["model"])
    return model.to(map_location).eval()
