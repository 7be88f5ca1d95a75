"""The one training step, and the interleaved step timer that every benchmark uses.

:func:`training_step` is what ``guided-nc train``, ``guided-nc ufm``, ``compare`` and the
benchmarks run: forward, loss, backward, optimiser step, schedule step, and the standard head's
row re-normalisation (method.md section 1). :func:`time_steps` times several such runs one
step each in turn (interleaved), so that load changes on a shared machine hit every run alike;
:func:`measure_heads` builds one run per method from a shared backbone (paper Table 3).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guided_nc.catalog import LOSSES
from guided_nc.heads import build_head, renormalize_heads_
from guided_nc.methods import METHOD_VARIANTS, TIMED_METHODS
from guided_nc.models import Classifier
from guided_nc.optim import build_optimizer
from guided_nc.runtime import synchronize
from guided_nc.settings import HeadSettings

__all__ = [
    "LOSSES",
    "StepRun",
    "build_loss",
    "build_optimizer_for",
    "check_deferred",
    "measure_heads",
    "skip_rejected",
    "summarize_times",
    "time_steps",
    "training_step",
]

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_loss(name: str = "ce", label_smoothing: float = 0.1) -> LossFunction:
    """The training loss ``(logits (B, K), labels (B,)) -> scalar``, by name.

    * ``"ce"``: cross-entropy, the paper's loss (the CE lower bound of the reports applies);
    * ``"mse"``: mean squared error between the logits and one-hot targets, averaged over the
      B x K entries (the MSE setting of the neural-collapse literature);
    * ``"label-smoothing"``: cross-entropy with ``label_smoothing`` (``torch`` semantics).
    """
    if name == "ce":
        return F.cross_entropy
    if name == "label-smoothing":
        return lambda logits, labels: F.cross_entropy(
            logits, labels, label_smoothing=label_smoothing
        )
    if name == "mse":
        return lambda logits, labels: F.mse_loss(
            logits, F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        )
    raise ValueError(f"loss={name!r} is not one of {list(LOSSES)}")


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Any,
    labels: torch.Tensor,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    loss_fn: LossFunction = F.cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: forward, loss, backward, optimiser, schedule, head re-normalisation.

    Args:
        model: maps ``(inputs, labels)`` to logits (B, K), e.g. a
            :class:`guided_nc.models.Classifier`, possibly wrapped in DDP. Under DDP each
            rank's loss is its shard's mean and DDP averages the gradients over equal shards,
            which is the gradient of the global batch's mean loss.
        optimizer: steps every trainable parameter.
        inputs: the batch (B, ...), or sample indices for a free-feature backbone.
        labels: (B,) int64 class indices.
        scheduler: stepped once per training step (None: no schedule).
        loss_fn: ``(logits, labels) -> scalar``; cross-entropy by default.

    Returns the detached loss (0-dim, the logits' dtype) and the number of correct top-1
    predictions of the step's forward pass (0-dim int64). Both stay on the device: reading them
    is the caller's choice (a host synchronisation on a GPU).
    """
    logits = model(inputs, labels)
    loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    renormalize_heads_(model)  # standard head: unit-norm rows after every step (method.md 1)
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return loss.detach(), correct


