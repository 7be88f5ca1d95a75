"""Unconstrained feature models (UFMs): the paper's synthetic experiments (section 4, Figs. 2-3).

The features are free parameters: an N x d matrix ``F`` (one row per sample, balanced labels)
trained together with one of the three heads of :mod:`guided_nc.heads` to minimise the mean
cross-entropy of ``head(F)``. There is no backbone, so what is measured is purely how each head
(and the optimiser) drives the features to neural collapse.

Runs write files and reports only read them (DomainBed's pattern), so a report can be rebuilt:

``OUT/`` (one preset) or ``OUT/<preset>/`` (several presets)::

    config.json            resolved configuration and library versions
    runs/<method>-seed<s>/ metrics.csv, timings.csv, final_margins.npy, config.json, done.json
    metrics.csv            long format: one row per (method, seed, iteration) evaluated
    timings.csv            wall time of every optimisation step (kept apart so that metrics.csv
                           is bit-identical between runs with the same seed)
    final_margins.npz      per-sample cosine margins at the last iteration, key "<method>/<seed>"
    summary.json           iterations to 100 % accuracy and to the CE bound, final metrics,
                           seconds per iteration: median / min / max over seeds
    *.png, report.md       figures and tables

With several presets ``OUT/summary.json``, ``OUT/report.md`` and ``OUT/convergence_vs_classes.png``
compare them. Decisions (full-batch AGD, initial features, no weight decay, ...) are in
``docs/ufm.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from guided_nc import __version__, report
from guided_nc.heads import build_head, normalize_features
from guided_nc.metrics import METRIC_KEYS, NeuralCollapseMetrics, ce_lower_bound, cosine_margins
from guided_nc.optim import build_optimizer, build_scheduler, orthogonal_init_

__all__ = [
    "METHODS",
    "PRESETS",
    "Preset",
    "UFMConfig",
    "build_report",
    "build_scaling_report",
    "evaluation_iterations",
    "initial_features",
    "measure_step_times",
    "parse_preset",
    "register_cli",
    "run_preset",
    "summarize_metrics",
    "train_run",
]

#: The paper's methods, in plotting order.
METHODS = ("standard", "fixed", "implicit")

#: Pretty names for tables and legends.
METHOD_LABELS = {"standard": "Standard", "fixed": "Fixed ETF", "implicit": "Implicit ETF"}
METHOD_COLORS = {"standard": "C0", "fixed": "C1", "implicit": "C2"}

#: A run reaches the bound when its loss is at most this factor times ``ce_lower_bound``.
BOUND_FACTOR = 1.01

#: Columns of metrics.csv with a value every iteration (the rest only at NC evaluations).
DENSE_COLUMNS = ("loss", "acc1", "eta")

#: Metrics kept in metrics.csv from :meth:`NeuralCollapseMetrics.compute`: all of its keys but
#: the accuracies (``acc1`` is dense above; ``acc5`` is not plotted) and the sample count.
NC_COLUMNS = tuple(key for key in METRIC_KEYS if key not in ("acc1", "acc5", "n"))

METRICS_FIELDS = ("preset", "method", "seed", "iteration", *DENSE_COLUMNS, *NC_COLUMNS)
TIMINGS_FIELDS = ("preset", "method", "seed", "iteration", "step_seconds")


@dataclass(frozen=True)
class Preset:
    """A UFM size: K classes, N free features (N/K per class), feature dimension d."""

    name: str
    num_classes: int
    num_samples: int
    num_features: int


#: The paper's configurations (section 4; method.md section 7).
PRESETS = {
    "ufm-10": Preset("ufm-10", 10, 1000, 512),
    "ufm-100": Preset("ufm-100", 100, 5000, 1024),
    "ufm-200": Preset("ufm-200", 200, 5000, 1024),
    "ufm-1000": Preset("ufm-1000", 1000, 10000, 1024),
}


def parse_preset(text: str) -> Preset:
    """A preset by name (``ufm-10``, ``ufm-100``, ``ufm-200``, ``ufm-1000``) or ``K:N:d``.

    The custom form ``K:N:d`` (e.g. ``4:40:8``, named ``ufm-4x40x8``) is for tests and quick
    looks; it needs K >= 2, N >= K and d >= K (the ETF heads need d >= K).
    """
    if text in PRESETS:
        return PRESETS[text]
    parts = text.split(":")
    if len(parts) == 3 and all(part.isdigit() for part in parts):
        num_classes, num_samples, num_features = (int(part) for part in parts)
        if num_classes < 2 or num_samples < num_classes or num_features < num_classes:
            raise ValueError(
                f"preset={text!r} needs K >= 2, N >= K and d >= K (K:N:d); got K={num_classes}, "
                f"N={num_samples}, d={num_features}"
            )
        name = f"ufm-{num_classes}x{num_samples}x{num_features}"
        return Preset(name, num_classes, num_samples, num_features)
    raise ValueError(
        f"preset={text!r} is not known; use one of {sorted(PRESETS)} or 'K:N:d' "
        f"(e.g. '4:40:8' for 4 classes, 40 features of dimension 8)"
    )


@dataclass(frozen=True)
class UFMConfig:
    """Everything that determines a UFM experiment on one preset (all methods, all seeds).

    Attributes:
        preset: the problem size.
        methods: heads to compare (subset of :data:`METHODS`).
        seeds: seeds; seed s fixes the initial features, the standard head's initial W and the
            batch order, identically for every method.
        iterations: optimiser steps per run (paper: 2000).
        temperature: tau, the norm of the normalised features (paper: 5).
        optimizer: ``agd`` (paper), ``sgd``, ``adam`` or ``adamw``.
        gain: AGD's gain (paper: 10).
        lr: learning rate (None: :func:`guided_nc.optim.build_optimizer`'s default; for AGD a
            multiplier of the gain).
        momentum: SGD momentum.
        weight_decay: None = the optimiser's default (0 except AdamW 0.01); AGD rejects non-zero.
        schedule: ``none`` or ``cosine`` (over ``iterations`` steps), per step.
        batch_size: None = full batch (every step sees all N features, the default); otherwise
            stratified batches of this size (:class:`guided_nc.sampler.StratifiedBatchSampler`).
        eval_interval: NC metrics every this many iterations (and at 0 and the last); loss and
            accuracy are evaluated after every iteration.
        ddn_grad: implicit head: differentiate through the nearest-ETF layer.
        delta: implicit head: proximal coefficient.
        running_mean_momentum: momentum of the ETF heads' running feature mean (evaluation bias);
            None = 1.0 with full batches (the batch is the whole data set), 0.1 otherwise.
    """

    preset: Preset
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    iterations: int = 2000
    temperature: float = 5.0
    optimizer: str = "agd"
    gain: float = 10.0
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "none"
    batch_size: int | None = None
    eval_interval: int = 20
    ddn_grad: bool = True
    delta: float = 1e-3
    running_mean_momentum: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.preset, Preset):
            raise TypeError(f"preset must be a Preset (see parse_preset), got {self.preset!r}")
        if not self.methods:
            raise ValueError("methods is empty; pass at least one of 'standard,fixed,implicit'")
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown:
            raise ValueError(
                f"methods={','.join(self.methods)!r} contains unknown {unknown}; use a "
                f"comma-separated subset of {','.join(METHODS)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={self.methods} lists a method twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be non-empty and distinct")
        if any(
            isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 for seed in self.seeds
        ):
            raise ValueError(f"seeds={self.seeds} must be integers >= 0")
        for name in ("iterations", "eval_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.batch_size is not None:
            if not isinstance(self.batch_size, int) or self.batch_size < 1:
                raise ValueError(
                    f"batch_size={self.batch_size!r} must be a positive integer or None (full "
                    f"batch)"
                )
            if self.batch_size > self.preset.num_samples:
                raise ValueError(
                    f"batch_size={self.batch_size} exceeds N={self.preset.num_samples}; use "
                    f"batch_size=None (or 0 on the command line) for full batches"
                )
        if self.schedule not in ("none", "cosine"):
            raise ValueError(f"schedule={self.schedule!r} is not supported; use 'none' or 'cosine'")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be a finite number > 0")

    @property
    def full_batch(self) -> bool:
        """Whether every step uses all N features."""
        return self.batch_size is None or self.batch_size == self.preset.num_samples

    @property
    def resolved_running_mean_momentum(self) -> float:
        """The ETF heads' running-mean momentum actually used."""
        if self.running_mean_momentum is not None:
            return self.running_mean_momentum
        return 1.0 if self.full_batch else 0.1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (preset expanded)."""
        data = dataclasses.asdict(self)
        data["methods"] = list(self.methods)
        data["seeds"] = list(self.seeds)
        data["resolved_running_mean_momentum"] = self.resolved_running_mean_momentum
        return data

    def run_dict(self, method: str, seed: int) -> dict[str, Any]:
        """The configuration of one run: everything that changes its metrics.csv."""
        data = self.to_dict()
        del data["methods"], data["seeds"]
        data.update(method=method, seed=seed)
        return data


# --- one run ------------------------------------------------------------------------------------


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator, int]:
    """Independent random streams of a seed: features, standard head's W, batch order."""
    states = np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64)
    features, head, batches = (int(state % (2**63 - 1)) for state in states)
    return (
        torch.Generator().manual_seed(features),
        torch.Generator().manual_seed(head),
        batches,
    )


