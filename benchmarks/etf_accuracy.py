"""Accuracy of every nearest-ETF route against the float64 SVD route (docs/etf.md tables).

``python benchmarks/etf_accuracy.py [--sizes 512x10,1024x100] [--seeds 3]`` prints one markdown
row per (input kind, size, route, compute dtype): the largest relative error over the seeds of

* ``P M`` (``||(P - P_svd) M||_F / ||P_svd M||_F``; W = etf_classifier(P) depends on P only
  through P M, so this is also W's relative error),
* ``dL/dY`` for ``L = <etf_classifier(P), R>`` with a fixed random R,

and which route actually ran (the Gram route may fall back to the SVD, Newton-Schulz may not
converge and fall back). Inputs (unit-norm Y, prox = the nearest ETF of a Y 10 % away):

* random: Gaussian Y, delta = 1e-3;
* collapsed: Y = a simplex ETF (K - 1 equal singular values) + 1e-6 noise, delta = 1e-3;
* rank-deficient: Y M of rank K/2 (class means in a K/2-dimensional subspace), delta = 1e-3;
* tiny-delta: Gaussian Y, delta = 1e-7 (cond(A) ~ 1e7);
* delta-0: rank(Y M) = K - 1 and delta = 0 (A^T A singular; P M is still unique).

``--error-model`` prints instead the measurement behind the Gram route's threshold: for
A = U diag(s) V^T with a known polar factor U V^T and cond(A) from 1e1 to 1e6 (spectra: log-spaced,
one small value, two close small values), the Gram formula's error (without the fallback) on P
and on dL/dA, divided by u cond^2 (u = 2^-53): the constant C of ``error <= C u cond^2``.
"""

from __future__ import annotations

import argparse
import math

import torch

from guided_nc import etf
from guided_nc.etf import etf_classifier, nearest_etf

KINDS = ("random", "collapsed", "rank-deficient", "tiny-delta", "delta-0")
# (route, compute dtype): every exact route in float64, and the float32 solves (compute_dtype).
CASES = (
    ("gram", torch.float64),
    ("newton-schulz", torch.float64),
    ("svd", torch.float32),
    ("newton-schulz", torch.float32),
)


