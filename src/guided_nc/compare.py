"""Multi-seed comparison of the heads: the runs behind ``guided-nc compare``.

DomainBed's pattern: every (method, seed) pair trains in its own run folder through
:func:`guided_nc.train.fit`, which writes files; :func:`guided_nc.reports.compare.write_report`
only reads those files, so it can be rebuilt at any time (``--report-only``) and an interrupted
comparison continues where it stopped: runs with a ``done`` marker are skipped, runs with a
checkpoint are resumed. With ``--schedule none`` a larger ``--epochs`` extends finished runs
exactly (see :meth:`guided_nc.config.TrainConfig.extends`).

Folder layout (``--out``)::

    kind                     "compare", written first (see guided_nc.runfiles.check_kind)
    runs/<method>/seed<k>/   one run folder each (see guided_nc.train)
    timing.json              per-head time per step and memory, measured in one process
    tables.md, tables.tex, figures/, report.md    written by the report
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from guided_nc import distributed
from guided_nc.config import TrainConfig
from guided_nc.methods import METHOD_VARIANTS, METHODS, TIMED_METHODS, method_variant
from guided_nc.runfiles import atomic_write_json, check_kind, mark_kind, read_done, run_folder
from guided_nc.runtime import resolve_device
from guided_nc.settings import HeadSettings
from guided_nc.timing import measure_heads as time_heads

__all__ = ["measure_heads", "method_config", "run_comparison"]


def run_comparison(
    base: TrainConfig,
    methods: tuple[str, ...] = METHODS,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    out: str | Path = "runs/compare",
    timing_repeats: int = 5,
) -> Path:
    """Train every (method, seed) that has no ``done`` marker, and time the heads once.

    Args:
        base: the shared configuration; ``method``, ``seed``, ``out`` and ``resume`` are set per
            run. ``base.ddn_grad`` applies to the implicit head (``--no-ddn-grad``); the
            variants fix their own options.
        methods: methods to compare (:data:`guided_nc.methods.METHOD_VARIANTS`: the three heads
            and the variants ``fixed-haar`` and ``implicit-no-ddn``); each has its own run
            folder ``runs/<method>/seed<k>``.
        seeds: one run per seed and method (all methods see the same batches at a seed).
        out: comparison folder.
        timing_repeats: steps per head for Table 3 (:func:`measure_heads`, every timed method
            whatever ``methods`` is); 0 skips it.

    Returns:
        the comparison folder (build its report with
        :func:`guided_nc.reports.compare.write_report`).
    """
    unknown = sorted(set(methods) - set(METHOD_VARIANTS))
    if unknown or not methods:
        raise ValueError(
            f"methods={list(methods)} must be a non-empty subset of {list(METHOD_VARIANTS)}"
        )
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. --seeds 5")
    from guided_nc import train  # fit is looked up at call time (tests record the calls)

    out = Path(out)
    check_kind(out, "compare")
    device_type = "cuda" if base.device == "cuda" else "cpu"
    if base.device == "auto" and torch.cuda.is_available():
        device_type = "cuda"
    created_group = distributed.init_from_environment(device_type)
    try:
        if distributed.is_main_process():
            mark_kind(out, "compare")  # the folder's first write
        for method in methods:
            for seed in seeds:
                folder = run_folder(out, method, seed)
                config = dataclasses.replace(
                    method_config(base, method),
                    seed=seed,
                    out=str(folder),
                    resume=(folder / "checkpoint.pt").exists(),
                )
                if read_done(folder) is not None and _finished_as_requested(config, folder):
                    continue  # finished (a longer --epochs with --schedule none extends it)
                train.fit(config)
        timing_path = out / "timing.json"
        # The measurement runs heads on one process; under torchrun the ETF heads would wait
        # for all-reduces from ranks that do not run it, so it is a single-process job.
        if timing_repeats > 0 and not timing_path.exists() and distributed.world_size() == 1:
            # Every head, whatever --methods trains: the table's "vs standard" needs the
            # standard head, and per-method invocations (run in parallel) share one table.
            atomic_write_json(timing_path, measure_heads(base, repeats=timing_repeats))
        distributed.barrier()
        return out
    finally:
        if created_group:
            distributed.destroy_process_group()


def method_config(base: TrainConfig, method: str) -> TrainConfig:
    """``base`` for one method: its head, and the variant's options applied to the head settings
    (:meth:`guided_nc.settings.HeadSettings.for_method`); the options a head does not have are
    reset to their defaults (a config keeps ``ddn_grad`` and ``rotation`` for its own head)."""
    variant = method_variant(method)
    settings = base.head_settings().for_method(method)
    defaults = HeadSettings()
    return dataclasses.replace(
        base,
        method=variant.head,
        ddn_grad=settings.ddn_grad if variant.head == "implicit" else defaults.ddn_grad,
        rotation=settings.rotation if variant.head == "fixed" else defaults.rotation,
    )


def _finished_as_requested(config: TrainConfig, folder: Path) -> bool:
    """Whether a finished run can be skipped: True if it is this configuration's run, False if
    ``config`` extends it (``fit`` then trains it further). Any other difference is an error:
    pooling runs trained with other settings into one table would be silently wrong.
    """
    saved = TrainConfig.load(folder / "config.json")
    if config.extends(saved):
        return False
    changed = config.resume_mismatches(saved)
    if changed:
        values = ", ".join(
            f"{key}: {getattr(saved, key)!r} there, {getattr(config, key)!r} now" for key in changed
        )
        raise ValueError(
            f"{folder} holds a finished run with a different configuration ({values}); pass the "
            "same settings to add seeds or methods to this comparison, or choose another --out "
            "(delete that run folder to retrain it)"
        )
    return True


def measure_heads(
    base: TrainConfig, methods: tuple[str, ...] = TIMED_METHODS, repeats: int = 5
) -> dict[str, Any]:
    """Time per step and memory of each head on the comparison's model and one real batch.

    Uses :func:`guided_nc.timing.measure_heads`: one process, the same initial backbone for
    every head, interleaved repeats; the implicit head is measured with and without the DDN
    gradient (paper Table 3).
    """
    from guided_nc.data import build_datasets
    from guided_nc.sampler import StratifiedBatchSampler
    from guided_nc.train import build_backbone_for

    if base.threads:
        torch.set_num_threads(base.threads)
    device = resolve_device(base.device)
    torch.manual_seed(base.seed)
    data = build_datasets(base.dataset, root=base.data_root, download=base.download, augment=False)
    sampler = StratifiedBatchSampler(data.train_labels, batch_size=base.batch_size, seed=base.seed)
    inputs, labels = next(iter(data.train_loader(sampler)))
    backbone = build_backbone_for(base, data.input_shape)
    results = time_heads(
        backbone.to(device),
        data.num_classes,
        inputs.to(device),
        labels.to(device),
        methods=methods,
        repeats=repeats,
        warmup=1,
        optimizer_name=base.optimizer if base.optimizer in ("agd", "sgd") else "sgd",
        settings=base.head_settings(),
    )
    return {
        "dataset": base.dataset,
        "model": base.model,
        "batch_size": base.batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "heads": results,
    }
