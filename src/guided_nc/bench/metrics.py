"""Benchmark of the neural-collapse metrics: streaming two-pass route vs a hold-everything baseline.

For each (N, d, K) it runs, in one invocation and each in a fresh subprocess:

* ``streaming``: :func:`guided_nc.metrics.collect_metrics` over a synthetic loader whose batches
  are generated on the fly from a seeded generator (batch i always has the same content), so the
  data are never all in memory; two passes, as on a real split.
* ``naive``: the authors' approach (``validate_NC.py``): one pass storing every feature in
  per-class lists (float32), then loops over classes for Sigma_W, a d x d ``scipy.linalg.pinv``
  of Sigma_B, and per-class NCC and margins against the means.

Reported: wall time (data generation included: the streaming route generates twice, as it would
run the network twice; one generation pass alone is also timed, so the ratio can be read
without it) and peak extra memory (growth of ``ru_maxrss`` over its value after imports, setup
and a warm-up call on a tiny problem, in the subprocess). NC1 of both routes is printed as a
cross-check.

Synthetic features: K random class centres (Gaussian), sample = tau * normalise(centre + 0.5
noise); balanced labels (sample i has class i mod K); classifier a Haar simplex ETF (K x d);
logits = W h. Every library's thread count (torch, OpenMP, BLAS) is set to ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SIZES = "60000x512x10,100000x2048x1000"
METHODS = ("streaming", "naive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``guided-nc bench metrics``."""
    parser.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help=f"comma-separated NxdxK cases (default {DEFAULT_SIZES})",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="samples per batch")
    parser.add_argument("--temperature", type=float, default=5.0, help="feature norm tau")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """``"60000x512x10"`` -> ``[(60000, 512, 10)]``; ValueError names a bad entry."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            raise ValueError(f"--sizes entry {item!r} is not of the form NxdxK, e.g. 60000x512x10")
        num_samples, dim, num_classes = (int(part) for part in parts)
        if num_classes < 2 or dim < num_classes or num_samples < 2 * num_classes:
            raise ValueError(f"--sizes entry {item!r} needs K >= 2, d >= K and N >= 2K")
        sizes.append((num_samples, dim, num_classes))
    return sizes


class SyntheticLoader:
    """Re-iterable loader of ``(features, labels)`` generated batch by batch from a seed.

    Batch i is drawn from ``torch.Generator().manual_seed(seed * 1_000_003 + i)``, so both passes
    (and the baseline) see identical data without holding it.
    """

    def __init__(self, num_samples, dim, num_classes, batch_size, temperature, seed):
        self.num_samples, self.dim, self.num_classes = num_samples, dim, num_classes
        self.batch_size, self.temperature, self.seed = batch_size, temperature, seed
        generator = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(num_classes, dim, generator=generator)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        for index, start in enumerate(range(0, self.num_samples, self.batch_size)):
            size = min(self.batch_size, self.num_samples - start)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            labels = torch.arange(start, start + size) % self.num_classes  # balanced
            noise = torch.randn(size, self.dim, generator=generator)
            features = self.temperature * F.normalize(self.centres[labels] + 0.5 * noise, dim=1)
            yield features, labels


def _classifier(dim: int, num_classes: int, seed: int) -> torch.Tensor:
    from guided_nc.etf import simplex_etf

    return simplex_etf(num_classes, dim, "haar", torch.Generator().manual_seed(seed + 1))


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _streaming(loader: SyntheticLoader, weight: torch.Tensor) -> float:
    from guided_nc.metrics import collect_metrics

    result = collect_metrics(
        lambda features: features,
        loader,
        loader.num_classes,
        weight,
        logits_fn=lambda features: features @ weight.T,
        progress=False,
    )
    return result["nc1"]


def _naive(loader: SyntheticLoader, weight: torch.Tensor) -> float:
    """The authors' validate_NC.py approach: keep every feature per class, loop over classes."""
    num_classes = loader.num_classes
    per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    predictions: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    w = weight.double().numpy()
    for features, labels in loader:
        logits = features @ weight.T
        for k in range(num_classes):
            rows = labels == k
            per_class[k].append(features[rows].numpy().copy())
            predictions[k].append(logits[rows].argmax(dim=1).numpy())
    classes = [np.concatenate(rows) for rows in per_class]
    counts = np.array([len(rows) for rows in classes], dtype=np.float64)
    means = np.stack([rows.mean(axis=0, dtype=np.float64) for rows in classes])
    global_mean = (counts @ means) / counts.sum()
    dim = means.shape[1]
    sigma_w = np.zeros((dim, dim))
    for k in range(num_classes):
        centred = classes[k].astype(np.float64) - means[k]
        sigma_w += centred.T @ centred
    sigma_w /= counts.sum()
    hbar = means - global_mean
    sigma_b = hbar.T @ hbar / num_classes
    # scipy's pinv as the release (rtol max(M, N) eps); numpy's default rcond 1e-15 would invert
    # rounding noise in the null space of Sigma_B at d = 2048 (NC1 off by ~1e10).
    import scipy.linalg  # deferred: only the baseline needs it (and --help stays quick)

    nc1 = float(np.trace(sigma_w @ scipy.linalg.pinv(sigma_b)) / num_classes)
    # NC2/NC3/equinorm: K x K, negligible; NCC mismatch and cosine margins per class.
    centred_w = w - w.mean(axis=0)
    centred_w /= np.linalg.norm(centred_w, axis=1, keepdims=True)
    mismatches, margins = 0, []
    for k in range(num_classes):
        rows = classes[k].astype(np.float64)
        distances = (means**2).sum(axis=1) - 2.0 * rows @ means.T
        mismatches += int((distances.argmin(axis=1) != np.concatenate(predictions[k])).sum())
        centred = rows - global_mean
        cosines = (centred / np.linalg.norm(centred, axis=1, keepdims=True)) @ centred_w.T
        own = cosines[:, k].copy()
        cosines[:, k] = -np.inf
        margins.append(own - cosines.max(axis=1))
    np.sort(np.concatenate(margins))  # the release keeps the sorted vector of all margins
    return nc1