def initial_features(preset: Preset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's initial free features and the (balanced) labels.

    Features: AGD's initialisation of an N x d weight, i.e. a semi-orthogonal matrix times
    ``sqrt(N/d)`` (:func:`guided_nc.optim.orthogonal_init_`), drawn from the seed's own stream,
    so every method starts from the same features. Rows then have mean squared norm 1.
    Labels: ``i mod K`` (N/K samples per class when K divides N).

    Shape: features (N, d) float32, labels (N,) int64.
    """
    generator, _, _ = _generators(seed)
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
    kwargs: dict[str, Any] = {"temperature": config.temperature}
    if method == "fixed":
        kwargs["running_mean_momentum"] = config.resolved_running_mean_momentum
    elif method == "implicit":
        kwargs.update(
            running_mean_momentum=config.resolved_running_mean_momentum,
            ddn_grad=config.ddn_grad,
            delta=config.delta,
        )
    head = build_head(method, preset.num_features, preset.num_classes, **kwargs)
    if method == "standard":
        # AGD's initialisation for the classifier too (as the release's init_weights), from the
        # seed's own stream; then unit-norm rows.
        _, generator, _ = _generators(seed)
        orthogonal_init_(head.weight, generator=generator)
        head.renormalize_()
    return head


@torch.no_grad()
def _evaluate(
    features: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    temperature: float,
    with_collapse: bool,
) -> dict[str, float]:
    """Loss and accuracy over all N features (head in eval mode); NC metrics if asked."""
    was_training = head.training
    head.eval()
    try:
        logits = head(features)
    finally:
        head.train(was_training)
    loss = F.cross_entropy(logits.double(), labels).item()
    accuracy = 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()
    results = {"loss": loss, "acc1": accuracy}
    if with_collapse:
        num_classes = logits.shape[1]
        metric = NeuralCollapseMetrics(num_classes, features.shape[1], max_kept_samples=None)
        metric.update(normalize_features(features, temperature), labels, logits)
        computed = metric.compute(head.weight.detach(), _bias(head))
        results.update({key: computed[key] for key in NC_COLUMNS})
    return results


def _bias(head: torch.nn.Module) -> torch.Tensor | None:
    bias = head.bias
    return None if bias is None else bias.detach()


@torch.no_grad()
def _final_margins(
    features: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, temperature: float
) -> np.ndarray:
    """Per-sample cosine margins (float32 array of length N) of the final state."""
    h = normalize_features(features, temperature)
    margins = cosine_margins(h, labels, h.double().mean(dim=0), head.weight.detach())
    return margins.float().numpy()


def _build_problem(config: UFMConfig, method: str, seed: int):
    """Free features (a fresh N x d Parameter from the seed's initial features), their labels,
    the method's head and one optimiser over features and trainable head parameters."""
    features_init, labels = initial_features(config.preset, seed)
    features = torch.nn.Parameter(features_init.clone())
    head = _build_head(config, method, seed)
    parameters = [features] + [p for p in head.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        config.optimizer,
        parameters,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        gain=config.gain,
    )
    return features, labels, head, optimizer


def train_run(
    config: UFMConfig, method: str, seed: int, progress_bar: tqdm | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], np.ndarray]:
    """Train one (method, seed) run and return (metrics rows, timing rows, final margins).

    Step t = 1..T: forward the batch through the head (training mode), cross-entropy, backward,
    optimiser step, scheduler step, unit-norm rows for the standard head. After every step the
    state is evaluated on all N features (loss, accuracy; NC metrics at
    :func:`evaluation_iterations`). Iteration 0 is the initial state.
    """
    preset = config.preset
    features, labels, head, optimizer = _build_problem(config, method, seed)
    head.train()
    scheduler = build_scheduler(
        optimizer,
        config.schedule,
        total_steps=config.iterations if config.schedule != "none" else None,
    )
    batches = _batch_stream(config, labels, seed)
    collapse_points = set(evaluation_iterations(config.iterations, config.eval_interval))
    common = {"preset": preset.name, "method": method, "seed": seed}

    rows = [
        {**common, "iteration": 0, **_evaluate(features, labels, head, config.temperature, True)}
    ]
    timings = []
    for iteration in range(1, config.iterations + 1):
        index = next(batches)
        start = time.perf_counter()
        batch_features = features if index is None else features[index]
        batch_labels = labels if index is None else labels[index]
        logits = head(batch_features, batch_labels)
        loss = F.cross_entropy(logits, batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if method == "standard":
            head.renormalize_()
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"{preset.name} {method} seed {seed}: the training loss became {loss.item()} at "
                f"iteration {iteration}; lower the learning rate / gain"
            )
        evaluation = _evaluate(
            features, labels, head, config.temperature, iteration in collapse_points
        )
        eta = getattr(optimizer, "last_eta", None)
        evaluation["eta"] = None if eta is None else float(eta)
        rows.append({**common, "iteration": iteration, **evaluation})
        timings.append({**common, "iteration": iteration, "step_seconds": elapsed})
        if progress_bar is not None:
            progress_bar.update(1)
            if iteration % 10 == 0 or iteration == config.iterations:
                progress_bar.set_postfix_str(
                    f"{method} s{seed} loss {evaluation['loss']:.4f} acc {evaluation['acc1']:.1f}"
                )
    margins = _final_margins(features.detach(), labels, head, config.temperature)
    return rows, timings, margins


def _batch_stream(config: UFMConfig, labels: torch.Tensor, seed: int):
    """Yields the index tensor of each step's batch (None = all N), the same for every method."""
    if config.full_batch:
        while True:
            yield None
    from guided_nc.sampler import StratifiedBatchSampler

    _, _, batch_seed = _generators(seed)
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
    asked) starts from seed ``config.seeds[0]``'s features; then one step of each method in
    turn, ``warmup`` untimed rounds and ``steps`` timed ones, so that load changes on a shared
    machine hit every method alike. A step is what :func:`train_run` times: forward, loss,
    backward, optimiser step, renormalisation (no evaluation).

    Returns ``{variant: [seconds per step, ...]}``.
    """
    seed = config.seeds[0]
    variants = list(config.methods)
    if include_no_ddn and "implicit" in variants:
        variants.append("implicit-no-ddn")
    states = {}
    for variant in variants:
        method = "implicit" if variant == "implicit-no-ddn" else variant
        variant_config = (
            dataclasses.replace(config, ddn_grad=False) if variant == "implicit-no-ddn" else config
        )
        features, labels, head, optimizer = _build_problem(variant_config, method, seed)
        states[variant] = (features, labels, head, optimizer, method)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(warmup + steps):
        for variant, (features, labels, head, optimizer, method) in states.items():
            start = time.perf_counter()
            loss = F.cross_entropy(head(features, labels), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if method == "standard":
                head.renormalize_()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[variant].append(elapsed)
    return times


# --- one preset: runs, merge, report --------------------------------------------------------


def _environment() -> dict[str, Any]:
    return {
        "guided_nc": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def _run_folder(out_dir: Path, method: str, seed: int) -> Path:
    return out_dir / "runs" / f"{method}-seed{seed}"


def _config_digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    report.atomic_write_bytes(path, buffer.getvalue())


def _run_is_done(folder: Path, run_config: dict[str, Any]) -> bool:
    """True if the folder holds a finished run of exactly this configuration.

    Raises ValueError if it holds a finished run of a different configuration (a different
    ``--out`` is then needed; results are never overwritten silently).
    """
    done = folder / "done.json"
    if not done.exists():
        return False
    recorded = report.read_json(done).get("config_digest")
    if recorded != _config_digest(run_config):
        raise ValueError(
            f"{folder} holds a finished run with a different configuration (see its "
            f"config.json); use another --out folder or delete that run folder"
        )
    return True


def run_preset(config: UFMConfig, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Run every (method, seed) of ``config`` not finished yet in ``out_dir``, then the report.

    Each run lives in ``out_dir/runs/<method>-seed<s>/`` and ends with ``done.json``; an
    interrupted experiment resumes at run granularity. Returns the path of report.md.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.atomic_write_json(
        out_dir / "config.json", {"config": config.to_dict(), "environment": _environment()}
    )
    pending = []
    # Seed-major order: an interrupted experiment has whole seeds (every method) done.
    for seed in config.seeds:
        for method in config.methods:
            run_config = config.run_dict(method, seed)
            if not _run_is_done(_run_folder(out_dir, method, seed), run_config):
                pending.append((method, seed, run_config))
    total = len(pending) * config.iterations
    with tqdm(
        total=total,
        desc=config.preset.name,
        disable=None if progress else True,
        dynamic_ncols=True,
    ) as bar:
        for method, seed, run_config in pending:
            folder = _run_folder(out_dir, method, seed)
            report.atomic_write_json(folder / "config.json", run_config)
            started = time.time()
            rows, timings, margins = train_run(config, method, seed, bar)
            report.write_long_csv(folder / "metrics.csv", rows, METRICS_FIELDS)
            report.write_long_csv(folder / "timings.csv", timings, TIMINGS_FIELDS)
            _save_npy(folder / "final_margins.npy", margins)
            report.atomic_write_json(
                folder / "done.json",
                {
                    "config_digest": _config_digest(run_config),
                    "wall_seconds": time.time() - started,
                    "environment": _environment(),
                },
            )
    merge_runs(out_dir)
    return build_report(out_dir)


def merge_runs(out_dir: str | os.PathLike) -> None:
    """Concatenate every finished run folder into ``metrics.csv``, ``timings.csv`` and
    ``final_margins.npz`` at the top of ``out_dir`` (method order of :data:`METHODS`, then seed)."""
    out_dir = Path(out_dir)
    finished = []
    for folder in sorted((out_dir / "runs").glob("*-seed*")):
        if not (folder / "done.json").exists():
            continue
        run_config = report.read_json(folder / "config.json")
        finished.append((METHODS.index(run_config["method"]), run_config["seed"], folder))
    if not finished:
        raise ValueError(f"{out_dir} holds no finished runs (runs/*/done.json); run them first")
    finished.sort()
    _record_finished_runs(out_dir / "config.json", finished)
    metrics, timings, margins = [], [], {}
    for _, seed, folder in finished:
        metrics += report.read_long_csv(folder / "metrics.csv")
        timings += report.read_long_csv(folder / "timings.csv")
        method = METHODS[_]
        margins[f"{method}/{seed}"] = np.load(folder / "final_margins.npy", allow_pickle=False)
    report.write_long_csv(out_dir / "metrics.csv", metrics, METRICS_FIELDS)
    report.write_long_csv(out_dir / "timings.csv", timings, TIMINGS_FIELDS)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **margins)
    report.atomic_write_bytes(out_dir / "final_margins.npz", buffer.getvalue())


# --- summaries and report (files only) ----------------------------------------------------------


def _first_iteration(rows: Sequence[dict[str, Any]], predicate) -> int | None:
    for row in sorted(rows, key=lambda row: row["iteration"]):
        if predicate(row):
            return int(row["iteration"])
    return None


def summarize_metrics(
    metrics: Sequence[dict[str, Any]],
    timings: Sequence[dict[str, Any]],
    num_classes: int,
    temperature: float,
) -> dict[str, Any]:
    """The summary.json content from the long-format rows.

    Per method, over seeds (median / min / max; :func:`guided_nc.report.summarize`):

    * ``iters_to_full_acc``: first evaluated iteration with 100 % training accuracy;
    * ``iters_to_bound``: first iteration with ``loss <= 1.01 * ce_lower_bound(K, tau)``;
      a seed that never gets there is ``null`` in ``per_seed`` and ranks above every number in
      the summary (so the median is ``null`` when at least half never get there);
    * ``final``: every metric at the last iteration;
    * ``seconds_per_iteration``: per seed the median step time (iteration 1, which includes
      one-off allocations, excluded when there are more).
    """
    bound = ce_lower_bound(num_classes, temperature)
    methods: dict[str, Any] = {}
    names = [method for method in METHODS if any(row["method"] == method for row in metrics)]
    for method in names:
        seeds = sorted({row["seed"] for row in metrics if row["method"] == method})
        per_seed: dict[str, list] = {"iters_to_full_acc": [], "iters_to_bound": []}
        finals: dict[str, list] = {}
        step_times = []
        for seed in seeds:
            rows = [row for row in metrics if row["method"] == method and row["seed"] == seed]
            per_seed["iters_to_full_acc"].append(
                _first_iteration(rows, lambda row: row["acc1"] >= 100.0)
            )
            per_seed["iters_to_bound"].append(
                _first_iteration(rows, lambda row: row["loss"] <= BOUND_FACTOR * bound)
            )
            last = max(rows, key=lambda row: row["iteration"])
            for key in ("loss", "acc1", *NC_COLUMNS):
                finals.setdefault(key, []).append(last.get(key))
            seconds = [
                row["step_seconds"]
                for row in timings
                if row["method"] == method
                and row["seed"] == seed
                and (row["iteration"] > 1 or len(rows) <= 2)
            ]
            step_times.append(float(np.median(seconds)) if seconds else None)
        methods[method] = {
            "seeds": seeds,
            "iters_to_full_acc": report.summarize(per_seed["iters_to_full_acc"], "largest"),
            "iters_to_bound": report.summarize(per_seed["iters_to_bound"], "largest"),
            "reached_full_acc": sum(value is not None for value in per_seed["iters_to_full_acc"]),
            "reached_bound": sum(value is not None for value in per_seed["iters_to_bound"]),
            "per_seed": per_seed,
            "final": {key: report.summarize(values) for key, values in finals.items()},
            "seconds_per_iteration": report.summarize(step_times),
            "seconds_per_iteration_per_seed": step_times,
        }
    overhead = None
    if "implicit" in methods and "standard" in methods:
        implicit = methods["implicit"]["seconds_per_iteration"]["median"]
        standard = methods["standard"]["seconds_per_iteration"]["median"]
        if implicit is not None and standard:
            overhead = implicit / standard
    return {
        "ce_lower_bound": bound,
        "bound_factor": BOUND_FACTOR,
        "implicit_over_standard_time": overhead,
        "methods": methods,
    }


#: (file stem, column, title, y label, log y) of the per-metric band figures.
FIGURES = (
    ("loss", "loss", "Cross-entropy loss", "loss", True),
    ("excess_loss", "excess_loss", "Loss above the CE bound", "loss - L*", True),
    ("accuracy", "acc1", "Training accuracy", "top-1 (%)", False),
    ("nc1", "nc1", "NC1: within-class variability", "tr(Sw Sb+)/K", True),
    ("nc2", "nc2_w", "NC2: classifier ETF deviation", "NC2 (W)", True),
    ("nc2_features", "nc2_h", "NC2: feature-mean ETF deviation", "NC2 (H)", True),
    ("nc3", "nc3", "NC3: self-duality", "NC3", True),
    ("equinorm", "equinorm", "Equinorm: |CV_H - CV_W|", "|CV_H - CV_W|", True),
    ("margin", "margin_mean", "Mean cosine margin", "margin", False),
)


def _labelled(series: dict[str, Any]) -> dict[str, Any]:
    return {METHOD_LABELS.get(name, name): value for name, value in series.items()}


def _colors() -> dict[str, str]:
    return {METHOD_LABELS[name]: color for name, color in METHOD_COLORS.items()}


def _draw(ax, stem, column, title, ylabel, log_y, metrics, bound, etf_margin, log_x):
    series = report.series_from_rows(metrics, "iteration", column, "method", "seed")
    if log_x:
        # Iteration 0 cannot sit on a log axis: shift by one ("steps + 1").
        series = {key: (xs + 1, values) for key, (xs, values) in series.items()}
    reference, reference_label = None, None
    if stem == "loss":
        reference, reference_label = bound, f"CE bound {bound:.4g}"
    elif stem == "margin":
        reference, reference_label = etf_margin, f"ETF margin {etf_margin:.4g}"
    elif stem == "excess_loss":
        reference, reference_label = 0.01 * bound, "0.01 L* (the 'reached' threshold)"
    elif stem == "accuracy":
        reference, reference_label = 100.0, None
    report.plot_median_bands(
        _labelled(series),
        ax=ax,
        title=title,
        xlabel="iteration + 1" if log_x else "iteration",
        ylabel=ylabel,
        reference=reference,
        reference_label=reference_label,
        log_x=log_x,
        log_y=log_y,
        colors=_colors(),
    )


def _record_finished_runs(config_path: Path, finished: list[tuple[int, int, Path]]) -> None:
    """Set the folder config's ``methods`` and ``seeds`` to those of its finished runs.

    Several invocations may share a folder (one per seed range, run in parallel); each rewrites
    ``config.json`` with its own seeds, so after merging it records what the folder holds.
    """
    if not config_path.exists():
        return
    saved = report.read_json(config_path)
    done_methods = {METHODS[index] for index, _, _ in finished}
    saved["config"]["methods"] = [method for method in METHODS if method in done_methods]
    saved["config"]["seeds"] = sorted({seed for _, seed, _ in finished})
    report.atomic_write_json(config_path, saved)


def build_report(out_dir: str | os.PathLike, log_x: bool = True) -> Path:
    """Write summary.json, the figures and report.md of one preset folder from its files only.

    Reads ``config.json``, ``metrics.csv``, ``timings.csv`` and ``final_margins.npz`` (written
    by :func:`run_preset` / :func:`merge_runs`). Returns the path of report.md.
    """
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    saved = report.read_json(out_dir / "config.json")["config"]
    preset = Preset(**saved["preset"])
    temperature = saved["temperature"]
    metrics = report.read_long_csv(out_dir / "metrics.csv")
    timings = report.read_long_csv(out_dir / "timings.csv")
    with np.load(out_dir / "final_margins.npz", allow_pickle=False) as archive:
        margins = {key: archive[key] for key in archive.files}
    summary = summarize_metrics(metrics, timings, preset.num_classes, temperature)
    # Derived column for the figures only: how far the loss is above the bound.
    bound = summary["ce_lower_bound"]
    metrics = [{**row, "excess_loss": row["loss"] - bound} for row in metrics]
    summary = {"preset": dataclasses.asdict(preset), "config": saved, **summary}
    report.atomic_write_json(out_dir / "summary.json", summary)

    etf_margin = preset.num_classes / (preset.num_classes - 1)
    figures = []
    for stem, column, title, ylabel, log_y in FIGURES:
        ax = plt.subplots(figsize=(5.0, 3.6))[1]
        _draw(ax, stem, column, title, ylabel, log_y, metrics, bound, etf_margin, log_x)
        report.save_figure(ax.figure, out_dir / f"{stem}.png")
        figures.append((stem, title))
    pooled = {}
    for method in METHODS:
        arrays = [value for key, value in margins.items() if key.split("/")[0] == method]
        if arrays:
            pooled[METHOD_LABELS[method]] = np.concatenate(arrays)
    report.plot_histograms(
        pooled,
        path=out_dir / "margin_distribution.png",
        title=f"Final cosine margins (all samples, all seeds, iteration {saved['iterations']})",
        xlabel="cosine margin",
        reference=etf_margin,
        reference_label=f"ETF margin {etf_margin:.4g}",
        colors=_colors(),
    )
    figures.append(("margin_distribution", "Final cosine-margin distribution"))

    overview, axes = plt.subplots(2, 5, figsize=(25, 8.5), layout="constrained")
    for ax, (stem, column, title, ylabel, log_y) in zip(axes.flat, FIGURES, strict=False):
        _draw(ax, stem, column, title, ylabel, log_y, metrics, bound, etf_margin, log_x)
    report.plot_histograms(
        pooled,
        ax=axes.flat[len(FIGURES)],
        title="Final cosine margins",
        xlabel="cosine margin",
        reference=etf_margin,
        colors=_colors(),
    )
    overview.suptitle(
        f"{preset.name}: K={preset.num_classes}, N={preset.num_samples}, "
        f"d={preset.num_features} - median and min-max over seeds"
    )
    report.save_figure(overview, out_dir / "overview.png")

    step_times = out_dir / "step_times.json"
    if step_times.exists():
        summary["interleaved_step_times"] = report.read_json(step_times)
        report.atomic_write_json(out_dir / "summary.json", summary)
    text = _preset_markdown(summary, preset, figures)
    return report.atomic_write_text(out_dir / "report.md", text)


def _fmt_iterations(summary: dict[str, Any]) -> str:
    return report.format_median_range(summary, fmt="{:.0f}", missing_text="never")


def _preset_markdown(summary: dict[str, Any], preset: Preset, figures) -> str:
    config = summary["config"]
    methods = summary["methods"]
    batch = "full batch" if config["batch_size"] is None else f"batch {config['batch_size']}"
    optimiser = (
        f"AGD gain {config['gain']}" if config["optimizer"] == "agd" else config["optimizer"]
    )
    lines = [
        f"# {preset.name}: K={preset.num_classes}, N={preset.num_samples}, d={preset.num_features}",
        "",
        f"{config['iterations']} iterations, {optimiser}, {batch}, tau {config['temperature']}, "
        f"DDN gradient {'on' if config['ddn_grad'] else 'off'}. Median [min, max] over seeds.",
        f"CE lower bound L*(K, tau) = {summary['ce_lower_bound']:.4f}; 'reached the bound' means "
        f"loss <= {summary['bound_factor']} x L*. 'never' = not within the run (ranked last).",
        "",
        "## Convergence",
        "",
    ]
    header = ["method", "seeds", "iters to 100 % acc", "reached", "iters to bound", "reached"]
    rows = []
    for method, data in methods.items():
        count = len(data["seeds"])
        rows.append(
            [
                METHOD_LABELS[method],
                count,
                _fmt_iterations(data["iters_to_full_acc"]),
                f"{data['reached_full_acc']}/{count}",
                _fmt_iterations(data["iters_to_bound"]),
                f"{data['reached_bound']}/{count}",
            ]
        )
    lines += [report.markdown_table(header, rows), "## Final state (last iteration)", ""]
    keys = ("loss", "acc1", "nc1", "nc2_w", "nc2_h", "nc3", "equinorm", "margin_mean", "margin_min")
    rows = [
        [METHOD_LABELS[method]]
        + [report.format_median_range(data["final"][key], fmt="{:.3g}") for key in keys]
        for method, data in methods.items()
    ]
    lines += [report.markdown_table(["method", *keys], rows)]
    lines += ["## Time per iteration", ""]
    rows = [
        [
            METHOD_LABELS[method],
            report.format_median_range(
                {
                    k: None if v is None else 1000 * v
                    for k, v in data["seconds_per_iteration"].items()
                },
                fmt="{:.2f}",
            ),
        ]
        for method, data in methods.items()
    ]
    lines += [report.markdown_table(["method", "ms per step (median of steps)"], rows)]
    if summary["implicit_over_standard_time"] is not None:
        lines += [
            f"Implicit ETF step time / standard step time: "
            f"{summary['implicit_over_standard_time']:.2f}x (training step only: forward, "
            f"backward, optimiser; evaluation excluded).",
            "",
        ]
    interleaved = summary.get("interleaved_step_times")
    if interleaved is not None:
        medians = interleaved["median_seconds"]
        standard = medians.get("standard")
        rows = [
            [
                METHOD_LABELS.get(variant, "Implicit ETF, no DDN gradient"),
                report.format_median_range([1000 * value for value in seconds], fmt="{:.2f}"),
                "-" if not standard else f"{medians[variant] / standard:.2f}x",
            ]
            for variant, seconds in interleaved["seconds"].items()
        ]
        lines += [
            f"Interleaved timing (`--time-steps {interleaved['steps']}`: one full-batch step of "
            f"each method in turn, {interleaved['environment']['torch_threads']} thread(s)):",
            "",
            report.markdown_table(["method", "ms per step", "/ standard"], rows),
        ]
    lines += ["## Figures", "", "![overview](overview.png)", ""]
    lines += [f"![{title}]({stem}.png)" for stem, title in figures]
    return "\n".join(lines) + "\n"


def build_scaling_report(root: str | os.PathLike, preset_dirs: Sequence[str | os.PathLike]) -> Path:
    """Compare several preset folders (each with summary.json): iterations to convergence and
    time per step versus K. Writes ``root/summary.json``, ``root/convergence_vs_classes.png``
    and ``root/report.md`` (which links each preset's report). Returns the report path."""
    import matplotlib.pyplot as plt

    root = Path(root)
    summaries = {}
    for folder in preset_dirs:
        folder = Path(folder)
        summary = report.read_json(folder / "summary.json")
        summaries[summary["preset"]["name"]] = (folder, summary)
    order = sorted(summaries, key=lambda name: summaries[name][1]["preset"]["num_classes"])
    report.atomic_write_json(
        root / "summary.json", {"presets": {name: summaries[name][1] for name in order}}
    )

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    for ax, key, title in (
        (axes[0], "iters_to_full_acc", "Iterations to 100 % training accuracy"),
        (axes[1], "iters_to_bound", "Iterations to loss <= 1.01 x CE bound"),
        (axes[2], "seconds_per_iteration", "Seconds per training step"),
    ):
        series = {}
        for method in METHODS:
            xs, values = [], []
            for name in order:
                data = summaries[name][1]["methods"].get(method)
                if data is None:
                    continue
                xs.append(summaries[name][1]["preset"]["num_classes"])
                if key == "seconds_per_iteration":
                    per_seed = data["seconds_per_iteration_per_seed"]
                else:
                    per_seed = data["per_seed"][key]
                values.append([math.nan if value is None else value for value in per_seed])
            if xs:
                width = max(len(row) for row in values)
                matrix = np.full((width, len(xs)), np.nan)
                for column, row in enumerate(values):
                    matrix[: len(row), column] = row
                series[METHOD_LABELS[method]] = (np.asarray(xs, float), matrix)
        report.plot_median_bands(
            series,
            ax=ax,
            title=title,
            xlabel="number of classes K",
            log_x=True,
            log_y=key == "seconds_per_iteration",
            marker="o",
            colors=_colors(),
        )
    axes[0].set_ylabel("iterations (seeds that got there)")
    figure.suptitle(
        "UFM scaling: median and min-max over seeds (runs that never got there omitted)"
    )
    report.save_figure(figure, root / "convergence_vs_classes.png")

    lines = ["# UFM: scaling with the number of classes", ""]
    header = ["preset", "K"] + [
        f"{METHOD_LABELS[m]} {what}" for what in ("acc", "bound") for m in METHODS
    ]
    rows = []
    for name in order:
        summary = summaries[name][1]
        row = [name, summary["preset"]["num_classes"]]
        for key in ("iters_to_full_acc", "iters_to_bound"):
            for method in METHODS:
                data = summary["methods"].get(method)
                if data is None:
                    row.append("-")
                else:
                    reached = data[
                        "reached_full_acc" if key == "iters_to_full_acc" else "reached_bound"
                    ]
                    row.append(f"{_fmt_iterations(data[key])} ({reached}/{len(data['seeds'])})")
        rows.append(row)
    lines += [
        "Iterations to 100 % training accuracy ('acc') and to loss <= 1.01 x CE bound ('bound'): "
        "median [min, max] over seeds (seeds that got there / seeds).",
        "",
        report.markdown_table(header, rows),
    ]
    header = ["preset"] + [f"{METHOD_LABELS[m]} ms/step" for m in METHODS] + ["implicit / standard"]
    rows = []
    for name in order:
        summary = summaries[name][1]
        row = [name]
        for method in METHODS:
            data = summary["methods"].get(method)
            row.append(
                "-"
                if data is None
                else report.format_median_range(
                    {
                        k: None if v is None else 1000 * v
                        for k, v in data["seconds_per_iteration"].items()
                    },
                    fmt="{:.1f}",
                )
            )
        ratio = summary["implicit_over_standard_time"]
        row.append("-" if ratio is None else f"{ratio:.2f}x")
        rows.append(row)
    lines += [
        "Time per training step (median [min, max] over seeds):",
        "",
        report.markdown_table(header, rows),
    ]
    lines += ["![convergence vs K](convergence_vs_classes.png)", ""]
    for name in order:
        folder = summaries[name][0]
        relative = os.path.relpath(folder / "report.md", root)
        lines.append(f"- [{name}]({relative})")
    return report.atomic_write_text(root / "report.md", "\n".join(lines) + "\n")


# --- command line -------------------------------------------------------------------------------

#: Settings of ``guided-nc demo``: UFM-10, every method, 5 seeds, sized to finish in < 5 minutes on
#: a 2-core CPU (measured; see docs/ufm.md).
DEMO_ITERATIONS = 800
DEMO_EVAL_INTERVAL = 100
#: UFM-10's tensors are small: one thread avoids OpenMP spinning on a busy machine.
DEMO_THREADS = 1


def _parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown} in {text!r}; use a comma-separated subset of "
            f"{','.join(METHODS)}"
        )
    return methods


