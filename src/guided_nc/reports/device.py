"""The device check's markdown, built from its ``device_check.json`` (:mod:`guided_nc.bench.device`
writes it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guided_nc.reports.tables import markdown_table
from guided_nc.runfiles import atomic_write_text, read_json

__all__ = ["markdown", "write_markdown"]

ROUTES = ("gram", "svd", "newton-schulz")


def write_markdown(out: str | Path) -> Path:
    """Read ``out/device_check.json``, write ``out/device_check.md``; returns its path."""
    out = Path(out)
    return atomic_write_text(
        out / "device_check.md", markdown(read_json(out / "device_check.json"))
    )


def _ms(value: Any) -> str:
    return f"{1000 * value:.3g}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    """The check as markdown tables (one per section)."""
    environment = report["environment"]
    lines = [
        f"# Device check: {environment.get('gpu', environment['device'])}",
        "",
        f"torch {environment['torch']}, CUDA {environment['cuda']}, dry run "
        f"{report['dry_run']}, {report['total_seconds']:.0f} s in all.",
        "",
    ]
    if "routes" in report:
        rows = [
            [
                r["d"],
                r["K"],
                r["route"],
                r["compute_dtype"],
                f"{r['weight_error']:.2g}",
                f"{r['gradient_relative_error']:.2g}",
                "yes" if r["ok"] else "NO",
            ]
            for r in report["routes"]
        ]
        header = ["d", "K", "route", "compute", "max |W - W_cpu64|", "grad rel. error", "ok"]
        lines += ["## Routes against the CPU float64 SVD", "", markdown_table(header, rows)]
    if "heads" in report:
        rows = [
            [
                r["method"],
                r["dtype"],
                f"{r['logits']:.2g}",
                f"{r['weight']:.2g}",
                f"{r['features']:.2g}",
                "yes" if r["ok"] else "NO",
            ]
            for r in report["heads"]
        ]
        header = ["head", "dtype", "logits", "weight", "features", "ok"]
        lines += [
            "## Head steps against the CPU in float64 (relative errors)",
            "",
            markdown_table(header, rows),
        ]
    if "drivers" in report:
        svd_keys = [k for k in report["drivers"][0] if k.startswith("svd_")]
        header = ["d", "K", "dtype", *(f"svd(A) {k[4:-2]} (ms)" for k in svd_keys)]
        header += [f"{route} fwd+bwd (ms, / svd)" for route in ROUTES]
        rows = []
        for r in report["drivers"]:
            cells = [r["d"], r["K"], r["dtype"], *(_ms(r[k]) for k in svd_keys)]
            for route in ROUTES:
                ratio = r.get(f"{route}_ratio")
                cells.append(_ms(r[f"{route}_s"]) + ("" if ratio is None else f" ({ratio:.2f}x)"))
            rows.append(cells)
        lines += [
            "## SVD drivers vs the routes (forward + backward)",
            "",
            markdown_table(header, rows),
        ]
    if "table3" in report:
        for setting, data in report["table3"].items():
            if "error" in data:
                lines += [f"## Table 3, {setting}: {data['error']}", ""]
                continue
            rows = [
                [
                    name,
                    f"{1000 * r['time_per_step_s']:.3g}",
                    f"{r.get('ratio', 1.0):.2f}x",
                    str(r.get("ops_per_step", "-")),
                    f"{r['peak_memory_mb']:.0f}",
                ]
                for name, r in data["heads"].items()
            ]
            header = ["head", "ms per step", "/ standard", "top-level ops", "peak memory (MiB)"]
            lines += [
                f"## Table 3, {setting}, batch {data['batch_size']}",
                "",
                markdown_table(header, rows),
            ]
    if "syncs" in report:
        syncs = report["syncs"]
        if "skipped" in syncs:
            lines += [f"## Host synchronisations per step: skipped ({syncs['skipped']})", ""]
        else:
            rows = [
                [name, data["syncs"], "; ".join(data["first"])[:120]]
                for name, data in syncs.items()
            ]
            lines += [
                "## Host synchronisations per training step",
                "",
                markdown_table(["head", "syncs", "first messages"], rows),
            ]
    if "torchrun" in report:
        smoke = report["torchrun"]
        lines += [
            f"## torchrun, 1 process: {'ok' if smoke['ok'] else 'FAILED'} (backend "
            f"{smoke.get('backend')}, world size {smoke.get('world_size')}, "
            f"{smoke['seconds']:.0f} s)",
            "",
        ]
    return "\n".join(lines) + "\n"
