"""The comparison report: Table 1/2 and Table 3 layouts and figures, from run folders only.

Reads what ``guided-nc compare`` writes under ``--out`` (``runs/<method>/seed<k>/{config.json,
metrics.csv, summary.json, done}`` and ``timing.json``); never trains. Writes::

    tables.md, tables.tex    top-1 median [range] (Tables 1-2), NC metrics (train and test)
                             and cost per step (Table 3); tables.tex needs \\usepackage{booktabs}
    figures/*.png            accuracy, and NC metrics of the train and the test split, over
                             epochs (median line, min-max band)
    report.md                everything above in one page
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from guided_nc.config import POOL_FREE_FIELDS, TrainConfig
from guided_nc.methods import METHOD_VARIANTS, method_color, method_label
from guided_nc.reports.figures import (
    plot_histograms,
    plot_median_bands,
    save_figure,
    series_from_rows,
)
from guided_nc.reports.tables import format_median_range, latex_table, markdown_table
from guided_nc.reports.targets import (
    cumulative_seconds,
    etf_margin_fraction,
    first_reached,
    seconds_at_step_cost,
)
from guided_nc.runfiles import atomic_write_text, check_kind, find_runs, load_npy, read_json

__all__ = ["NC_FIGURE_METRICS", "NC_TABLE_METRICS", "write_report"]

#: Metrics of the NC tables (train and test split), with their column titles.
NC_TABLE_METRICS = (
    ("nc1", "NC1"),
    ("nc2_w", "NC2 (W)"),
    ("nc3", "NC3"),
    ("equinorm", "equinorm"),
    ("margin_mean", "margin (mean)"),
)

#: Metrics drawn in the NC figures (one per split), with whether to use a log y-axis.
NC_FIGURE_METRICS = (
    ("nc1", "NC1: tr(Σ_W Σ_B⁺)/K", True),
    ("nc2_w", "NC2 (classifier)", True),
    ("nc2_h", "NC2 (features)", True),
    ("nc3", "NC3 (self-duality)", True),
)


def _load_runs(out: Path) -> list[dict[str, Any]]:
    runs = []
    for run in find_runs(out):
        try:  # fill the fields a run of an older version did not have with their defaults
            config = TrainConfig.from_dict(run.config).to_dict()
        except (TypeError, ValueError):
            config = run.config
        summary_path = run.path / "summary.json"
        margins_path = run.path / "final_margins.npy"
        runs.append(
            {
                "method": run.method,
                "seed": run.seed,
                "config": config,
                "rows": run.rows(),
                "summary": read_json(summary_path, expect=dict) if summary_path.exists() else {},
                "margins": load_npy(margins_path) if margins_path.exists() else None,
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
    header = ["method", "seeds"]
    header += [f"train top-1 @{e}" for e in epochs] + [f"test top-1 @{e}" for e in epochs]
    rows = []
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        row = [method_label(method), str(len(mine))]
        for split in ("train", "test"):
            for epoch in epochs:
                values = [_value_at(run["rows"], epoch, f"{split}_acc1") for run in mine]
                row.append(format_median_range(values, fmt="{:.2f}"))
        rows.append(row)
    return header, rows


def _cost_table(
    runs: list[dict[str, Any]], methods: list[str], timing: dict[str, Any] | None
) -> tuple[list[str], list[list[str]]]:
    header = [
        "head",
        "time per step, training runs (ms)",
        "peak memory, training runs (MiB)",
        "time per step, same-process bench (ms)",
        "vs standard",
        "bench memory (MiB)",
    ]
    measured = (timing or {}).get("heads", {})
    names = [m for m in methods if m not in ("implicit", "implicit-no-ddn")]
    if "implicit" in methods or "implicit-no-ddn" in methods:
        names += ["implicit", "implicit-no-ddn"]  # Table 3: with and without the DDN gradient
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
        label = method_label(name)
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


def _run_name(run: dict[str, Any]) -> str:
    return f"{run['method']} seed {run['seed']}"


def _pooled_configuration(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The configuration every run shares; ValueError if they differ in anything that
    :data:`guided_nc.config.POOL_FREE_FIELDS` does not allow (medians over runs trained with
    other settings would be silently wrong)."""
    free = set(POOL_FREE_FIELDS)
    if all(run["config"].get("schedule", "none") == "none" for run in runs):
        free.add("epochs")
    keys = sorted({key for run in runs for key in run["config"]} - free)
    differing = {}
    for key in keys:
        values: dict[str, list[str]] = {}
        for run in runs:
            values.setdefault(repr(run["config"].get(key)), []).append(_run_name(run))
        if len(values) > 1:
            differing[key] = values
    if differing:
        lines = "; ".join(
            f"{key}: "
            + ", ".join(f"{value} ({', '.join(names)})" for value, names in found.items())
            for key, found in differing.items()
        )
        raise ValueError(
            f"the runs of this comparison were trained with different settings ({lines}); a "
            "table pools runs that differ only in method and seed: move the odd runs to their "
            "own --out"
        )
    return {key: runs[0]["config"].get(key) for key in keys}