def _parse_presets(text: str) -> tuple[Preset, ...]:
    try:
        return tuple(parse_preset(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else an error naming value and bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)"
    )


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ufm`` and ``demo`` subcommands."""
    parser = subparsers.add_parser(
        "ufm",
        help="unconstrained-feature-model experiments (paper section 4, Figs. 2-3)",
        description="Train free features with the standard, fixed-ETF and implicit-ETF heads "
        "and write metrics.csv, summary.json, figures and report.md. See docs/ufm.md.",
    )
    parser.add_argument(
        "--preset",
        type=_parse_presets,
        default=_parse_presets("ufm-10"),
        help="comma-separated presets: ufm-10, ufm-100, ufm-200, ufm-1000, or K:N:d "
        "(default ufm-10). Several presets go to OUT/<preset>/ plus a comparison in OUT.",
    )
    parser.add_argument(
        "--methods", type=_parse_methods, default=METHODS, help="default standard,fixed,implicit"
    )
    parser.add_argument("--seeds", type=_positive_int, default=5, help="number of seeds (5)")
    parser.add_argument("--first-seed", type=_non_negative_int, default=0, help="first seed (0)")
    parser.add_argument("--iterations", type=_positive_int, default=2000, help="steps (2000)")
    parser.add_argument(
        "--optimizer", choices=("agd", "sgd", "adam", "adamw"), default="agd", help="(agd)"
    )
    parser.add_argument("--gain", type=float, default=10.0, help="AGD gain (10)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (optimiser default)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    parser.add_argument("--weight-decay", type=float, default=None, help="(optimiser default)")
    parser.add_argument("--schedule", choices=("none", "cosine"), default="none")
    parser.add_argument(
        "--batch-size",
        type=_non_negative_int,
        default=0,
        help="0 = full batch (default); else stratified batches of this size",
    )
    parser.add_argument("--eval-interval", type=_positive_int, default=20, help="NC metrics (20)")
    parser.add_argument("--temperature", type=float, default=5.0, help="tau (5)")
    parser.add_argument("--delta", type=float, default=1e-3, help="implicit head prox (1e-3)")
    parser.add_argument(
        "--no-ddn-grad", action="store_true", help="implicit head: no gradient through the ETF"
    )
    parser.add_argument("--out", default="runs/ufm", help="output folder (runs/ufm)")
    parser.add_argument(
        "--time-steps",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="only time STEPS interleaved full-batch steps of every method (and the implicit "
        "head without DDN gradient) per preset; writes OUT[/<preset>]/step_times.json",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild summary, figures and report from the files in --out (no training)",
    )
    _add_common(parser)
    parser.set_defaults(func=_ufm_command)

    demo = subparsers.add_parser(
        "demo",
        help="a quick UFM-10 comparison of the three heads (5 seeds, < 5 min on 2 CPU cores)",
        description="UFM-10 (K=10, N=1000, d=512), standard / fixed / implicit ETF, 5 seeds, "
        f"{DEMO_ITERATIONS} full-batch AGD steps; prints the path of report.md.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (runs/demo)")
    _add_common(demo)
    demo.set_defaults(threads=DEMO_THREADS)
    demo.set_defaults(func=_demo_command)


def _configs(args: argparse.Namespace) -> list[UFMConfig]:
    seeds = tuple(range(args.first_seed, args.first_seed + args.seeds))
    return [
        UFMConfig(
            preset=preset,
            methods=args.methods,
            seeds=seeds,
            iterations=args.iterations,
            temperature=args.temperature,
            optimizer=args.optimizer,
            gain=args.gain,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            schedule=args.schedule,
            batch_size=args.batch_size or None,
            eval_interval=args.eval_interval,
            ddn_grad=not args.no_ddn_grad,
            delta=args.delta,
        )
        for preset in args.preset
    ]


def run_ufm(configs: Sequence[UFMConfig], out: str | os.PathLike, progress: bool = True) -> Path:
    """Run one or several presets. One preset writes straight into ``out``; several write to
    ``out/<preset>/`` and a comparison into ``out``. Returns the top report.md."""
    out = Path(out)
    if len(configs) == 1:
        return run_preset(configs[0], out, progress)
    folders = []
    for config in configs:
        folder = out / config.preset.name
        run_preset(config, folder, progress)
        folders.append(folder)
    return build_scaling_report(out, folders)


def _ufm_command(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        if args.time_steps is not None:
            configs = _configs(args)
            for config in configs:
                folder = out if len(configs) == 1 else out / config.preset.name
                times = measure_step_times(config, steps=args.time_steps)
                result = {
                    "preset": dataclasses.asdict(config.preset),
                    "steps": args.time_steps,
                    "environment": _environment(),
                    "seconds": times,
                    "median_seconds": {
                        key: float(np.median(value)) for key, value in times.items()
                    },
                }
                path = report.atomic_write_json(folder / "step_times.json", result)
                medians = ", ".join(
                    f"{key} {1000 * value:.1f} ms"
                    for key, value in result["median_seconds"].items()
                )
                print(f"{config.preset.name}: {medians}", file=sys.stderr)
        elif args.report_only:
            folders = [out] if len(args.preset) == 1 else [out / p.name for p in args.preset]
            for folder in folders:
                merge_runs(folder)  # whatever runs have finished (done.json)
                path = build_report(folder)
            if len(folders) > 1:
                path = build_scaling_report(out, folders)
        else:
            path = run_ufm(_configs(args), out, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"guided-nc ufm: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = UFMConfig(
        preset=PRESETS["ufm-10"],
        iterations=DEMO_ITERATIONS,
        eval_interval=DEMO_EVAL_INTERVAL,
    )
    started = time.time()
    path = run_preset(config, args.out, progress=not args.no_progress)
    print(f"demo finished in {time.time() - started:.0f} s", file=sys.stderr)
    print(path)
    return 0
