"""Multi-seed comparison of the three heads: ``guided-nc compare``.

DomainBed's pattern: every (method, seed) pair trains in its own run folder through
:func:`guided_nc.train.fit`, which writes files; the report only reads those files, so it can be
rebuilt at any time (``--report-only``) and an interrupted comparison continues where it
stopped: runs with a ``done`` marker are skipped, runs with a checkpoint are resumed. With
``--schedule none`` a larger ``--epochs`` extends finished runs exactly (see
:meth:`guided_nc.config.TrainConfig.extends`).

Folder layout (``--out``)::

    runs/<method>/seed<k>/   one run folder each (see guided_nc.train)
    timing.json              per-head time per step and memory, measured in one process
    tables.md, tables.tex    Table 1/2 layout (top-1 median [range]) and Table 3 layout
    figures/*.png            accuracy and NC metrics over epochs (median line, min-max band)
    report.md                everything above in one page
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from guided_nc import distributed
from guided_nc.config import METHODS, TrainConfig, add_config_arguments

__all__ = [
    "measure_heads",
    "register_cli",
    "run_comparison",
    "run_folder",
    "write_report",
]

#: Metrics drawn in the NC figure (train split), with whether to use a log y-axis.
NC_FIGURE_METRICS = (
    ("nc1", "NC1: tr(Σ_W Σ_B⁺)/K", True),
    ("nc2_w", "NC2 (classifier)", True),
    ("nc2_h", "NC2 (features)", True),
    ("nc3", "NC3 (self-duality)", True),
)
METHOD_LABELS = {"standard": "standard", "fixed": "fixed ETF", "implicit": "implicit ETF"}


def run_folder(out: str | Path, method: str, seed: int) -> Path:
    """Folder of one run: ``<out>/runs/<method>/seed<seed>``."""
    return Path(out) / "runs" / method / f"seed{seed}"


def run_comparison(
    base: TrainConfig,
    methods: tuple[str, ...] = METHODS,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    out: str | Path = "runs/compare",
    timing_repeats: int = 5,
    table_epochs: tuple[int, ...] | None = None,
) -> Path:
    """Train every (method, seed) that has no ``done`` marker, then write the report.

    Args:
        base: the shared configuration; ``method``, ``seed``, ``out`` and ``resume`` are set per
            run (``ddn_grad`` is forced True: the comparison uses the paper's implicit head).
        methods: heads to compare, a subset of :data:`guided_nc.config.METHODS`.
        seeds: one run per seed and method (all methods see the same batches at a seed).
        out: comparison folder.
        timing_repeats: steps per head for Table 3 (:func:`measure_heads`, all heads whatever
            ``methods`` is); 0 skips it.
        table_epochs: epochs shown in the accuracy table (default: first and last evaluated).

    Returns:
        the path of ``report.md``.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods={list(methods)} must be a non-empty subset of {list(METHODS)}")
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. --seeds 5")
    out = Path(out)
    device_type = "cuda" if base.device == "cuda" else "cpu"
    if base.device == "auto" and torch.cuda.is_available():
        device_type = "cuda"
    created_group = distributed.init_from_environment(device_type)
    try:
        for method in methods:
            for seed in seeds:
                folder = run_folder(out, method, seed)
                if (folder / "done").exists() and not base.extends(
                    TrainConfig.load(folder / "config.json")
                ):
                    continue  # finished (a longer --epochs with --schedule none extends it)
                config = dataclasses.replace(
                    base,
                    method=method,
                    seed=seed,
                    ddn_grad=True,
                    out=str(folder),
                    resume=(folder / "checkpoint.pt").exists(),
                )
                from guided_nc.train import fit

                fit(config)
        timing_path = out / "timing.json"
        if timing_repeats > 0 and not timing_path.exists():
            # The measurement runs heads on one process; under torchrun the ETF heads would wait
            # for all-reduces from ranks that do not run it, so it is a single-process job.
            if distributed.world_size() == 1:
                from guided_nc.checkpoint import atomic_write_text

                # Every head, whatever --methods trains: the table's "vs standard" needs the
                # standard head, and per-method invocations (run in parallel) share one table.
                timing = measure_heads(base, repeats=timing_repeats)
                atomic_write_text(timing_path, json.dumps(timing, indent=2) + "\n")
        report = out / "report.md"
        if distributed.is_main_process():
            report = write_report(out, table_epochs=table_epochs)
        distributed.barrier()
        return report
    finally:
        if created_group:
            distributed.destroy_process_group()


def measure_heads(
    base: TrainConfig, methods: tuple[str, ...] = METHODS, repeats: int = 5
) -> dict[str, Any]:
    """Time per step and memory of each head on the comparison's model and one real batch.

    Uses :func:`guided_nc.bench.step.measure_steps`: one process, the same initial backbone for
    every head, interleaved repeats; the implicit head is measured with and without the DDN
    gradient (paper Table 3).
    """
    from guided_nc.bench.step import measure_steps
    from guided_nc.data import build_datasets
    from guided_nc.sampler import StratifiedBatchSampler
    from guided_nc.train import _resolve_device, build_backbone_for

    if base.threads:
        torch.set_num_threads(base.threads)
    device = _resolve_device(base.device)
    torch.manual_seed(base.seed)
    data = build_datasets(base.dataset, root=base.data_root, download=base.download, augment=False)
    sampler = StratifiedBatchSampler(data.train_labels, batch_size=base.batch_size, seed=base.seed)
    inputs, labels = next(iter(data.train_loader(sampler)))
    backbone = build_backbone_for(base, data.input_shape)
    heads = [m for m in methods if m != "implicit"]
    if "implicit" in methods:
        heads += ["implicit", "implicit-no-ddn"]
    results = measure_steps(
        backbone.to(device),
        data.num_classes,
        inputs.to(device),
        labels.to(device),
        heads=tuple(heads),
        repeats=repeats,
        warmup=1,
        optimizer_name=base.optimizer if base.optimizer in ("agd", "sgd") else "sgd",
        temperature=base.temperature,
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


# ----------------------------------------------------------------------------- the report
def _load_runs(out: Path) -> list[dict[str, Any]]:
    from guided_nc.report import load_run_folders, read_json

    runs = []
    for run in load_run_folders(out / "runs", marker="done"):
        config = run["config"]["config"]
        summary_path = run["path"] / "summary.json"
        runs.append(
            {
                "method": config["method"],
                "seed": config["seed"],
                "config": config,
                "rows": run["rows"],
                "summary": read_json(summary_path) if summary_path.exists() else {},
            }
        )
    return runs


def _value_at(rows: list[dict[str, Any]], epoch: int, key: str) -> Any:
    for row in rows:
        if row.get("epoch") == epoch:
            return row.get(key)
    return None


def _accuracy_table(
    runs: list[dict[str, Any]], methods: list[str], epochs: list[int]
) -> tuple[list[str], list[list[str]]]:
    from guided_nc.report import format_median_range

    header = ["method", "seeds"]
    header += [f"train top-1 @{e}" for e in epochs] + [f"test top-1 @{e}" for e in epochs]
    rows = []
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        row = [METHOD_LABELS.get(method, method), str(len(mine))]
        for split in ("train", "test"):
            for epoch in epochs:
                values = [_value_at(run["rows"], epoch, f"{split}_acc1") for run in mine]
                row.append(format_median_range(values, fmt="{:.2f}"))
        rows.append(row)
    return header, rows


def _cost_table(
    runs: list[dict[str, Any]], methods: list[str], timing: dict[str, Any] | None
) -> tuple[list[str], list[list[str]]]:
    from guided_nc.report import format_median_range

    header = [
        "head",
        "time per step, training runs (ms)",
        "peak memory, training runs (MiB)",
        "time per step, same-process bench (ms)",
        "vs standard",
        "bench memory (MiB)",
    ]
    measured = (timing or {}).get("heads", {})
    names = [m for m in methods if m != "implicit"]
    if "implicit" in methods:
        names += ["implicit", "implicit-no-ddn"]
    rows = []
    for name in names:
        mine = [run for run in runs if run["method"] == name]
        step_ms = [
            1000 * run["summary"]["time_per_step_s"]
            for run in mine
            if run["summary"].get("time_per_step_s") is not None
        ]
        memory = [
            run["summary"]["peak_memory_mb"]
            for run in mine
            if run["summary"].get("peak_memory_mb") is not None
        ]
        bench = measured.get(name)
        label = "implicit ETF, no DDN gradient" if name == "implicit-no-ddn" else name
        label = METHOD_LABELS.get(label, label)
        rows.append(
            [
                label,
                format_median_range(step_ms, fmt="{:.1f}", missing_text="-"),
                format_median_range(memory, fmt="{:.0f}", missing_text="-"),
                "-" if bench is None else f"{1000 * bench['time_per_step_s']:.1f}",
                "-"
                if bench is None or "overhead_percent" not in bench
                else f"{bench['overhead_percent']:+.1f} %",
                "-" if bench is None else f"{bench['peak_memory_mb']:.1f}",
            ]
        )
    return header, rows


def _figures(out: Path, runs: list[dict[str, Any]], methods: list[str]) -> list[Path]:
    import matplotlib.pyplot as plt

    from guided_nc.report import plot_median_bands, save_figure, series_from_rows

    long_rows = [
        {"method": METHOD_LABELS.get(run["method"], run["method"]), "seed": run["seed"], **row}
        for method in methods
        for run in runs
        if run["method"] == method
        for row in run["rows"]
    ]
    figures = out / "figures"
    paths = []
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, (key, title) in zip(
        axes,
        (("train_acc1", "train top-1 (%)"), ("test_acc1", "test top-1 (%)"), ("train_loss", "")),
        strict=True,
    ):
        plot_median_bands(
            series_from_rows(long_rows, "epoch", key, "method", "seed"),
            ax=ax,
            title=title or "training loss (epoch mean)",
            xlabel="epoch",
            marker="o",
            log_y=key == "train_loss",
        )
    paths.append(save_figure(figure, figures / "accuracy.png"))
    figure, axes = plt.subplots(
        1, len(NC_FIGURE_METRICS), figsize=(5 * len(NC_FIGURE_METRICS), 3.8)
    )
    for ax, (key, title, log_y) in zip(axes, NC_FIGURE_METRICS, strict=True):
        plot_median_bands(
            series_from_rows(long_rows, "epoch", f"train_{key}", "method", "seed"),
            ax=ax,
            title=f"{title}, train",
            xlabel="epoch",
            marker="o",
            log_y=log_y,
        )
    paths.append(save_figure(figure, figures / "nc_metrics.png"))
    return paths


def write_report(out: str | Path, table_epochs: tuple[int, ...] | None = None) -> Path:
    """Read the finished runs under ``out`` and write tables, figures and ``report.md``.

    Only reads files (``runs/*/*/{config.json,metrics.csv,summary.json,done}``, ``timing.json``).
    Returns the path of ``report.md``. Raises ValueError when no finished run exists.
    """
    from guided_nc.checkpoint import atomic_write_text
    from guided_nc.report import latex_table, markdown_table, read_json

    out = Path(out)
    runs = _load_runs(out) if (out / "runs").is_dir() else []
    if not runs:
        raise ValueError(
            f"no finished run (folder with a 'done' marker) under {str(out / 'runs')!r}; "
            "run guided-nc compare without --report-only first"
        )
    methods = [m for m in METHODS if any(run["method"] == m for run in runs)]
    evaluated = sorted(set.intersection(*({row["epoch"] for row in run["rows"]} for run in runs)))
    epochs = list(table_epochs) if table_epochs else sorted({evaluated[0], evaluated[-1]})
    timing_path = out / "timing.json"
    timing = read_json(timing_path) if timing_path.exists() else None
    config = runs[0]["config"]

    accuracy = _accuracy_table(runs, methods, epochs)
    cost = _cost_table(runs, methods, timing)
    caption = (
        f"{config['dataset']} / {config['model']}: top-1 accuracy (%), median [min, max] over seeds"
    )
    tables_md = (
        f"### Accuracy ({caption})\n\n{markdown_table(*accuracy)}\n"
        f"### Cost per training step\n\n{markdown_table(*cost)}"
    )
    tables_tex = latex_table(*accuracy, caption=caption, label="tab:accuracy") + latex_table(
        *cost, caption="Time per step and peak memory per head", label="tab:cost"
    )
    atomic_write_text(out / "tables.md", tables_md)
    atomic_write_text(out / "tables.tex", tables_tex)
    figures = _figures(out, runs, methods)

    seeds = sorted({run["seed"] for run in runs})
    machine = ""
    if timing is not None:
        machine = (
            f"Bench: batch {timing['batch_size']}, {timing['repeats']} interleaved steps per "
            f"head, device {timing['device']}, {timing['threads']} threads; memory "
            f"= {next(iter(timing['heads'].values()))['memory_kind']}.\n"
        )
    lines = [
        f"# Comparison: {config['dataset']} / {config['model']}",
        "",
        f"Optimiser {config['optimizer']}"
        + (f" (gain {config['gain']})" if config["optimizer"] == "agd" else f" (lr {config['lr']})")
        + f", {config['epochs']} epochs, batch {config['batch_size']}, tau "
        f"{config['temperature']}, seeds {seeds}, {len(runs)} finished runs. "
        "Stratified batches: all methods see the same batches at a seed.",
        "",
        tables_md,
        "",
        "Training-run time per step is the median over the run's epochs of the per-epoch median; "
        "peak memory is CUDA max-allocated on a GPU and the process's max RSS on a CPU (runs "
        "share one process in `compare`, so on a CPU it is cumulative). The bench columns time "
        "every head in one process on one real batch, interleaved.",
        machine,
        *[f"![{path.stem}](figures/{path.name})" for path in figures],
        "",
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


# ----------------------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    """Add ``guided-nc compare``: methods x seeds, then tables, figures and a report."""
    parser = subparsers.add_parser(
        "compare",
        help="train methods x seeds (skipping finished runs) and write tables and figures",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated heads (default: {','.join(METHODS)})",
    )
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--out", default="runs/compare", help="comparison folder")
    parser.add_argument(
        "--timing-repeats",
        type=int,
        default=5,
        help="steps per head for the cost table (0: skip the measurement)",
    )
    parser.add_argument(
        "--table-epochs", default=None, help="epochs in the accuracy table (default: first, last)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from the run folders"
    )
    add_config_arguments(parser, exclude=("method", "seed", "out", "resume", "ddn_grad"))
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from guided_nc.config import parse_int_list

    table_epochs = parse_int_list(args.table_epochs) if args.table_epochs else None
    if args.report_only:
        print(f"report: {write_report(args.out, table_epochs=table_epochs)}")
        return 0
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds} must be >= 1")
    methods = tuple(m for m in args.methods.split(",") if m)
    base = TrainConfig.from_namespace(
        argparse.Namespace(**{key: value for key, value in vars(args).items() if key != "out"})
    )
    report = run_comparison(
        base,
        methods=methods,
        seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
        out=args.out,
        timing_repeats=args.timing_repeats,
        table_epochs=table_epochs,
    )
    if os.environ.get("RANK", "0") == "0":  # the process group is gone by now
        print(f"report: {report}")
    return 0
