"""Benchmark of the nearest-ETF layer: every exact route vs one SVD and vs the paper's solver.

For each (d, K) it times ``nearest_etf`` forward and forward+backward for every route of
``--routes`` (default: gram, svd, newton-schulz; closed-form backward), each next to **one float64
``torch.linalg.svd(A, full_matrices=False)`` of the same A, timed in the same subprocess** (the
reference the routes are judged against: ``ratio`` columns), next to what a user would try first,
``torch.linalg.polar(A)`` with autograd, and to the arithmetic floor of an exact forward+backward
(five d x K x K float64 products and one K x K ``eigh``), both on the same A in the same
subprocess; and, unless ``--no-baseline``, the
paper-faithful baseline: pymanopt trust regions (at most 30 iterations, stopping at gradient norm
1e-6, warm-started from the previous solution) for the forward and the dense Proposition-1 backward
(:func:`guided_nc.solvers.dense_ddn_backward`, in the input dtype as in the release). Every
measurement runs in a fresh subprocess, so its peak extra memory is its own: on Linux the peak
resident set size (reset before each measurement) over the resident size before it, elsewhere the
growth of ``ru_maxrss``; on CUDA ``torch.cuda.max_memory_allocated`` over the allocated bytes
before it. Times are medians of ``--repeats`` calls after one warm-up call (baseline: one call);
the process CPU time is reported too, the steadier number on a shared machine. The baseline is
skipped, with the reason printed, when its dense arrays exceed ``--baseline-max-gib`` or it runs
past ``--baseline-timeout`` (trust regions) or ``--dense-backward-timeout`` seconds.

Inputs mimic a training step: Y is a random d x K matrix of unit Frobenius norm, ``prox`` the
nearest ETF of a nearby Y (10 % away: the previous step), G = dL/dP a random matrix; seed fixed.
The speed-up over the baseline uses the fastest route's forward (and forward+backward).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_SIZES = "512x10,1024x100,1024x200,1024x1000,2048x1000"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
ROUTES = ("gram", "svd", "newton-schulz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``guided-nc bench etf``."""
    parser.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help=f"comma-separated dxK cases (default {DEFAULT_SIZES})",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] for the closed form")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="input dtype")
    parser.add_argument(
        "--routes",
        default=",".join(ROUTES),
        help=f"comma-separated nearest_etf routes to time (default {','.join(ROUTES)})",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=sorted(DTYPES),
        default="float64",
        help="nearest_etf(compute_dtype=...) of the routes (the SVD reference stays float64)",
    )
    parser.add_argument("--delta", type=float, default=1e-3, help="proximal coefficient")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the paper's solver")
    parser.add_argument(
        "--baseline-timeout",
        type=float,
        default=120.0,
        help="seconds after which the trust-region forward is abandoned (default 120)",
    )
    parser.add_argument(
        "--baseline-min-gradient-norm",
        type=float,
        default=1e-6,
        help="trust-region stopping tolerance (pymanopt's and the release's 1e-6; 0 runs all "
        "30 iterations, as the release's float32 GPU solver usually does)",
    )
    parser.add_argument(
        "--dense-backward-timeout",
        type=float,
        default=600.0,
        help="seconds after which the dense Proposition-1 backward is abandoned (default 600)",
    )
    parser.add_argument(
        "--baseline-max-gib",
        type=float,
        default=6.0,
        help="largest dense Proposition-1 backward to attempt, GiB (default 6)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in each measurement (default: torch's)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"512x10,1024x100"`` -> ``[(512, 10), (1024, 100)]``; ValueError names a bad entry."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise ValueError(f"--sizes entry {item!r} is not of the form DxK, e.g. 1024x100")
        dim, num_classes = int(parts[0]), int(parts[1])
        if num_classes < 2 or dim < num_classes:
            raise ValueError(f"--sizes entry {item!r} needs K >= 2 and d >= K")
        sizes.append((dim, num_classes))
    return sizes


# --- measurements (each runs in its own subprocess) -------------------------------------------


def _inputs(dim: int, num_classes: int, dtype: torch.dtype, device: str, seed: int, delta: float):
    from guided_nc.etf import nearest_etf

    generator = torch.Generator().manual_seed(seed)
    previous = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    features = previous + 0.1 * torch.randn(dim, num_classes, generator=generator).double()
    prox = nearest_etf(previous / previous.norm(), delta=delta)
    grad = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    to = {"dtype": dtype, "device": device}
    return (features / features.norm()).to(**to), prox.to(**to), grad.to(**to)


def _max_rss_bytes() -> int:
    scale = 1 if platform.system() == "Darwin" else 1024  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        _proc_status_bytes("VmHWM")
    except OSError:
        return False
    return True


class _Peak:
    """Peak extra memory of what runs between construction and ``read()``.

    CUDA: ``max_memory_allocated`` over the allocated bytes at construction. CPU: the peak
    resident set size over the resident size at construction; on Linux the peak is reset at
    construction (so a later measurement in the same process is its own), elsewhere
    ``ru_maxrss``, which only measures growth over the process's earlier peak.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        elif _reset_peak_rss():
            self.resettable = True
            self.base = _proc_status_bytes("VmRSS")
        else:
            self.resettable = False
            self.base = _max_rss_bytes()

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.resettable:
            return _proc_status_bytes("VmHWM") - self.base
        return _max_rss_bytes() - self.base


def _timed(function, repeats: int, device: str) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of ``repeats`` calls (after warm-up).

    On a shared machine the CPU time (all threads of this process) is the steadier number: with
    one thread it is the wall time the call would take on an idle core.
    """
    times, cpu_times = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), statistics.median(cpu_times)