def _epochs_by_run(runs: list[dict[str, Any]]) -> str:
    """``"standard seed 0, fixed seed 0: [1, 2]; implicit seed 0: [1, 2, 3]"``."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for run in runs:
        epochs = tuple(sorted(row["epoch"] for row in run["rows"]))
        groups.setdefault(epochs, []).append(_run_name(run))
    return "; ".join(f"{', '.join(names)}: {list(epochs)}" for epochs, names in groups.items())


def _table_epochs(
    runs: list[dict[str, Any]], requested: tuple[int, ...] | None
) -> tuple[list[int], list[str]]:
    """The epochs of the tables, and notes on runs that lack some of them.

    Default: the first and the last epoch every run evaluated. Errors (never a crash or a
    silent all-"n/a" table) say which epochs each run has.
    """
    evaluated = [{row["epoch"] for row in run["rows"]} for run in runs]
    if requested:
        never = [epoch for epoch in requested if not any(epoch in mine for mine in evaluated)]
        if never:
            raise ValueError(
                f"--table-epochs {never}: no run evaluated those epochs (the runs evaluated "
                f"{_epochs_by_run(runs)}); choose epochs from those lists"
            )
        notes = [
            f"{_run_name(run)} has no evaluation at epoch(s) {missing} (counted as missing)."
            for run, mine in zip(runs, evaluated, strict=True)
            if (missing := [epoch for epoch in requested if epoch not in mine])
        ]
        return list(requested), notes
    shared = sorted(set.intersection(*evaluated))
    if not shared:
        raise ValueError(
            f"the runs share no evaluated epoch ({_epochs_by_run(runs)}); pass --table-epochs "
            "with epochs from those lists, or rerun the runs with a common --eval-epochs"
        )
    return sorted({shared[0], shared[-1]}), []


def _nc_table(
    runs: list[dict[str, Any]], methods: list[str], epochs: list[int], split: str
) -> tuple[list[str], list[list[str]]]:
    """NC metrics at the table epochs, median [min, max] over seeds, for one split."""
    header = ["method", "epoch", *(title for _, title in NC_TABLE_METRICS)]
    rows = []
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        for epoch in epochs:
            row = [method_label(method), str(epoch)]
            for key, _ in NC_TABLE_METRICS:
                values = [_value_at(run["rows"], epoch, f"{split}_{key}") for run in mine]
                row.append(format_median_range(values, fmt="{:.3g}"))
            rows.append(row)
    return header, rows


#: Training-accuracy targets of the time-to-target table (%), and the test target's margin.
TRAIN_TARGETS = (95.0, 99.0)
TEST_TARGET_MARGIN = 0.5


def _targets_table(
    runs: list[dict[str, Any]], methods: list[str], timing: dict[str, Any] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Steps and training seconds to the targets, median [range] over seeds.

    A target is met at the first *evaluated* epoch whose value reaches it (so the evaluation
    schedule is the resolution). Steps = epoch x steps per epoch; seconds = the run's own
    per-epoch training time (its ``summary.json``: training steps only, no evaluation) summed up
    to that epoch. With the comparison's ``timing.json`` there is a third column, steps x the
    head's time per step measured interleaved in one process: seconds that do not depend on
    how loaded the machine was while each run trained. The test bar is the median over every
    run of its best test top-1, minus :data:`TEST_TARGET_MARGIN` points: one bar for all
    methods.
    """
    per_step = {
        name: data["time_per_step_s"] for name, data in (timing or {}).get("heads", {}).items()
    }
    best = [max((row.get("test_acc1") or 0.0) for row in run["rows"]) for run in runs]
    test_bar = float(np.median(best)) - TEST_TARGET_MARGIN if best else None
    targets = [(f"train top-1 >= {t:g} %", "train_acc1", t) for t in TRAIN_TARGETS]
    if test_bar is not None and any("test_acc1" in row for run in runs for row in run["rows"]):
        targets.append((f"test top-1 >= {test_bar:.2f} %", "test_acc1", test_bar))
    header = ["method"]
    for title, _, _ in targets:
        header += [f"steps to {title}", f"seconds to {title}"]
        if per_step:
            header.append(f"bench seconds to {title}")
    rows = []
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        row = [method_label(method)]
        for _, key, threshold in targets:
            steps, seconds = [], []
            for run in mine:
                epoch = first_reached(
                    run["rows"], lambda r, k=key, t=threshold: r[k] >= t, position="epoch"
                )
                per_epoch = run["summary"].get("per_epoch", [])
                clock = cumulative_seconds({t["epoch"]: t["epoch_time_s"] for t in per_epoch})
                steps_per_epoch = run["summary"].get("steps_per_epoch")
                steps.append(
                    None if epoch is None or steps_per_epoch is None else epoch * steps_per_epoch
                )
                seconds.append(None if epoch is None else clock.get(epoch))
            columns = [(steps, "{:.0f}"), (seconds, "{:.3g}")]
            if per_step:
                columns.append((seconds_at_step_cost(steps, per_step.get(method)), "{:.3g}"))
            for values, fmt in columns:
                row.append(
                    format_median_range(values, fmt=fmt, missing="largest", missing_text="never")
                )
        rows.append(row)
    return header, rows