def _worker(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    (num_samples, dim, num_classes) = parse_sizes(args.sizes)[0]
    loader = SyntheticLoader(
        num_samples, dim, num_classes, args.batch_size, args.temperature, args.seed
    )
    weight = _classifier(dim, num_classes, args.seed)
    method = _streaming if args.worker == "streaming" else _naive
    # Warm-up on a tiny problem: library loading (LAPACK, tqdm, ...) is setup, not measured.
    method(SyntheticLoader(16, 8, 4, 8, args.temperature, args.seed), _classifier(8, 4, 0))
    start = time.perf_counter()
    for _ in loader:  # one pass of data generation alone, to separate it from the metric's time
        pass
    generation = time.perf_counter() - start
    baseline_mib = _max_rss_mib()
    start = time.perf_counter()
    nc1 = method(loader, weight)
    seconds = time.perf_counter() - start
    peak = _max_rss_mib() - baseline_mib
    passes = 2 if args.worker == "streaming" else 1
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mib": peak,
                "nc1": nc1,
                "generation": generation,
                "metric_seconds": seconds - passes * generation,
            }
        )
    )
    return 0


def _measure(args: argparse.Namespace, size: tuple[int, int, int], method: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "guided_nc.bench.metrics",
        "--worker",
        method,
        "--sizes",
        "x".join(map(str, size)),
        "--batch-size",
        str(args.batch_size),
        "--temperature",
        str(args.temperature),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    env.update(MKL_NUM_THREADS=threads)
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or, with the hidden ``--worker``, one measurement) and print a table."""
    if args.worker:
        return _worker(args)
    sizes = parse_sizes(args.sizes)
    methods = METHODS[:1] if args.no_baseline else METHODS
    rows = []
    for size in sizes:
        measured = {method: _measure(args, size, method) for method in methods}
        rows.append((size, measured))
        print(f"# done {size}: {json.dumps(measured)}", file=sys.stderr)
    header = [
        "N",
        "d",
        "K",
        "streaming s",
        "streaming peak MiB",
        "naive s",
        "naive peak MiB",
        "data gen. s/pass",
        "time naive/streaming",
        "same, excl. data gen.",
        "memory naive/streaming",
        "d x d MiB",
        "NC1 rel. diff",
    ]
    table = []
    for (num_samples, dim, num_classes), measured in rows:
        streaming = measured["streaming"]
        naive = measured.get("naive", {"error": ["skipped"]})

        def cell(result, key, fmt):
            return "; ".join(result["error"]) if "error" in result else format(result[key], fmt)

        both = "error" not in streaming and "error" not in naive
        table.append(
            [
                str(num_samples),
                str(dim),
                str(num_classes),
                cell(streaming, "seconds", ".1f"),
                cell(streaming, "peak_mib", ".0f"),
                cell(naive, "seconds", ".1f"),
                cell(naive, "peak_mib", ".0f"),
                cell(streaming, "generation", ".1f"),
                f"{naive['seconds'] / streaming['seconds']:.2f}" if both else "-",
                f"{naive['metric_seconds'] / streaming['metric_seconds']:.2f}" if both else "-",
                f"{naive['peak_mib'] / max(streaming['peak_mib'], 1.0):.1f}" if both else "-",
                f"{dim * dim * 8 / 2**20:.0f}",
                f"{abs(naive['nc1'] - streaming['nc1']) / abs(streaming['nc1']):.1e}"
                if both
                else "-",
            ]
        )
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s) per "
        f"measurement; torch {torch.__version__}; "
        f"batch {args.batch_size}; tau {args.temperature}; seed {args.seed}"
    )
    if args.markdown:
        print(f"Machine: {machine}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in table:
            print("| " + " | ".join(line) + " |")
    else:
        print(f"machine: {machine}")
        widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        for line in table:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m guided_nc.bench.metrics`` and ``benchmarks/bench_metrics.py``."""
    parser = argparse.ArgumentParser(prog="bench_metrics", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