def problem(kind: str, dim: int, num_classes: int, seed: int):
    """(Y, prox, delta) as float64 tensors."""
    generator = torch.Generator().manual_seed(seed)

    def gaussian(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    delta = {"tiny-delta": 1e-7, "delta-0": 0.0}.get(kind, 1e-3)
    if kind == "collapsed":
        frame, _ = torch.linalg.qr(gaussian(dim, num_classes))
        y = frame - frame.mean(dim=1, keepdim=True) + 1e-6 * gaussian(dim, num_classes)
    elif kind == "rank-deficient":
        rank = max(1, num_classes // 2)
        y = gaussian(dim, rank) @ gaussian(rank, num_classes)
    else:
        y = gaussian(dim, num_classes)
    y = y / y.norm()
    nearby = y + 0.1 * gaussian(dim, num_classes) / math.sqrt(dim * num_classes)
    prox = nearest_etf(nearby / nearby.norm(), delta=max(delta, 1e-3), solver="svd")
    return y, prox, delta


def run_case(y, prox, delta, route, compute_dtype, weights):
    """(P M, dL/dY, route that ran) for one route; L = <etf_classifier(P), weights>."""
    features = y.clone().requires_grad_(True)
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(1)
        return real_svd(*args, **kwargs)

    torch.linalg.svd = counting_svd
    try:
        if route == "newton-schulz" and delta == 0:
            return None
        frame = nearest_etf(features, prox, delta, route, compute_dtype=compute_dtype)
    finally:
        torch.linalg.svd = real_svd
    ran = route if not calls or route == "svd" else "svd (fallback)"
    (etf_classifier(frame) * weights).sum().backward()
    centred = frame.detach() - frame.detach().mean(dim=1, keepdim=True)
    return centred, features.grad, ran


def relative(value, reference):
    return float((value - reference).norm() / reference.norm())


def error_model(dim: int = 256, num_classes: int = 20, seeds: int = 5) -> None:
    """The Gram formula's error / (u cond^2) on synthetic spectra (see the module docstring)."""
    unit = 2.0**-53
    header = ["spectrum", "cond(A)", "P error, SVD", "P error, Gram", "C (P)"]
    header += ["dL/dA error, Gram", "C (dL/dA)"]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("log-spaced", "one small", "two close small"):
        for cond in (1e1, 1e2, 1e3, 1e4, 1e5, 1e6):
            worst = [0.0, 0.0, 0.0]
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(seed)
                left, _ = torch.linalg.qr(
                    torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
                )
                right, _ = torch.linalg.qr(
                    torch.randn(num_classes, num_classes, generator=generator, dtype=torch.float64)
                )
                if kind == "log-spaced":
                    spectrum = torch.logspace(
                        0, -math.log10(cond), num_classes, dtype=torch.float64
                    )
                else:
                    spectrum = torch.ones(num_classes, dtype=torch.float64)
                    spectrum[-1] = 1 / cond
                    if kind == "two close small":
                        spectrum[-2] = 1.01 / cond
                matrix = (left * spectrum) @ right.T
                exact = left @ right.T
                grad = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
                exact_grad = etf.polar_backward(left, spectrum, right, grad)
                u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
                eigenvalues, vectors = torch.linalg.eigh(matrix.T @ matrix)
                roots = eigenvalues.clamp_min(0).sqrt()
                gram_frame = matrix @ ((vectors / roots) @ vectors.T)
                gram_grad = etf.polar_backward(gram_frame @ vectors, roots, vectors, grad)
                errors = (
                    float((u @ vh - exact).abs().max()),
                    float((gram_frame - exact).abs().max()),
                    relative(gram_grad, exact_grad),
                )
                worst = [max(a, b) for a, b in zip(worst, errors, strict=True)]
            scale = unit * cond**2
            print(
                f"| {kind} | {cond:.0e} | {worst[0]:.1e} | {worst[1]:.1e} | {worst[1] / scale:.2f} "
                f"| {worst[2]:.1e} | {worst[2] / scale:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x10,1024x100")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--error-model", action="store_true", help="the Gram error model table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.error_model:
        error_model()
        return
    sizes = [tuple(int(x) for x in item.split("x")) for item in args.sizes.split(",")]
    print("| input | d, K | route | compute | ran | P M error | dL/dY error |")
    print("|---|---|---|---|---|---|---|")
    for kind in KINDS:
        for dim, num_classes in sizes:
            worst: dict = {}
            for seed in range(args.seeds):
                y, prox, delta = problem(kind, dim, num_classes, seed)
                weights = torch.randn(
                    num_classes,
                    dim,
                    generator=torch.Generator().manual_seed(100 + seed),
                    dtype=torch.float64,
                )
                reference = run_case(y, prox, delta, "svd", torch.float64, weights)
                for route, compute_dtype in CASES:
                    result = run_case(y, prox, delta, route, compute_dtype, weights)
                    key = (route, compute_dtype)
                    if result is None:
                        worst[key] = None
                        continue
                    errors = (relative(result[0], reference[0]), relative(result[1], reference[1]))
                    previous = worst.get(key)
                    ran = {result[2]} | (previous[2] if previous else set())
                    if previous:
                        errors = tuple(max(a, b) for a, b in zip(errors, previous[:2], strict=True))
                    worst[key] = (*errors, ran)
            for (route, compute_dtype), value in worst.items():
                compute = str(compute_dtype).replace("torch.", "")
                if value is None:
                    cells = ["n/a (needs delta > 0)", "-", "-"]
                else:
                    cells = [" / ".join(sorted(value[2])), f"{value[0]:.1e}", f"{value[1]:.1e}"]
                print(
                    f"| {kind} | {dim}, {num_classes} | {route} | {compute} | "
                    + " | ".join(cells)
                    + " |"
                )
    print()
    print(
        "Gram threshold (lambda_min/lambda_max of A^T A) for float64 results: "
        f"{etf.gram_eigenvalue_threshold(torch.float64, torch.float64):.2g}, float32 results: "
        f"{etf.gram_eigenvalue_threshold(torch.float64, torch.float32):.2g}"
    )


if __name__ == "__main__":
    main()
