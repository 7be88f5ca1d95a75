"""Unconstrained feature models (UFMs): the paper's synthetic experiments (section 4, Figs. 2-3).

The features are free parameters: an N x d matrix ``F`` (one row per sample, balanced labels)
trained together with one of the heads of :mod:`guided_nc.heads` to minimise the mean
cross-entropy of ``head(F)``. There is no backbone (the "backbone" is
:class:`guided_nc.models.FreeFeatures`), so what is measured is purely how each head (and the
optimiser) drives the features to neural collapse. A step is :func:`guided_nc.timing.
training_step`, the same as for a real network.

This module runs experiments and writes files; :mod:`guided_nc.reports.ufm` reads them. One
preset's folder ``OUT/`` (``OUT/<preset>/`` with several presets)::

    kind                         "ufm", written first (each run folder has one too)
    config.json                  the experiment's configuration and library versions
    runs/<method>/seed<s>/       config.json, metrics.csv, timings.csv, final_margins.npy, done

``metrics.csv`` has one row per iteration (loss and accuracy on all N features after every
step; the NC metrics at :func:`evaluation_iterations`); ``timings.csv`` the wall time of every
optimisation step, kept apart so that metrics.csv is bit-identical between runs with the same
seed. Decisions (full-batch AGD, initial features, no weight decay, ...) are in ``docs/ufm.md``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from guided_nc.config import Preset, UFMConfig
from guided_nc.heads import build_head
from guided_nc.methods import METHOD_VARIANTS
from guided_nc.metrics import METRIC_KEYS, NeuralCollapseMetrics, cosine_margins
from guided_nc.models import Classifier, FreeFeatures
from guided_nc.optim import build_scheduler, orthogonal_init_
from guided_nc.progress import Progress
from guided_nc.runfiles import (
    RunLock,
    atomic_write_json,
    check_kind,
    config_digest,
    environment_info,
    mark_done,
    mark_kind,
    read_config,
    read_done,
    remove_stale_temporaries,
    run_folder,
    save_npy,
    write_long_csv,
)
from guided_nc.timing import (
    StepRun,
    build_optimizer_for,
    check_deferred,
    time_steps,
    training_step,
)

__all__ = [
    "DENSE_COLUMNS",
    "METRICS_FIELDS",
    "NC_COLUMNS",
    "TIMINGS_FIELDS",
    "evaluation_iterations",
    "initial_features",
    "measure_step_times",
    "run_preset",
    "run_ufm",
    "train_run",
]

#: How often a UFM run writes a log line when stderr is not a terminal.
LOG_EVERY = 100

#: Columns of a run's metrics.csv with a value every iteration (the rest only at the NC
#: evaluations).
DENSE_COLUMNS = ("loss", "acc1", "eta")

#: Neural-collapse columns of a run's metrics.csv: every key of
#: :meth:`~guided_nc.metrics.NeuralCollapseMetrics.compute` but the accuracies (``acc1`` is dense
#: above; ``acc5`` is not plotted) and the sample count. Reports read the columns from the files.
NC_COLUMNS = tuple(key for key in METRIC_KEYS if key not in ("acc1", "acc5", "n"))

#: The columns of a run's metrics.csv and timings.csv, in order.
METRICS_FIELDS = ("preset", "method", "seed", "iteration", *DENSE_COLUMNS, *NC_COLUMNS)
TIMINGS_FIELDS = ("preset", "method", "seed", "iteration", "step_seconds")


# --- one run ------------------------------------------------------------------------------------


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator, int, torch.Generator]:
    """Independent random streams of a seed: features, standard head's W, batch order, and the
    fixed ETF's Haar rotation. (A 4th word of a SeedSequence leaves the first 3 unchanged.)"""
    states = np.random.SeedSequence(seed).generate_state(4, dtype=np.uint64)
    features, head, batches, rotation = (int(state % (2**63 - 1)) for state in states)
    return (
        torch.Generator().manual_seed(features),
        torch.Generator().manual_seed(head),
        batches,
        torch.Generator().manual_seed(rotation),
    )