def check_deferred(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raise now if a head rejected a batch or the optimiser refused a step since the last call.

    In the heads' and AGD's deferred validation (the default on accelerators) a bad batch
    leaves every state unchanged and is only counted on the device, so that the step needs no
    host synchronisation; this reads the counters (one host read each). The training loops
    call it once per epoch (``train``) or per iteration (``ufm``, on the CPU).
    """
    for checkable in _checkables(model, optimizer):
        checkable.check()


def skip_rejected(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Clear the deferred rejections of the heads and AGD and return them, without raising.

    For a loop that should go on past a non-finite batch (e.g. a Lightning callback's
    ``on_train_batch_end``, examples/lightning_ddp.py): with ``validation="deferred"`` on the
    head and on AGD a bad batch changes no state (the head's buffers and the parameters stay
    as they were: the step is skipped), and this reads and resets the counters (one host read
    each) so that the next ``train()``/``eval()`` does not raise. Under DDP every rank rejects
    the same batches (the flags are all-reduced), so every rank returns the same list.

    Returns:
        the messages :meth:`check` would have raised, one per head or optimiser that rejected
        something since the last call (empty: nothing was rejected).
    """
    messages = []
    for checkable in _checkables(model, optimizer):
        try:
            checkable.check()
        except ValueError as error:
            messages.append(str(error))
    return messages


def _checkables(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[Any]:
    """The submodules of ``model`` and the optimiser that have a deferred ``check()``."""
    found = [m for m in model.modules() if m is not model and callable(getattr(m, "check", None))]
    if optimizer is not None and callable(getattr(optimizer, "check", None)):
        found.append(optimizer)
    return found


def build_optimizer_for(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser a run's configuration asks for, over ``model``'s trainable parameters.

    ``config`` is a :class:`guided_nc.settings.OptimizerSettings`, or a run configuration that
    inherits its fields (:class:`guided_nc.config.TrainConfig`, :class:`~guided_nc.config.
    UFMConfig`): ``optimizer``, ``lr``, ``weight_decay``, ``momentum`` and ``gain``.
    """
    return build_optimizer(
        config.optimizer,
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        gain=config.gain,
    )


@dataclass
class StepRun:
    """One thing to time: a model, its optimiser and the batch it steps on."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: Any
    labels: torch.Tensor


def _saved_tensor_bytes(step: Callable[[], Any]) -> int:
    """Run ``step()``; bytes of the unique storages autograd saves for the backward pass."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(seen.values())


def count_top_level_ops(step: Callable[[], Any]) -> int:
    """Run ``step()`` under ``torch.profiler``; the number of top-level aten operations.

    An operation is top-level when no other aten operation encloses it (autograd's backward
    included). On a GPU each is at least one kernel launch and microseconds of host time, so on
    a CPU the count stands in for what a GPU pays per step.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    count = 0
    for event in profiler.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def time_steps(
    runs: Mapping[str, StepRun | Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    *,
    device: torch.device | None = None,
    measure_memory: bool = False,
) -> dict[str, dict[str, Any]]:
    """Time ``repeats`` training steps of every run, one step of each in turn (interleaved).

    ``warmup`` untimed rounds come first. A step is :func:`training_step` of a :class:`StepRun`,
    or a call of a zero-argument function (e.g. a head alone: forward, loss, backward), bracketed
    by device synchronisations on CUDA (timing only).

    Memory (``measure_memory``): on CUDA ``torch.cuda.max_memory_allocated`` per step; on a
    CPU, which has no resettable allocator peak, the bytes autograd saves for the backward pass
    (unique storages packed by ``saved_tensors_hooks``): the part of the peak that differs
    between heads.

    Returns ``{name: {"seconds": [...], "peak_memory_mb": float | None, "memory_kind": str}}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    results = {
        name: {
            "seconds": [],
            "peak_memory_mb": 0.0 if measure_memory else None,
            "memory_kind": "cuda_max_allocated" if cuda else "saved_for_backward",
        }
        for name in runs
    }
    for index in range(warmup + repeats):
        for name, run in runs.items():

            def step(run: StepRun | Callable[[], Any] = run) -> Any:
                if callable(run):
                    return run()
                return training_step(run.model, run.optimizer, run.inputs, run.labels)

            if cuda and measure_memory:
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            if measure_memory and not cuda:
                saved = _saved_tensor_bytes(step) / 2**20
            else:
                step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if measure_memory:
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else saved
                results[name]["peak_memory_mb"] = max(results[name]["peak_memory_mb"], peak)
            if index >= warmup:
                results[name]["seconds"].append(elapsed)
    return results


def summarize_times(
    results: Mapping[str, Mapping[str, Any]], baseline: str = "standard"
) -> dict[str, dict[str, Any]]:
    """Median / min / max seconds per step of :func:`time_steps`' results, and the overhead.

    ``overhead_percent`` and ``ratio`` are relative to ``baseline`` when it was timed (same run).
    """
    summary = {}
    for name, result in results.items():
        seconds = result["seconds"]
        summary[name] = {
            "time_per_step_s": statistics.median(seconds),
            "time_min_s": min(seconds),
            "time_max_s": max(seconds),
            "peak_memory_mb": result["peak_memory_mb"],
            "memory_kind": result["memory_kind"],
        }
    if baseline in summary:
        base = summary[baseline]["time_per_step_s"]
        for name in summary:
            ratio = summary[name]["time_per_step_s"] / base
            summary[name].update(ratio=ratio, overhead_percent=100.0 * (ratio - 1.0))
    return summary


def measure_heads(
    backbone: nn.Module,
    num_classes: int,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    methods: Sequence[str] = TIMED_METHODS,
    repeats: int = 5,
    warmup: int = 1,
    optimizer_name: str = "agd",
    settings: HeadSettings | None = None,
) -> dict[str, dict[str, Any]]:
    """Time per training step and memory of each method's head on the same backbone and batch.

    Each method trains its own deep copy of ``backbone`` (the caller's is untouched) with
    ``optimizer_name``; the steps are interleaved (:func:`time_steps`) and summarised
    (:func:`summarize_times`, overhead relative to ``standard``).

    Args:
        backbone: module with ``num_features`` (d), mapping ``inputs`` to (B, d).
        num_classes: K.
        inputs: a batch (B, ...) on the target device; labels (B,) int64 on it too.
        methods: names from :data:`guided_nc.methods.METHOD_VARIANTS`.
        settings: the heads' settings (each method applies its own options on top).
    """
    unknown = sorted(set(methods) - set(METHOD_VARIANTS))
    if unknown:
        raise ValueError(f"heads={unknown} unknown; choose from {list(METHOD_VARIANTS)}")
    device = inputs.device
    runs = {}
    for name in methods:
        head = build_head(name, backbone.num_features, num_classes, settings)
        model = Classifier(copy.deepcopy(backbone), head).to(device)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(optimizer_name, parameters, lr=0.01, weight_decay=0.0)
        runs[name] = StepRun(model, optimizer, inputs, labels)
    results = time_steps(runs, repeats, warmup, device=device, measure_memory=True)
    summary = summarize_times(results)
    for name, run in runs.items():  # after the timing: the profiler's overhead stays out of it
        summary[name]["ops_per_step"] = count_top_level_ops(
            lambda run=run: training_step(run.model, run.optimizer, run.inputs, run.labels)
        )
    return summary