def measure_closed_form(
    dim: int,
    num_classes: int,
    dtype: str,
    device: str,
    repeats: int,
    seed: int,
    delta: float,
    routes: tuple[str, ...] = ROUTES,
    compute_dtype: str = "float64",
) -> dict:
    """Every route's forward and forward+backward, and one float64 SVD of the same A.

    Returns ``{"svd_s", "svd_cpu_s", "routes": {route: {... seconds and peak extra bytes,
    "ratio_forward", "ratio_forward_backward"}}}``; the ratios are to ``svd_s`` of this process.
    """
    import math

    from guided_nc.etf import nearest_etf

    features, prox, grad = _inputs(dim, num_classes, DTYPES[dtype], device, seed, delta)
    features.requires_grad_(True)
    with torch.no_grad():  # the A every route factors, in float64: c Y M + delta prox
        y = features.detach().double()
        target = 2.0 / math.sqrt(num_classes - 1) * (y - y.mean(dim=1, keepdim=True))
        target = target + delta * prox.double()
    # Start autograd's and LAPACK's machinery on a tiny problem so one-off costs are not counted.
    tiny = torch.randn(4, 2, dtype=features.dtype, device=device, requires_grad=True)
    for route in routes:
        nearest_etf(tiny, solver=route).sum().backward()

    def reference_svd():
        torch.linalg.svd(target, full_matrices=False)

    # What a user would try first: torch.linalg.polar with autograd, on the same float64 A.
    grad64 = grad.detach().double()

    def polar_with_autograd():
        matrix = target.detach().requires_grad_(True)
        torch.autograd.backward(torch.linalg.polar(matrix)[0], grad64)

    # The arithmetic floor of an exact forward+backward: five d x K x K float64 products and one
    # K x K eigh (A^T A, A N; P^T G, P X, G N), nothing else.
    gram = target.transpose(0, 1) @ target

    def arithmetic_floor():
        for _ in range(5):
            target @ gram
        torch.linalg.eigh(gram)

    timings = {}
    for name, function in (
        ("svd", reference_svd),
        ("polar", polar_with_autograd),
        ("floor", arithmetic_floor),
    ):
        function()  # warm-up
        timings[name] = _timed(function, repeats, device)
    (svd_s, svd_cpu_s), (polar_s, _), (floor_s, _) = timings.values()
    result: dict = {
        "svd_s": svd_s,
        "svd_cpu_s": svd_cpu_s,
        "polar_s": polar_s,
        "floor_s": floor_s,
        "routes": {},
    }
    options = {"compute_dtype": DTYPES[compute_dtype]}
    for route in routes:

        def forward(route=route):
            with torch.no_grad():
                return nearest_etf(features, prox, delta, route, **options)

        def forward_backward(route=route):
            features.grad = None
            torch.autograd.backward(nearest_etf(features, prox, delta, route, **options), grad)

        peak = _Peak(device)
        forward()  # warm-up
        forward_backward()
        first_peak = peak.read()  # includes one-off library workspaces (e.g. BLAS buffers)
        peak = _Peak(device)
        forward()
        forward_peak = peak.read()
        peak = _Peak(device)
        forward_backward()
        both_peak = peak.read()
        forward_s, forward_cpu_s = _timed(forward, repeats, device)
        both_s, both_cpu_s = _timed(forward_backward, repeats, device)
        result["routes"][route] = {
            "forward_s": forward_s,
            "forward_backward_s": both_s,
            "forward_cpu_s": forward_cpu_s,
            "forward_backward_cpu_s": both_cpu_s,
            "forward_peak_bytes": forward_peak,
            "forward_backward_peak_bytes": both_peak,
            "first_call_peak_bytes": first_peak,
            "ratio_forward": forward_s / svd_s,
            "ratio_forward_backward": both_s / svd_s,
            "speedup_over_polar": polar_s / both_s,
            "ratio_to_floor": both_s / floor_s,
        }
    return result