def initial_features(preset: Preset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's initial free features and the (balanced) labels.

    Features: AGD's initialisation of an N x d weight, i.e. a semi-orthogonal matrix times
    ``sqrt(N/d)`` (:func:`guided_nc.optim.orthogonal_init_`), drawn from the seed's own stream,
    so every method starts from the same features. Rows then have mean squared norm 1.
    Labels: ``i mod K`` (N/K samples per class when K divides N).

    Shape: features (N, d) float32, labels (N,) int64.
    """
    generator = _generators(seed)[0]
    features = torch.empty(preset.num_samples, preset.num_features)
    orthogonal_init_(features, generator=generator)
    labels = torch.arange(preset.num_samples) % preset.num_classes
    return features, labels


def evaluation_iterations(iterations: int, eval_interval: int) -> list[int]:
    """Iterations at which the NC metrics are computed.

    0, every ``eval_interval``, the last, and the 1-2-5 sequence (1, 2, 5, 10, 20, 50, ...) below
    ``eval_interval``, so that the early dynamics show on a logarithmic iteration axis.
    """
    points = set(range(0, iterations + 1, eval_interval))
    points.add(iterations)
    decade = 1
    while decade < eval_interval:
        points.update(value for value in (decade, 2 * decade, 5 * decade) if value < eval_interval)
        decade *= 10
    return sorted(point for point in points if point <= iterations)


def _build_head(config: UFMConfig, method: str, seed: int) -> torch.nn.Module:
    preset = config.preset
    head_name = METHOD_VARIANTS[method].head
    head = build_head(
        method,
        preset.num_features,
        preset.num_classes,
        config.head_settings(),
        generator=_generators(seed)[3],
    )
    if head_name == "standard":
        # AGD's initialisation for the classifier too (as the release's init_weights), from the
        # seed's own stream; then unit-norm rows.
        orthogonal_init_(head.weight, generator=_generators(seed)[1])
        head.renormalize_()
    return head


def _build_problem(
    config: UFMConfig, method: str, seed: int
) -> tuple[Classifier, torch.Tensor, torch.optim.Optimizer]:
    """The seed's free features and the method's head as one model, the labels, and one
    optimiser over the features and the head's trainable parameters."""
    features, labels = initial_features(config.preset, seed)
    model = Classifier(FreeFeatures(features), _build_head(config, method, seed))
    return model, labels, build_optimizer_for(config, model)


@torch.no_grad()
def _evaluate(model: Classifier, labels: torch.Tensor, with_collapse: bool) -> dict[str, float]:
    """Loss and accuracy over all N features (model in eval mode); NC metrics if asked."""
    was_training = model.training
    model.eval()
    try:
        h, logits = model.features_and_logits(None)
    finally:
        model.train(was_training)
    loss = F.cross_entropy(logits.double(), labels).item()
    accuracy = 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()
    results = {"loss": loss, "acc1": accuracy}
    if with_collapse:
        head = model.head
        metric = NeuralCollapseMetrics(logits.shape[1], h.shape[1], max_kept_samples=None)
        metric.update(h, labels, logits)
        bias = None if head.bias is None else head.bias.detach()
        computed = metric.compute(head.weight.detach(), bias)
        results.update({key: computed[key] for key in NC_COLUMNS})
    return results


@torch.no_grad()
def _final_margins(model: Classifier, labels: torch.Tensor) -> np.ndarray:
    """Per-sample cosine margins (float32 array of length N) of the final state."""
    h = model.head.normalize(model.backbone(None))
    margins = cosine_margins(h, labels, h.double().mean(dim=0), model.head.weight.detach())
    return margins.float().numpy()


def train_run(
    config: UFMConfig, method: str, seed: int, progress: Progress | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], np.ndarray]:
    """Train one (method, seed) run and return (metrics rows, timing rows, final margins).

    Step t = 1..T is :func:`guided_nc.timing.training_step` on the step's batch (training
    mode): forward, cross-entropy, backward, optimiser step, scheduler step, unit-norm rows for
    the standard head. After every step the state is evaluated on all N features (loss,
    accuracy; NC metrics at :func:`evaluation_iterations`). Iteration 0 is the initial state.
    """
    model, labels, optimizer = _build_problem(config, method, seed)
    model.train()
    scheduler = build_scheduler(
        optimizer,
        config.schedule,
        total_steps=config.iterations if config.schedule != "none" else None,
    )
    batches = _batch_stream(config, labels, seed)
    collapse_points = set(evaluation_iterations(config.iterations, config.eval_interval))
    common = {"preset": config.preset.name, "method": method, "seed": seed}

    rows = [{**common, "iteration": 0, **_evaluate(model, labels, True)}]
    timings = []
    for iteration in range(1, config.iterations + 1):
        index = next(batches)
        batch_labels = labels if index is None else labels[index]
        start = time.perf_counter()
        loss, _ = training_step(model, optimizer, index, batch_labels, scheduler=scheduler)
        elapsed = time.perf_counter() - start
        check_deferred(model, optimizer)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"{config.preset.name} {method} seed {seed}: the training loss became "
                f"{loss.item()} at iteration {iteration}; lower the learning rate / gain"
            )
        evaluation = _evaluate(model, labels, iteration in collapse_points)
        eta = getattr(optimizer, "last_eta", None)
        evaluation["eta"] = None if eta is None else float(eta)
        rows.append({**common, "iteration": iteration, **evaluation})
        timings.append({**common, "iteration": iteration, "step_seconds": elapsed})
        if progress is not None:
            progress.update(1)
            if iteration % LOG_EVERY == 0 or iteration == config.iterations:
                progress.log(
                    f"{method} seed {seed}", loss=evaluation["loss"], acc=evaluation["acc1"]
                )
    return rows, timings, _final_margins(model, labels)


