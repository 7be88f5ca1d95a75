"""``guided-nc`` command-line interface: one subcommand per capability.

The commands are the only place where runs and reports meet: a command that runs an experiment
(``ufm``, ``demo``, ``compare``) calls the run module, then the report builder, which reads the
files the runs wrote (``--report-only`` skips the runs). Flags of ``train``, ``compare`` and
``ufm`` come from the fields of :class:`guided_nc.config.TrainConfig` and
:class:`guided_nc.config.UFMConfig`, so each default is written once.

User errors (a bad value, a missing file) print one line, ``guided-nc <command>: error: ...``,
and exit with 2; ``--debug`` (or ``GUIDED_NC_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from guided_nc._version import __version__
from guided_nc.catalog import DownloadFailed, MissingPackage
from guided_nc.runfiles import DiskError, RunFileError, RunFolderLocked

#: Benchmarks of ``guided-nc bench``: (module, help).
BENCHMARKS = {
    "etf": ("guided_nc.bench.etf", "nearest-ETF forward/backward vs the paper's solver"),
    "metrics": ("guided_nc.bench.metrics", "streaming NC metrics vs a hold-everything baseline"),
    "step": ("guided_nc.bench.step", "time per training step and peak memory of each head"),
    "device": ("guided_nc.bench.device", "one-shot GPU check: routes, heads, drivers, syncs"),
}

#: Settings of ``guided-nc demo``: UFM-10, every method, 5 seeds, sized to finish in < 5 minutes
#: on a 2-core CPU (measured; see docs/ufm.md).
DEMO_ITERATIONS = 800
DEMO_EVAL_INTERVAL = 100
#: UFM-10's tensors are small: one thread avoids OpenMP spinning on a busy machine.
DEMO_THREADS = 1

#: Errors that are the user's to fix: one line, no traceback (a bad value, a missing or
#: unreadable file, a broken run file, a folder in use, a full or read-only disk, a missing
#: optional package, a failed download).
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    RunFolderLocked,
    DiskError,
    MissingPackage,
    DownloadFailed,
    RunFileError,
)

#: Where the documents that the help texts name are, for a user who installed with pip.
DOCS_WHERE = "in the repository and the sdist"


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, ``guided-nc <command>: error: ...`` (exit 2), like the
    other user errors; the usage is one ``--help`` away (subcommands use this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = _Parser(
        prog="guided-nc",
        description="Guiding neural collapse towards the nearest simplex ETF: experiments, "
        "training, comparisons and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors (or GUIDED_NC_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_ufm(subparsers)
    _add_demo(subparsers)
    _add_train(subparsers)
    _add_compare(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``guided-nc`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    _configure_logging()
    debug = args.debug or os.environ.get("GUIDED_NC_DEBUG", "") not in ("", "0")
    try:
        code = args.func(args)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"guided-nc {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(code or 0)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not when it was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def _configure_logging() -> None:
    """Progress and run information go to stderr through the ``guided_nc`` logger."""
    logger = logging.getLogger("guided_nc")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"  # the process group is gone by the time we print


# --- ufm and demo -------------------------------------------------------------------------------


def _presets_argument(text: str):
    from guided_nc.config import parse_preset

    try:
        return tuple(parse_preset(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress output")
    from guided_nc.config import int_at_least

    parser.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)"
    )


def _add_ufm(subparsers) -> None:
    from guided_nc.config import UFMConfig, add_config_arguments, int_at_least

    parser = subparsers.add_parser(
        "ufm",
        help="unconstrained-feature-model experiments (paper section 4, Figs. 2-3)",
        description="Train free features with the standard, fixed-ETF and implicit-ETF heads "
        f"and write metrics.csv, summary.json, figures and report.md. See docs/ufm.md "
        f"({DOCS_WHERE}).",
    )
    parser.add_argument(
        "--preset",
        type=_presets_argument,
        default=_presets_argument("ufm-10"),
        help="comma-separated presets: ufm-10, ufm-100, ufm-200, ufm-1000, or K:N:d "
        "(default ufm-10). Several presets go to OUT/<preset>/ plus a comparison in OUT.",
    )
    parser.add_argument("--seeds", type=int_at_least(1), default=5, help="number of seeds (5)")
    parser.add_argument("--first-seed", type=int_at_least(0), default=0, help="first seed (0)")
    add_config_arguments(parser, UFMConfig)
    parser.add_argument("--out", default="runs/ufm", help="output folder (runs/ufm)")
    parser.add_argument(
        "--time-steps",
        type=int_at_least(1),
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
    _add_run_options(parser)
    parser.set_defaults(func=_ufm_command)


def ufm_configs(args: argparse.Namespace) -> list:
    """One :class:`guided_nc.config.UFMConfig` per ``--preset``, from the parsed flags."""
    from guided_nc.config import UFMConfig, config_from_namespace

    seeds = tuple(range(args.first_seed, args.first_seed + args.seeds))
    return [
        config_from_namespace(UFMConfig, args, preset=preset, seeds=seeds) for preset in args.preset
    ]


def _preset_folders(out: Path, configs) -> list[Path]:
    return [out] if len(configs) == 1 else [out / config.preset.name for config in configs]


def _ufm_report(out: Path, folders: list[Path]) -> Path:
    from guided_nc.reports.ufm import build_report, build_scaling_report

    path = None
    for folder in folders:
        path = build_report(folder)
    return build_scaling_report(out, folders) if len(folders) > 1 else path


def _ufm_command(args: argparse.Namespace) -> int:
    import torch

    from guided_nc import ufm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    configs = ufm_configs(args)
    folders = _preset_folders(out, configs)
    if args.time_steps is not None:
        _time_ufm_steps(configs, folders, args.time_steps)
        return 0
    if not args.report_only:
        ufm.run_ufm(configs, out, progress=not args.no_progress)
    print(_ufm_report(out, folders))
    return 0


def _time_ufm_steps(configs, folders: list[Path], steps: int) -> None:
    import numpy as np

    from guided_nc import ufm
    from guided_nc.runfiles import atomic_write_json, check_kind, environment_info, mark_kind

    for folder in folders:
        check_kind(folder, "ufm")
    for config, folder in zip(configs, folders, strict=True):
        times = ufm.measure_step_times(config, steps=steps)
        medians = {key: float(np.median(value)) for key, value in times.items()}
        result = {
            "preset": dataclasses.asdict(config.preset),
            "steps": steps,
            "environment": environment_info(),
            "seconds": times,
            "median_seconds": medians,
        }
        if "standard" in medians:
            result["ratio_to_standard"] = {k: v / medians["standard"] for k, v in medians.items()}
        mark_kind(folder, "ufm")
        atomic_write_json(folder / "step_times.json", result)
        text = ", ".join(f"{key} {1000 * value:.1f} ms" for key, value in medians.items())
        ratio = result.get("ratio_to_standard", {}).get("implicit")
        extra = "" if ratio is None else f"; implicit / standard {ratio:.2f}x"
        print(f"{config.preset.name}: {text}{extra}", file=sys.stderr)


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="a quick UFM-10 comparison of the three heads (5 seeds, < 5 min on 2 CPU cores)",
        description="UFM-10 (K=10, N=1000, d=512), standard / fixed / implicit ETF, 5 seeds, "
        f"{DEMO_ITERATIONS} full-batch AGD steps; prints the path of report.md.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (runs/demo)")
    _add_run_options(demo)
    demo.set_defaults(threads=DEMO_THREADS, func=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    import torch

    from guided_nc import ufm
    from guided_nc.config import PRESETS, UFMConfig
    from guided_nc.reports.ufm import build_report

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = UFMConfig(
        preset=PRESETS["ufm-10"], iterations=DEMO_ITERATIONS, eval_interval=DEMO_EVAL_INTERVAL
    )
    started = time.time()
    folder = ufm.run_preset(config, args.out, progress=not args.no_progress)
    path = build_report(folder)
    print(f"demo finished in {time.time() - started:.0f} s", file=sys.stderr)
    print(path)
    return 0


# --- train and compare --------------------------------------------------------------------------


def _add_train(subparsers) -> None:
    from guided_nc.config import TrainConfig, add_config_arguments
    from guided_nc.methods import METHOD_VARIANTS

    parser = subparsers.add_parser(
        "train",
        help="train a real network with a standard, fixed-ETF or implicit-ETF head",
        description=f"Train one real network (see docs/training.md, {DOCS_WHERE}); every flag "
        "is a field of guided_nc.config.TrainConfig, except that --method also takes the "
        "variants that compare runs.",
    )
    add_config_arguments(parser, TrainConfig, exclude=("method",))
    parser.add_argument(
        "--method",
        default=TrainConfig.method,
        metavar="{" + ",".join(METHOD_VARIANTS) + "}",
        help="classifier head, or a variant of one (implicit-no-ddn = implicit --no-ddn-grad, "
        f"fixed-haar = fixed --rotation haar) (default: {TrainConfig.method})",
    )
    parser.set_defaults(func=_train_command)


def _train_command(args: argparse.Namespace) -> int:
    from guided_nc.compare import method_config
    from guided_nc.config import TrainConfig, config_from_namespace
    from guided_nc.methods import method_variant
    from guided_nc.runfiles import read_long_csv
    from guided_nc.train import fit

    head = method_variant(args.method).head
    out = fit(method_config(config_from_namespace(TrainConfig, args, method=head), args.method))
    if _is_rank_zero():
        final = read_long_csv(out / "metrics.csv")[-1]
        print(
            f"epoch {final['epoch']}: train top-1 {final['train_acc1']:.2f} %, "
            f"test top-1 {final['test_acc1']:.2f} %"
        )
        print(f"run folder: {out}")
    return 0


def _add_compare(subparsers) -> None:
    from guided_nc.config import TrainConfig, add_config_arguments, int_at_least, methods_argument
    from guided_nc.methods import METHOD_VARIANTS, METHODS

    parser = subparsers.add_parser(
        "compare",
        help="train methods x seeds (skipping finished runs) and write tables and figures",
        description=f"Multi-seed comparison of the heads (see docs/training.md, {DOCS_WHERE}): "
        "runs write files, the report reads them.",
    )
    parser.add_argument(
        "--methods",
        type=methods_argument,
        default=",".join(METHODS),
        help=f"comma-separated methods from {','.join(METHOD_VARIANTS)} (default: "
        f"{','.join(METHODS)})",
    )
    parser.add_argument("--seeds", type=int_at_least(1), default=5, help="number of seeds (5)")
    parser.add_argument("--first-seed", type=int_at_least(0), default=0, help="first seed (0)")
    parser.add_argument("--out", default="runs/compare", help="comparison folder")
    parser.add_argument(
        "--timing-repeats",
        type=int_at_least(0),
        default=5,
        help="steps per head for the cost table (0: skip the measurement)",
    )
    parser.add_argument(
        "--table-epochs", default=None, help="epochs in the accuracy table (default: first, last)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from the run folders"
    )
    add_config_arguments(
        parser,
        TrainConfig,
        exclude=("method", "seed", "out", "resume", "resume_or_start", "rotation"),
    )
    parser.set_defaults(func=_compare_command)


def _compare_command(args: argparse.Namespace) -> int:
    from guided_nc.compare import run_comparison
    from guided_nc.config import TrainConfig, config_from_namespace, parse_int_list
    from guided_nc.reports.compare import write_report

    table_epochs = parse_int_list(args.table_epochs, "table_epochs") if args.table_epochs else None
    if not args.report_only:
        fields = {key: value for key, value in vars(args).items() if key != "out"}
        base = config_from_namespace(TrainConfig, argparse.Namespace(**fields))
        run_comparison(
            base,
            methods=args.methods,
            seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
            out=args.out,
            timing_repeats=args.timing_repeats,
        )
    if _is_rank_zero():
        print(f"report: {write_report(args.out, table_epochs=table_epochs)}")
    return 0


# --- bench --------------------------------------------------------------------------------------


def _add_bench(subparsers) -> None:
    import importlib

    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark",
        description="Benchmarks that time the baseline in the same run and print the ratios.",
    )
    inner = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = inner.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(func=_device_command if name == "device" else module.run)


def _device_command(args: argparse.Namespace) -> int:
    """The device check writes its JSON; the report turns it into markdown (and prints it)."""
    from guided_nc.bench import device
    from guided_nc.reports.device import write_markdown

    code = device.run(args)
    print(write_markdown(args.out).read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