def fastest_route(closed: dict, key: str = "forward_backward_s") -> str:
    """The route of a ``measure_closed_form`` result with the smallest ``key``."""
    return min(closed["routes"], key=lambda route: closed["routes"][route][key])


def measure_trust_regions(
    dim: int,
    num_classes: int,
    dtype: str,
    seed: int,
    delta: float,
    min_gradient_norm: float = 1e-6,
) -> dict:
    """The paper's forward: <= 30 trust-region iterations from prox (CPU, numpy float64)."""
    from guided_nc.solvers import trust_region_nearest_etf

    features, prox, _ = _inputs(dim, num_classes, DTYPES[dtype], "cpu", seed, delta)
    # Import pymanopt and run it once on a tiny problem so that one-off costs are not counted.
    trust_region_nearest_etf(torch.eye(4, 2, dtype=torch.float64), None, delta, 30)
    peak = _Peak("cpu")
    start = time.perf_counter()
    _, info = trust_region_nearest_etf(
        features, prox, delta, 30, min_gradient_norm=min_gradient_norm, return_info=True
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak.read(), "iterations": info["iterations"]}


def measure_dense_backward(dim: int, num_classes: int, dtype: str, seed: int, delta: float) -> dict:
    """The paper's backward: dense Proposition 1 in ``dtype`` at the closed-form optimum."""
    from guided_nc.etf import nearest_etf
    from guided_nc.solvers import dense_ddn_backward

    features, prox, grad = _inputs(dim, num_classes, DTYPES[dtype], "cpu", seed, delta)
    frame = nearest_etf(features, prox, delta)
    peak = _Peak("cpu")
    start = time.perf_counter()
    dense_ddn_backward(features, frame, prox, delta, grad, max_bytes=2**62, dtype=DTYPES[dtype])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak.read()}


WORKERS = {
    "closed": measure_closed_form,
    "trust-regions": measure_trust_regions,
    "dense-backward": measure_dense_backward,
}