def _batch_stream(config: UFMConfig, labels: torch.Tensor, seed: int):
    """Yields the index tensor of each step's batch (None = all N), the same for every method."""
    if config.full_batch:
        while True:
            yield None
    from guided_nc.sampler import StratifiedBatchSampler

    batch_seed = _generators(seed)[2]
    sampler = StratifiedBatchSampler(labels, config.batch_size, seed=batch_seed % (2**31))
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch in sampler:
            yield torch.as_tensor(batch, dtype=torch.long)
        epoch += 1


def measure_step_times(
    config: UFMConfig, steps: int = 10, warmup: int = 2, include_no_ddn: bool = True
) -> dict[str, list[float]]:
    """Seconds per training step of every method on the same machine, interleaved.

    Every method (plus ``implicit-no-ddn``, the implicit head without the DDN gradient, when
    asked) starts from seed ``config.seeds[0]``'s features; then one step of each method in turn
    on the run's first batch (all N features with full batches;
    :func:`guided_nc.timing.time_steps`), ``warmup`` untimed rounds and ``steps`` timed ones,
    so that load changes on a shared machine hit every method alike. A step is what
    :func:`train_run` times: forward, loss, backward, optimiser step, renormalisation (no
    evaluation).

    Returns ``{method: [seconds per step, ...]}``.
    """
    seed = config.seeds[0]
    methods = list(config.methods)
    if include_no_ddn and "implicit" in methods and "implicit-no-ddn" not in methods:
        methods.append("implicit-no-ddn")
    runs = {}
    for method in methods:
        model, labels, optimizer = _build_problem(config, method, seed)
        index = next(_batch_stream(config, labels, seed))  # the run's first batch (None: all)
        runs[method] = StepRun(model, optimizer, index, labels if index is None else labels[index])
    results = time_steps(runs, steps, warmup)
    return {method: result["seconds"] for method, result in results.items()}


# --- one preset: the runs -----------------------------------------------------------------------