def _margin_fractions(runs: list[dict[str, Any]], methods: list[str]) -> list[list[str]]:
    """Fraction of training samples within 1 % of K/(K-1) at the last epoch, per method."""
    rows = []
    for method in methods:
        fractions = []
        for run in runs:
            if run["method"] == method and run["margins"] is not None:
                etf = run["rows"][-1]["train_etf_margin"]  # K/(K-1), so K = etf/(etf - 1)
                fractions.append(etf_margin_fraction(run["margins"], round(etf / (etf - 1))))
        if fractions:
            summary = format_median_range(fractions, fmt="{:.3f}")
            rows.append([method_label(method), str(len(fractions)), summary])
    return rows


def _figures(out: Path, runs: list[dict[str, Any]], methods: list[str]) -> list[Path]:
    import matplotlib.pyplot as plt

    long_rows = [
        {"method": method_label(run["method"]), "seed": run["seed"], **row}
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
    for split, name in (("train", "nc_metrics.png"), ("test", "nc_metrics_test.png")):
        figure, axes = plt.subplots(
            1, len(NC_FIGURE_METRICS), figsize=(5 * len(NC_FIGURE_METRICS), 3.8)
        )
        for ax, (key, title, log_y) in zip(axes, NC_FIGURE_METRICS, strict=True):
            plot_median_bands(
                series_from_rows(long_rows, "epoch", f"{split}_{key}", "method", "seed"),
                ax=ax,
                title=f"{title}, {split}",
                xlabel="epoch",
                marker="o",
                log_y=log_y,
            )
        paths.append(save_figure(figure, figures / name))
    pooled = {}
    for method in methods:
        arrays = [run["margins"] for run in runs if run["method"] == method]
        if any(array is not None for array in arrays):
            pooled[method_label(method)] = np.concatenate([a for a in arrays if a is not None])
    if pooled:
        etf = runs[0]["rows"][-1].get("train_etf_margin")
        path = figures / "margin_distribution.png"
        plot_histograms(
            pooled,
            path=path,
            title="Final cosine margins, train split (all seeds)",
            xlabel="cosine margin",
            reference=etf,
            reference_label=None if etf is None else f"ETF margin {etf:.4g}",
            colors={method_label(m): method_color(m) for m in methods},
        )
        paths.append(path)
    return paths


def write_report(out: str | Path, table_epochs: tuple[int, ...] | None = None) -> Path:
    """Read the finished runs under ``out`` and write tables, figures and ``report.md``.

    Only reads files (``runs/*/*/{config.json,metrics.csv,summary.json,done}``, ``timing.json``).
    Returns the path of ``report.md``.

    Raises:
        ValueError: no finished run; runs trained with settings that differ in more than the
            method and the seed; runs that share no evaluated epoch, or ``table_epochs`` that
            no run evaluated (the message lists each run's epochs).
    """
    out = Path(out)
    check_kind(out, "compare")
    runs = _load_runs(out) if (out / "runs").is_dir() else []
    if not runs:
        raise ValueError(
            f"no finished run (folder with a 'done' marker) under {str(out / 'runs')!r}; "
            "run guided-nc compare without --report-only first"
        )
    pooled = _pooled_configuration(runs)
    methods = [m for m in METHOD_VARIANTS if any(run["method"] == m for run in runs)]
    epochs, notes = _table_epochs(runs, table_epochs)
    timing_path = out / "timing.json"
    timing = read_json(timing_path, expect=dict) if timing_path.exists() else None
    config = runs[0]["config"]

    accuracy = _accuracy_table(runs, methods, epochs)
    cost = _cost_table(runs, methods, timing)
    targets_header, targets_rows = _targets_table(runs, methods, timing)
    margin_rows = _margin_fractions(runs, methods)
    nc_tables = {split: _nc_table(runs, methods, epochs, split) for split in ("train", "test")}
    caption = (
        f"{config['dataset']} / {config['model']}: top-1 accuracy (%), median [min, max] over seeds"
    )
    nc_caption = "neural-collapse metrics, median [min, max] over seeds"
    tables_md = (
        f"### Accuracy ({caption})\n\n{markdown_table(*accuracy)}\n"
        + "".join(
            f"### NC metrics, {split} split ({nc_caption})\n\n{markdown_table(*table)}\n"
            for split, table in nc_tables.items()
        )
        + "### Time to target (median [min, max] over seeds)\n\n"
        + f"{markdown_table(targets_header, targets_rows)}\n"
        + f"### Cost per training step\n\n{markdown_table(*cost)}"
    )
    if margin_rows:
        tables_md += (
            "\n### Final cosine margins within 1 % of the simplex-ETF value K/(K-1), train split"
            f"\n\n{markdown_table(['method', 'seeds', 'fraction'], margin_rows)}"
        )
    tables_tex = (
        latex_table(*accuracy, caption=caption, label="tab:accuracy")
        + "".join(
            latex_table(*table, caption=f"{split} split: {nc_caption}", label=f"tab:nc-{split}")
            for split, table in nc_tables.items()
        )
        + latex_table(
            targets_header,
            targets_rows,
            caption="Steps and training seconds to target",
            label="tab:targets",
        )
        + latex_table(*cost, caption="Time per step and peak memory per head", label="tab:cost")
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
    settings = ", ".join(f"{key}={value}" for key, value in pooled.items())
    lines = [
        f"# Comparison: {config['dataset']} / {config['model']}",
        "",
        f"Optimiser {config['optimizer']}"
        + (f" (gain {config['gain']})" if config["optimizer"] == "agd" else f" (lr {config['lr']})")
        + f", {max(run['config']['epochs'] for run in runs)} epochs, batch "
        f"{config['batch_size']}, tau {config['temperature']}, seeds {seeds}, {len(runs)} "
        "finished runs. Stratified batches: all methods see the same batches at a seed.",
        "",
        f"Pooled configuration (every run shares it; they differ only in method and seed): "
        f"{settings}.",
        "",
        *[f"Note: {note}" for note in notes],
        tables_md,
        "",
        "Training-run time per step is the median over the run's epochs of the per-epoch median; "
        "peak memory is CUDA max-allocated on a GPU and the process's max RSS on a CPU (runs "
        "share one process in `compare`, so on a CPU it is cumulative). The bench columns time "
        "every head in one process on one real batch, interleaved. Time to target: the first "
        "evaluated epoch that meets it (the evaluation schedule is the resolution); seconds are "
        "each run's own training time up to that epoch (no evaluation), so they include each "
        "head's per-step cost; the test bar is the median over all runs of their best test "
        f"top-1 minus {TEST_TARGET_MARGIN} points. `tables.tex` needs "
        "`\\usepackage{booktabs}`.",
        machine,
        *[f"![{path.stem}](figures/{path.name})" for path in figures],
        "",
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