def _run_worker(kind: str, kwargs: dict, timeout: float | None, threads: int | None) -> dict:
    """Run one measurement in a fresh interpreter; ``{"error": reason}`` when it fails."""
    command = [sys.executable, "-m", "guided_nc.bench.etf", "--worker", kind, json.dumps(kwargs)]
    environment = dict(os.environ)
    if threads is not None:  # before torch starts its thread pools
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=environment
        )
    except subprocess.TimeoutExpired:
        return {"error": f"> {timeout:.0f} s (abandoned)"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the command ----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mb(num_bytes: int) -> str:
    # A negative growth (the allocator returned memory below the starting level) shows as 0.
    return f"{max(num_bytes, 0) / 1e6:.0f} MB"


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print one row per size (and a markdown table with --markdown)."""
    from tqdm import tqdm

    from guided_nc.solvers import dense_ddn_bytes

    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print(f"error: --repeats={args.repeats} must be >= 1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device={args.device} but CUDA is not available; use cpu", file=sys.stderr)
        return 2
    routes = tuple(route.strip() for route in args.routes.split(",") if route.strip())
    unknown = [route for route in routes if route not in ROUTES]
    if unknown or not routes:
        print(
            f"error: --routes={args.routes!r}: use a subset of {','.join(ROUTES)}", file=sys.stderr
        )
        return 2
    from guided_nc.runfiles import environment_info

    threads = args.threads or torch.get_num_threads()
    machine = environment_info()
    print(
        f"# nearest ETF: torch {machine['torch']}, {threads} threads, "
        f"device {args.device}, input {args.dtype}, compute {args.compute_dtype}, "
        f"delta {args.delta}, repeats {args.repeats}, "
        f"{machine['processor'] or machine['machine']}; ratio = time / one float64 "
        f"torch.linalg.svd(A) in the same process",
        flush=True,
    )
    rows = []
    progress = tqdm(
        sizes,
        desc="bench etf",
        disable=args.no_progress or not sys.stderr.isatty(),
        file=sys.stderr,
    )
    for dim, num_classes in progress:
        common = {"dim": dim, "num_classes": num_classes, "dtype": args.dtype, "seed": args.seed}
        common["delta"] = args.delta
        closed_options = {
            **common,
            "device": args.device,
            "repeats": args.repeats,
            "routes": list(routes),
            "compute_dtype": args.compute_dtype,
        }
        closed = _run_worker("closed", closed_options, None, args.threads)
        row = {"d": dim, "K": num_classes, "closed": closed}
        if not args.no_baseline:
            row["trust_regions"] = _run_worker(
                "trust-regions",
                {**common, "min_gradient_norm": args.baseline_min_gradient_norm},
                args.baseline_timeout,
                args.threads,
            )
            needed = dense_ddn_bytes(dim, num_classes, DTYPES[args.dtype])
            if needed > args.baseline_max_gib * 2**30:
                row["dense_backward"] = {
                    "error": f"needs {needed / 2**30:,.0f} GiB > --baseline-max-gib "
                    f"{args.baseline_max_gib:g}"
                }
            else:
                row["dense_backward"] = _run_worker(
                    "dense-backward", common, args.dense_backward_timeout, args.threads
                )
        rows.append(row)
        print(_text_row(row), flush=True)
    if args.markdown:
        print()
        print(markdown_table(rows, baseline=not args.no_baseline))
    return 0 if all("error" not in row["closed"] for row in rows) else 1


def _text_row(row: dict) -> str:
    closed = row["closed"]
    head = f"d={row['d']} K={row['K']}: "
    if "error" in closed:
        return head + f"closed form {closed['error']}"
    parts = [
        f"svd(A) {_ms(closed['svd_s'])}, polar+autograd {_ms(closed['polar_s'])}, "
        f"floor {_ms(closed['floor_s'])}"
    ]
    for route, timing in closed["routes"].items():
        parts.append(
            f"{route} forward {_ms(timing['forward_s'])} ({timing['ratio_forward']:.2f}x), "
            f"forward+backward {_ms(timing['forward_backward_s'])} "
            f"({timing['ratio_forward_backward']:.2f}x; polar/this "
            f"{timing['speedup_over_polar']:.2f}x, this/floor {timing['ratio_to_floor']:.2f}x), "
            f"peak +{_mb(timing['forward_backward_peak_bytes'])}"
        )
    text = head + "; ".join(parts)
    if "trust_regions" in row:
        forward, backward = row["trust_regions"], row["dense_backward"]
        cells = _baseline_cells(row)
        text += (
            f" | baseline forward {forward.get('error') or _ms(forward['seconds'])}, "
            f"dense backward {backward.get('error') or _ms(backward['seconds'])}"
            f" | speed-up ({cells['route']}) forward {cells['forward_ratio']}, "
            f"forward+backward {cells['both_ratio']}"
        )
    return text


def _baseline_cells(row: dict) -> dict:
    closed, forward, backward = row["closed"], row["trust_regions"], row["dense_backward"]
    cells = {
        "forward": forward.get("error")
        or f"{_ms(forward['seconds'])} ({forward['iterations']} it.)",
        "backward": backward.get("error") or _ms(backward["seconds"]),
        "peak": "-",
        "forward_ratio": "-",
        "both_ratio": "-",
        "route": "-",
    }
    if "error" in closed:
        return cells
    route = fastest_route(closed, "forward_s")
    cells["route"] = route
    closed_forward = closed["routes"][route]["forward_s"]
    closed_both = closed["routes"][fastest_route(closed)]["forward_backward_s"]
    if "error" not in forward:
        cells["forward_ratio"] = f"{forward['seconds'] / closed_forward:,.0f}x"
    elif "abandoned" in forward["error"]:
        limit = float(forward["error"].split()[1])
        cells["forward_ratio"] = f"> {limit / closed_forward:,.0f}x"
    if "error" not in forward and "error" not in backward:
        total = forward["seconds"] + backward["seconds"]
        cells["both_ratio"] = f"{total / closed_both:,.0f}x"
        cells["peak"] = _mb(max(forward["peak_bytes"], backward["peak_bytes"]))
    elif "error" not in forward:
        cells["peak"] = _mb(forward["peak_bytes"]) + " (fwd)"
    return cells


def markdown_table(rows: list[dict], baseline: bool = True) -> str:
    """A markdown table of the benchmark rows: one line per (d, K) and route.

    Columns: d, K, route, forward, forward+backward, their ratios to one float64 SVD of A (same
    process), peak extra memory; with the baseline, the trust-region forward, the dense backward,
    their peak memory and the speed-ups of the fastest route (on the route's first line).
    """
    header = [
        "d",
        "K",
        "route",
        "forward",
        "forward+backward",
        "forward / svd(A)",
        "fwd+bwd / svd(A)",
        "polar+autograd / fwd+bwd",
        "fwd+bwd / floor",
        "peak extra memory fwd / fwd+bwd",
    ]
    if baseline:
        header += [
            "baseline forward (TR, <= 30 it.)",
            "baseline backward (dense Prop. 1)",
            "baseline peak extra memory",
            "speed-up forward",
            "speed-up fwd+bwd",
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        closed = row["closed"]
        extra = _baseline_cells(row) if baseline else {}
        if "error" in closed:
            cells = [str(row["d"]), str(row["K"]), "-", closed["error"]] + ["-"] * 6
            if baseline:
                cells += [extra[key] for key in ("forward", "backward", "peak")] + ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for index, (route, timing) in enumerate(closed["routes"].items()):
            cells = [
                str(row["d"]),
                str(row["K"]),
                route,
                f"{_ms(timing['forward_s'])} (CPU {_ms(timing['forward_cpu_s'])})",
                f"{_ms(timing['forward_backward_s'])} "
                f"(CPU {_ms(timing['forward_backward_cpu_s'])})",
                f"{timing['ratio_forward']:.2f}x",
                f"{timing['ratio_forward_backward']:.2f}x",
                f"{timing['speedup_over_polar']:.2f}x",
                f"{timing['ratio_to_floor']:.2f}x",
                f"{_mb(timing['forward_peak_bytes'])} / "
                f"{_mb(timing['forward_backward_peak_bytes'])}",
            ]
            if baseline:
                if index == 0:
                    cells += [extra[key] for key in ("forward", "backward", "peak")]
                    cells += [
                        f"{extra['forward_ratio']} ({extra['route']})",
                        extra["both_ratio"],
                    ]
                else:
                    cells += ["", "", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    svd_line = ", ".join(
        f"{row['d']}x{row['K']}: {_ms(row['closed']['svd_s'])}"
        for row in rows
        if "error" not in row["closed"]
    )
    baselines = ", ".join(
        f"{row['d']}x{row['K']}: polar {_ms(row['closed']['polar_s'])}, "
        f"floor {_ms(row['closed']['floor_s'])}"
        for row in rows
        if "error" not in row["closed"]
    )
    return (
        "\n".join(lines)
        + f"\n\nsvd(A), float64, same processes: {svd_line}"
        + f"\n\ntorch.linalg.polar(A) + autograd and the arithmetic floor (5 d x K x K float64 "
        f"products + one K x K eigh), same processes: {baselines}"
    )


def _worker_main(argv: list[str]) -> int:
    """``python -m guided_nc.bench.etf --worker KIND JSON``: one measurement, JSON on stdout."""
    kind, kwargs = argv[1], json.loads(argv[2])
    result = WORKERS[kind](**kwargs)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m guided_nc.bench.etf`` / benchmarks/bench_etf.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(argv)
    parser = argparse.ArgumentParser(prog="bench_etf", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