def _run_is_done(folder: Path, run_config: dict[str, Any]) -> bool:
    """True if the folder holds a finished run of exactly this configuration.

    Raises ValueError if it holds a finished run of a different configuration (a different
    ``--out`` is then needed; results are never overwritten silently).
    """
    done = read_done(folder)
    if done is None:
        return False
    if done.get("config_digest") != config_digest(run_config):
        saved = read_config(folder / "config.json")
        changed = sorted(key for key in run_config if saved.get(key) != run_config[key])
        values = ", ".join(
            f"{key}: {saved.get(key)!r} there, {run_config[key]!r} now" for key in changed
        )
        raise ValueError(
            f"{folder} holds a finished run with a different configuration ({values}); use "
            "another --out folder or delete that run folder"
        )
    return True


def _record_experiment(out_dir: Path, config: UFMConfig) -> None:
    """Write the experiment's config.json; keep the methods and seeds of earlier invocations.

    Several invocations may share a folder (one per seed range, run in parallel), so the
    recorded methods and seeds are the union of what each asked for.
    """
    data = config.to_dict()
    path = out_dir / "config.json"
    with RunLock(out_dir, wait=60.0):  # a parallel invocation may be merging its own request
        _merge_request(path, data, config)


def _merge_request(path: Path, data: dict[str, Any], config: UFMConfig) -> None:
    if path.exists():
        saved = read_config(path)
        data["methods"] = [
            m for m in METHOD_VARIANTS if m in set(saved.get("methods", [])) | set(config.methods)
        ]
        data["seeds"] = sorted(set(saved.get("seeds", [])) | set(config.seeds))
    atomic_write_json(path, {"config": data, "environment": environment_info()})


def run_preset(config: UFMConfig, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train every (method, seed) of ``config`` not finished yet in ``out_dir``; return it.

    Each run lives in ``out_dir/runs/<method>/seed<s>/`` and ends with its ``done`` marker; an
    interrupted experiment resumes at run granularity. Reports are built from the folder by
    :func:`guided_nc.reports.ufm.build_report` (the command line calls it).
    """
    out_dir = Path(out_dir)
    check_kind(out_dir, "ufm")
    mark_kind(out_dir, "ufm")  # the folder's first write
    _record_experiment(out_dir, config)
    pending = []
    # Seed-major order: an interrupted experiment has whole seeds (every method) done.
    for seed in config.seeds:
        for method in config.methods:
            run_config = config.run_dict(method, seed)
            if not _run_is_done(run_folder(out_dir, method, seed), run_config):
                pending.append((method, seed, run_config))
    with Progress(
        len(pending) * config.iterations, config.preset.name, enabled=progress, unit="it"
    ) as bar:
        for method, seed, run_config in pending:
            folder = run_folder(out_dir, method, seed)
            with RunLock(folder):  # another invocation may be training this very run
                if _run_is_done(folder, run_config):  # it finished while we waited our turn
                    continue
                remove_stale_temporaries(folder)
                _train_into(folder, config, method, seed, run_config, bar)
    return out_dir


def _train_into(
    folder: Path, config: UFMConfig, method: str, seed: int, run_config: dict, bar: Progress
) -> None:
    """Train one run and write its folder: its kind first, the ``done`` marker last."""
    mark_kind(folder, "ufm")
    atomic_write_json(
        folder / "config.json", {"config": run_config, "environment": environment_info()}
    )
    started = time.time()
    rows, timings, margins = train_run(config, method, seed, bar)
    write_long_csv(folder / "metrics.csv", rows, METRICS_FIELDS)
    write_long_csv(folder / "timings.csv", timings, TIMINGS_FIELDS)
    save_npy(folder / "final_margins.npy", margins)
    mark_done(folder, run_config, time.time() - started)


def run_ufm(configs: list[UFMConfig], out: str | os.PathLike, progress: bool = True) -> list[Path]:
    """Run one or several presets: one preset into ``out``, several into ``out/<preset>/``.

    Returns the preset folders.
    """
    out = Path(out)
    if len(configs) == 1:
        return [run_preset(configs[0], out, progress)]
    for folder in (out, *(out / config.preset.name for config in configs)):
        check_kind(folder, "ufm")  # every folder, before anything is written
    mark_kind(out, "ufm")
    return [run_preset(config, out / config.preset.name, progress) for config in configs]
