"""The UFM report: summaries, figures and report.md, built from an experiment's files only.

Reads what :mod:`guided_nc.ufm` writes (``config.json`` and the run folders ``runs/<method>/
seed<s>/``, or the v0.1 ``runs/<method>-seed<s>/``), never runs anything. For one preset folder
:func:`build_report` merges the finished runs (:func:`merge_runs`) and writes::

    metrics.csv, timings.csv, final_margins.npz   the runs, concatenated (long format)
    summary.json     iterations to 100 % accuracy and to the CE bound, final metrics, seconds
                     per iteration: median / min / max over seeds; the finished methods/seeds
    *.png, report.md figures and tables

:func:`build_scaling_report` compares several preset folders (``summary.json`` each).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guided_nc.config import Preset
from guided_nc.methods import METHOD_VARIANTS, method_label
from guided_nc.nc_statistics import ce_lower_bound
from guided_nc.reports.figures import (
    plot_histograms,
    plot_median_bands,
    save_figure,
    series_from_rows,
)
from guided_nc.reports.tables import format_median_range, markdown_table, summarize
from guided_nc.reports.targets import (
    cumulative_seconds,
    etf_margin_fraction,
    first_reached,
    seconds_at_step_cost,
    spread_at,
)
from guided_nc.runfiles import (
    RUN_TEXT_COLUMNS,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_kind,
    csv_columns,
    find_runs,
    load_npy,
    read_config,
    read_json,
    read_long_csv,
    unreadable,
    write_long_csv,
)

#: Columns of a UFM metrics.csv that identify a row, or hold a value every iteration; every
#: other column is a neural-collapse metric (the report reads which ones from the files).
_ROW_COLUMNS = ("preset", "method", "seed", "iteration", "loss", "acc1", "eta")

__all__ = [
    "BOUND_FACTOR",
    "FIGURES",
    "build_report",
    "build_scaling_report",
    "merge_runs",
    "summarize_metrics",
]

#: A run reaches the bound when its loss is at most this factor times ``ce_lower_bound``.
BOUND_FACTOR = 1.01


def _check_poolable(runs) -> None:
    """ValueError unless the runs differ only in method and seed (the summaries pool them)."""
    keys = sorted({key for run in runs for key in run.config} - {"method", "seed"})
    differing = []
    for key in keys:
        values = {}
        for run in runs:
            values.setdefault(repr(run.config.get(key)), []).append(f"{run.method} seed {run.seed}")
        if len(values) > 1:
            shown = ", ".join(f"{value} ({', '.join(who)})" for value, who in values.items())
            differing.append(f"{key}: {shown}")
    if differing:
        raise ValueError(
            f"the finished runs were trained with different settings ({'; '.join(differing)}); "
            "a report pools runs that differ only in method and seed: move the odd runs to "
            "their own --out"
        )


def _shared_columns(paths: list[Path]) -> list[str]:
    """The header every CSV shares; ValueError naming the odd file otherwise."""
    first = csv_columns(paths[0])
    for path in paths[1:]:
        if csv_columns(path) != first:
            raise ValueError(
                f"{path} has other columns than {paths[0]}: the runs were written by different "
                "versions; rerun the odd one or move it to its own --out"
            )
    return first


def merge_runs(out_dir: str | os.PathLike) -> dict[str, list]:
    """Concatenate every finished run of a preset folder into ``metrics.csv``, ``timings.csv``
    and ``final_margins.npz`` at its top (method order of
    :data:`guided_nc.methods.METHOD_VARIANTS`, then seed).

    Returns ``{"methods": [...], "seeds": [...]}``: what the folder holds.
    Raises ValueError when no run has finished.
    """
    out_dir = Path(out_dir)
    order = list(METHOD_VARIANTS)
    finished = sorted(
        (run for run in find_runs(out_dir) if run.method in METHOD_VARIANTS),
        key=lambda run: (order.index(run.method), run.seed),
    )
    if not finished:
        raise ValueError(
            f"{out_dir} holds no finished runs (runs/<method>/seed<s>/done); run them first"
        )
    _check_poolable(finished)
    columns = _shared_columns([run.path / "metrics.csv" for run in finished])
    timing_columns = _shared_columns([run.path / "timings.csv" for run in finished])
    metrics, timings, margins = [], [], {}
    for run in finished:
        metrics += run.rows()
        timings += read_long_csv(run.path / "timings.csv", RUN_TEXT_COLUMNS)
        margins[f"{run.method}/{run.seed}"] = load_npy(run.path / "final_margins.npy")
    write_long_csv(out_dir / "metrics.csv", metrics, columns)
    write_long_csv(out_dir / "timings.csv", timings, timing_columns)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **margins)
    atomic_write_bytes(out_dir / "final_margins.npz", buffer.getvalue())
    return {
        "methods": [m for m in order if any(run.method == m for run in finished)],
        "seeds": sorted({run.seed for run in finished}),
    }


#: Iterations at which the spread across seeds is reported (those within the run), and the last.
SPREAD_ITERATIONS = (1, 10, 100, 1000)


def _spread(by_seed: dict[int, list]) -> dict[str, dict[str, Any]]:
    """Loss and NC1 across seeds at :data:`SPREAD_ITERATIONS` and the last iteration.

    NC1 is evaluated only every ``eval_interval`` iterations: the spread uses the last NC1
    evaluation at or before each iteration (the iteration used is recorded).
    """
    last = min(max(row["iteration"] for row in rows) for rows in by_seed.values())
    spread = {}
    for target in sorted({*(t for t in SPREAD_ITERATIONS if t < last), last}):
        losses, nc1s, used = [], [], set()
        for rows in by_seed.values():
            at = {row["iteration"]: row for row in rows}
            losses.append(at[target]["loss"] if target in at else None)
            evaluated = [r for r in rows if r.get("nc1") is not None and r["iteration"] <= target]
            if evaluated:
                latest = max(evaluated, key=lambda row: row["iteration"])
                nc1s.append(latest["nc1"])
                used.add(latest["iteration"])
        spread[str(target)] = {
            "loss": spread_at(losses),
            "nc1": spread_at(nc1s),
            "nc1_iterations": sorted(used),
        }
    return spread


def summarize_metrics(
    metrics: Sequence[dict[str, Any]],
    timings: Sequence[dict[str, Any]],
    num_classes: int,
    temperature: float,
) -> dict[str, Any]:
    """The summary.json content from the long-format rows.

    Per method, over seeds (median / min / max; :func:`guided_nc.reports.tables.summarize`):

    * ``iters_to_full_acc``: first evaluated iteration with 100 % training accuracy;
    * ``iters_to_bound``: first iteration with ``loss <= 1.01 * ce_lower_bound(K, tau)``;
      a seed that never gets there is ``null`` in ``per_seed`` and ranks above every number in
      the summary (so the median is ``null`` when at least half never get there);
    * ``final``: every metric at the last iteration;
    * ``seconds_per_iteration``: per seed the median step time (iteration 1, which includes
      one-off allocations, excluded when there are more).
    """
    bound = ce_lower_bound(num_classes, temperature)
    nc_columns = [key for key in (metrics[0] if metrics else {}) if key not in _ROW_COLUMNS]
    methods: dict[str, Any] = {}
    present = {row["method"] for row in metrics}
    names = [method for method in METHOD_VARIANTS if method in present]
    for method in names:
        seeds = sorted({row["seed"] for row in metrics if row["method"] == method})
        per_seed: dict[str, list] = {
            "iters_to_full_acc": [],
            "iters_to_bound": [],
            "seconds_to_full_acc": [],
            "seconds_to_bound": [],
        }
        finals: dict[str, list] = {}
        by_seed: dict[int, list] = {}
        step_times = []
        for seed in seeds:
            rows = [row for row in metrics if row["method"] == method and row["seed"] == seed]
            by_seed[seed] = rows
            clock = cumulative_seconds(
                {
                    row["iteration"]: row["step_seconds"]
                    for row in timings
                    if row["method"] == method and row["seed"] == seed
                }
            )
            for name, predicate in (
                ("full_acc", lambda row: row["acc1"] >= 100.0),
                ("bound", lambda row: row["loss"] <= BOUND_FACTOR * bound),
            ):
                iteration = first_reached(rows, predicate)
                per_seed[f"iters_to_{name}"].append(iteration)
                # Iteration 0 (the initial state) costs nothing; a missing clock is unknown.
                seconds = 0.0 if iteration == 0 else clock.get(iteration)
                per_seed[f"seconds_to_{name}"].append(None if iteration is None else seconds)
            last = max(rows, key=lambda row: row["iteration"])
            for key in ("loss", "acc1", *nc_columns):
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
            "iters_to_full_acc": summarize(per_seed["iters_to_full_acc"], "largest"),
            "iters_to_bound": summarize(per_seed["iters_to_bound"], "largest"),
            "seconds_to_full_acc": summarize(per_seed["seconds_to_full_acc"], "largest"),
            "seconds_to_bound": summarize(per_seed["seconds_to_bound"], "largest"),
            "spread": _spread(by_seed),
            "reached_full_acc": sum(value is not None for value in per_seed["iters_to_full_acc"]),
            "reached_bound": sum(value is not None for value in per_seed["iters_to_bound"]),
            "per_seed": per_seed,
            "final": {key: summarize(values) for key, values in finals.items()},
            "seconds_per_iteration": summarize(step_times),
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
    return {method_label(name): value for name, value in series.items()}


def _colors() -> dict[str, str]:
    return {method.label: method.color for method in METHOD_VARIANTS.values()}


def _draw(ax, stem, column, title, ylabel, log_y, metrics, bound, etf_margin, log_x):
    series = series_from_rows(metrics, "iteration", column, "method", "seed")
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
    plot_median_bands(
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


def build_report(out_dir: str | os.PathLike, log_x: bool = True) -> Path:
    """Write summary.json, the figures and report.md of one preset folder from its files only.

    Merges the finished runs (:func:`merge_runs`), then reads ``config.json``, ``metrics.csv``,
    ``timings.csv`` and ``final_margins.npz``. The summary's ``config`` is the experiment's,
    with ``methods`` and ``seeds`` those of the finished runs it pooled. Returns the path of
    report.md.
    """
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    check_kind(out_dir, "ufm")
    held = merge_runs(out_dir)
    saved = {**read_config(out_dir / "config.json"), **held}
    missing = [key for key in ("preset", "temperature") if key not in saved]
    if missing:
        raise unreadable(out_dir / "config.json", f"it has no {missing} of a UFM experiment")
    preset = Preset(**saved["preset"])
    temperature = saved["temperature"]
    metrics = read_long_csv(out_dir / "metrics.csv")
    timings = read_long_csv(out_dir / "timings.csv")
    with np.load(out_dir / "final_margins.npz", allow_pickle=False) as archive:
        margins = {key: archive[key] for key in archive.files}
    summary = summarize_metrics(metrics, timings, preset.num_classes, temperature)
    for method, data in summary["methods"].items():
        fractions = [
            etf_margin_fraction(margins[f"{method}/{seed}"], preset.num_classes)
            if f"{method}/{seed}" in margins
            else None
            for seed in data["seeds"]
        ]
        data["per_seed"]["etf_margin_fraction"] = fractions
        data["etf_margin_fraction"] = summarize(fractions)
    # Derived column for the figures only: how far the loss is above the bound.
    bound = summary["ce_lower_bound"]
    metrics = [{**row, "excess_loss": row["loss"] - bound} for row in metrics]
    summary = {"preset": dataclasses.asdict(preset), "config": saved, **summary}
    atomic_write_json(out_dir / "summary.json", summary)

    etf_margin = preset.num_classes / (preset.num_classes - 1)
    figures = []
    for stem, column, title, ylabel, log_y in FIGURES:
        ax = plt.subplots(figsize=(5.0, 3.6))[1]
        _draw(ax, stem, column, title, ylabel, log_y, metrics, bound, etf_margin, log_x)
        save_figure(ax.figure, out_dir / f"{stem}.png")
        figures.append((stem, title))
    pooled = {}
    for method in METHOD_VARIANTS:
        arrays = [value for key, value in margins.items() if key.split("/")[0] == method]
        if arrays:
            pooled[method_label(method)] = np.concatenate(arrays)
    plot_histograms(
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
    plot_histograms(
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
    save_figure(overview, out_dir / "overview.png")

    step_times = out_dir / "step_times.json"
    if step_times.exists():
        summary["interleaved_step_times"] = read_json(step_times, expect=dict)
        _add_interleaved_seconds(summary)
        atomic_write_json(out_dir / "summary.json", summary)
    text = _preset_markdown(summary, preset, figures)
    return atomic_write_text(out_dir / "report.md", text)


def _add_interleaved_seconds(summary: dict[str, Any]) -> None:
    """Iterations to each target x the method's interleaved step time (``--time-steps``):
    seconds that do not depend on how loaded the machine was while each run trained."""
    medians = summary["interleaved_step_times"]["median_seconds"]
    for method, data in summary["methods"].items():
        for target in ("full_acc", "bound"):
            per_seed = seconds_at_step_cost(
                data["per_seed"][f"iters_to_{target}"], medians.get(method)
            )
            data["per_seed"][f"interleaved_seconds_to_{target}"] = per_seed
            data[f"interleaved_seconds_to_{target}"] = summarize(per_seed, "largest")


def _spread_table(methods: dict[str, Any]) -> list[str]:
    """Loss and NC1 across seeds at fixed iterations: [min, max] and the width / ratio."""
    iterations = list(next(iter(methods.values()))["spread"])
    header = ["method", *(f"loss @{t}" for t in iterations), *(f"NC1 @{t}" for t in iterations)]
    rows = []
    for method, data in methods.items():
        row = [method_label(method)]
        for key, text in (("loss", _width_text), ("nc1", _ratio_text)):
            row += [text(data["spread"][t][key]) for t in iterations]
        rows.append(row)
    return [
        "The spread of a method is the range over its seeds: [min, max] of the loss at each "
        "iteration (width max - min), and of NC1 at the last NC evaluation at or before it "
        "(ratio max/min). The paper claims the implicit ETF has the smallest spread.",
        "",
        markdown_table(header, rows),
    ]


def _width_text(spread: dict[str, Any]) -> str:
    if spread["min"] is None:
        return "n/a"
    return f"[{spread['min']:.4g}, {spread['max']:.4g}] w {spread['width']:.2g}"


def _ratio_text(spread: dict[str, Any]) -> str:
    if spread["min"] is None:
        return "n/a"
    ratio = "" if spread["ratio"] is None else f" x{spread['ratio']:.3g}"
    return f"[{spread['min']:.3g}, {spread['max']:.3g}]{ratio}"


def _fmt_iterations(summary: dict[str, Any]) -> str:
    return format_median_range(summary, fmt="{:.0f}", missing_text="never")


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
                method_label(method),
                count,
                _fmt_iterations(data["iters_to_full_acc"]),
                f"{data['reached_full_acc']}/{count}",
                _fmt_iterations(data["iters_to_bound"]),
                f"{data['reached_bound']}/{count}",
            ]
        )
    lines += [markdown_table(header, rows), "## Time to target", ""]
    interleaved = all("interleaved_seconds_to_bound" in data for data in methods.values())
    header = ["method"]
    for target in ("100 % acc", "bound"):
        header += [f"iters to {target}", f"seconds to {target}"]
        header += [f"interleaved seconds to {target}"] if interleaved else []
    rows = []
    for method, data in methods.items():
        row = [method_label(method)]
        for target in ("full_acc", "bound"):
            row.append(_fmt_iterations(data[f"iters_to_{target}"]))
            keys = [f"seconds_to_{target}"]
            if interleaved:
                keys.append(f"interleaved_seconds_to_{target}")
            row += [
                format_median_range(data[key], fmt="{:.3g}", missing_text="never") for key in keys
            ]
        rows.append(row)
    lines += [
        "Training seconds: the run's own step times (forward, backward, optimiser; no "
        "evaluation) summed up to the first iteration that meets the target, so each head's "
        "per-step cost is included. Runs that shared a busy machine are slower in seconds, not "
        "in iterations; the interleaved seconds (with `--time-steps`) are the iterations times "
        "each method's step time measured one step of each method in turn, in one process.",
        "",
        markdown_table(header, rows),
        "## Spread across seeds",
        "",
    ]
    lines += _spread_table(methods)
    lines += ["## Final state (last iteration)", ""]
    keys = ("loss", "acc1", "nc1", "nc2_w", "nc2_h", "nc3", "equinorm", "margin_mean", "margin_min")
    rows = [
        [method_label(method)]
        + [format_median_range(data["final"][key], fmt="{:.3g}") for key in keys]
        for method, data in methods.items()
    ]
    lines += [markdown_table(["method", *keys], rows)]
    rows = [
        [method_label(method), format_median_range(data["etf_margin_fraction"], fmt="{:.3f}")]
        for method, data in methods.items()
    ]
    lines += [
        f"Fraction of samples whose final cosine margin is within 1 % of the simplex-ETF value "
        f"K/(K-1) = {preset.num_classes / (preset.num_classes - 1):.4g} (paper Fig. 15c):",
        "",
        markdown_table(["method", "fraction >= 0.99 K/(K-1)"], rows),
    ]
    lines += ["## Time per iteration", ""]
    rows = [
        [
            method_label(method),
            format_median_range(
                {
                    k: None if v is None else 1000 * v
                    for k, v in data["seconds_per_iteration"].items()
                },
                fmt="{:.2f}",
            ),
        ]
        for method, data in methods.items()
    ]
    lines += [markdown_table(["method", "ms per step (median of steps)"], rows)]
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
                method_label(variant),
                format_median_range([1000 * value for value in seconds], fmt="{:.2f}"),
                "-" if not standard else f"{medians[variant] / standard:.2f}x",
            ]
            for variant, seconds in interleaved["seconds"].items()
        ]
        lines += [
            f"Interleaved timing (`--time-steps {interleaved['steps']}`: one step (on the run's "
            f"batch size) of "
            f"each method in turn, {interleaved['environment']['torch_threads']} thread(s)):",
            "",
            markdown_table(["method", "ms per step", "/ standard"], rows),
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
        summary = read_json(folder / "summary.json", expect=dict)
        summaries[summary["preset"]["name"]] = (folder, summary)
    order = sorted(summaries, key=lambda name: summaries[name][1]["preset"]["num_classes"])
    present = {method for _, summary in summaries.values() for method in summary["methods"]}
    methods = [method for method in METHOD_VARIANTS if method in present]
    atomic_write_json(
        root / "summary.json", {"presets": {name: summaries[name][1] for name in order}}
    )

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    for ax, key, title in (
        (axes[0], "iters_to_full_acc", "Iterations to 100 % training accuracy"),
        (axes[1], "iters_to_bound", "Iterations to loss <= 1.01 x CE bound"),
        (axes[2], "seconds_per_iteration", "Seconds per training step"),
    ):
        series = {}
        for method in METHOD_VARIANTS:
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
                series[method_label(method)] = (np.asarray(xs, float), matrix)
        plot_median_bands(
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
    save_figure(figure, root / "convergence_vs_classes.png")

    lines = ["# UFM: scaling with the number of classes", ""]
    header = ["preset", "K"] + [
        f"{method_label(m)} {what}" for what in ("acc", "bound") for m in methods
    ]
    rows = []
    for name in order:
        summary = summaries[name][1]
        row = [name, summary["preset"]["num_classes"]]
        for key in ("iters_to_full_acc", "iters_to_bound"):
            for method in methods:
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
        markdown_table(header, rows),
    ]
    header = ["preset"] + [f"{method_label(m)} ms/step" for m in methods] + ["implicit / standard"]
    rows = []
    for name in order:
        summary = summaries[name][1]
        row = [name]
        for method in methods:
            data = summary["methods"].get(method)
            row.append(
                "-"
                if data is None
                else format_median_range(
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
        markdown_table(header, rows),
    ]
    lines += ["![convergence vs K](convergence_vs_classes.png)", ""]
    for name in order:
        folder = summaries[name][0]
        relative = os.path.relpath(folder / "report.md", root)
        lines.append(f"- [{name}]({relative})")
    return atomic_write_text(root / "report.md", "\n".join(lines) + "\n")
