"""One-shot device check: every route and every head step on the device against the CPU, timed.

``guided-nc bench device`` is meant to run once on a GPU (in under 8 minutes on one H200) and
to be recorded in docs/benchmarks.md. It writes ``device_check.json`` and ``device_check.md``
into ``--out`` (the markdown by :func:`guided_nc.reports.device.write_markdown`, from the JSON)
and checks, in order:

1. **routes**: ``nearest_etf`` with every exact route (gram, svd, newton-schulz) and compute
   dtype (float64, float32) on the device, against the CPU float64 SVD route: the error of
   W = etf_classifier(P) and of the gradient dL/dY (a fixed random G on W), with tolerances
   that follow the compute dtype;
2. **heads**: three training steps of each head (standard, fixed, implicit with and without
   the DDN gradient) on free features on the device against the same steps on the CPU in
   float64: the logits, the head's weight and the features after the steps;
3. **svd drivers**: ``torch.linalg.svd`` with each ``driver=`` (gesvd, gesvdj, gesvda; CUDA
   only) against every route's forward+backward, at (512, 10), (1024, 100), (2048, 1000), in
   float64 and float32;
4. **table 3**: the heads' training step, with and without the DDN gradient, on ResNet18-CIFAR
   and on ResNet50 with d = 2048, K = 1000 (synthetic data; batch 256, halved until it fits),
   with peak GPU memory (the paper's Table 3 layout);
5. **syncs**: host synchronisations of one training step of each head, counted with
   ``torch.cuda.set_sync_debug_mode("warn")``;
6. **torchrun**: a 1-process ``torchrun ... guided-nc train`` on the device (NCCL on CUDA),
   as a smoke test of the distributed path.

``--dry-run`` shrinks every size (CI runs ``--device cpu --dry-run`` so that the check cannot
rot); on a CPU the driver and sync sections report what they skip and why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_arguments", "run"]

ROUTES = ("gram", "svd", "newton-schulz")
DRIVERS = ("gesvd", "gesvdj", "gesvda")
COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: Error tolerance by compute dtype: float64 keeps ~1e-10 even through the 1/(s_i + s_j) of the
#: backward; float32 keeps ~1e-5 on W and ~1e-4 on the gradient (docs/etf.md).
TOLERANCE = {"float64": 1e-8, "float32": 1e-3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``guided-nc bench device``."""
    parser.add_argument("--device", default="cuda", help="the device to check (default cuda)")
    parser.add_argument("--out", type=Path, default=Path("runs/device-check"), help="folder")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (a CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to skip (e.g. torchrun,table3)"
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(function, repeats: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        function()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _problem(dim: int, num_classes: int, seed: int = 0):
    """Unit-norm class means Y, a nearby previous frame (prox), and a random G on W."""
    from guided_nc.etf import nearest_etf

    generator = torch.Generator().manual_seed(seed)
    previous = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    features = previous + 0.1 * torch.randn(dim, num_classes, generator=generator).double()
    prox = nearest_etf(previous / previous.norm(), solver="svd")
    grad = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    return features / features.norm(), prox, grad


def _solve(features, prox, grad, **options):
    """W and dL/dY (L = <G, W>) of one nearest-ETF solve, in float64 on the CPU."""
    from guided_nc.etf import etf_classifier, nearest_etf

    features = features.detach().clone().requires_grad_(True)
    weight = etf_classifier(nearest_etf(features, prox, **options))
    (weight.double() * grad.to(weight.device)).sum().backward()
    return weight.detach().double().cpu(), features.grad.double().cpu()


def check_routes(device: torch.device, dry: bool) -> list[dict[str, Any]]:
    """Section 1: every route and compute dtype on the device against the CPU float64 SVD."""
    rows = []
    for dim, num_classes in ((16, 4),) if dry else ((64, 8), (256, 32)):
        features, prox, grad = _problem(dim, num_classes)
        reference = _solve(features, prox, grad, solver="svd")
        for route in ROUTES:
            for name, dtype in COMPUTE_DTYPES.items():
                on_device = (tensor.to(device, dtype) for tensor in (features, prox))
                weight, gradient = _solve(*on_device, grad, solver=route, compute_dtype=dtype)
                errors = [
                    float((weight - reference[0]).abs().max()),
                    float((gradient - reference[1]).abs().max() / reference[1].abs().max()),
                ]
                rows.append(
                    {
                        "d": dim,
                        "K": num_classes,
                        "route": route,
                        "compute_dtype": name,
                        "weight_error": errors[0],
                        "gradient_relative_error": errors[1],
                        "ok": max(errors) <= TOLERANCE[name],
                    }
                )
    return rows


def _head_run(method: str, device: torch.device, dtype: torch.dtype, steps: int = 3):
    """``steps`` SGD steps of a head on free features; logits, head weight, features after."""
    from guided_nc.heads import build_head
    from guided_nc.models import Classifier, FreeFeatures
    from guided_nc.timing import training_step

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 16, generator=generator, dtype=torch.float64)
    labels = (torch.arange(40) % 4).to(device)
    torch.manual_seed(0)  # the standard head's initial weight
    head = build_head(method, 16, 4, dtype=torch.float64)
    model = Classifier(FreeFeatures(features), head).to(device=device, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        training_step(model, optimizer, None, labels)
    model.eval()
    with torch.no_grad():
        logits = model(None)
    return [t.detach().double().cpu() for t in (logits, model.head.weight, model.backbone.features)]


def check_heads(device: torch.device) -> list[dict[str, Any]]:
    """Section 2: three training steps of each head on the device vs the CPU in float64."""
    from guided_nc.methods import TIMED_METHODS

    rows = []
    for method in TIMED_METHODS:
        reference = _head_run(method, torch.device("cpu"), torch.float64)
        for name, dtype in COMPUTE_DTYPES.items():
            result = _head_run(method, device, dtype)
            errors = {
                key: float((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                for key, mine, ref in zip(
                    ("logits", "weight", "features"), result, reference, strict=True
                )
            }
            rows.append(
                {
                    "method": method,
                    "dtype": name,
                    **errors,
                    "ok": max(errors.values()) <= TOLERANCE[name],
                }
            )
    return rows


def time_drivers(device: torch.device, dry: bool, repeats: int) -> list[dict[str, Any]]:
    """Section 3: torch.linalg.svd per driver against each route's forward + backward."""
    from guided_nc.etf import nearest_etf

    sizes = ((64, 4), (128, 16)) if dry else ((512, 10), (1024, 100), (2048, 1000))
    drivers = DRIVERS if device.type == "cuda" else (None,)
    rows = []
    for dim, num_classes in sizes:
        features, prox, _ = _problem(dim, num_classes)
        for name, dtype in COMPUTE_DTYPES.items():
            matrix = (2.0 / (num_classes - 1) ** 0.5 * features + 1e-3 * prox).to(device, dtype)
            row: dict[str, Any] = {"d": dim, "K": num_classes, "dtype": name}
            for driver in drivers:
                key = f"svd_{driver or 'default'}_s"
                try:
                    row[key] = _median_seconds(
                        lambda d=driver, a=matrix: torch.linalg.svd(
                            a, full_matrices=False, driver=d
                        ),
                        repeats,
                        device,
                    )
                except RuntimeError as error:  # a driver this build or device lacks
                    row[key] = f"failed: {str(error).splitlines()[0][:80]}"
            y = features.to(device, dtype).requires_grad_(True)
            p, g = prox.to(device, dtype), torch.randn_like(features).to(device, dtype)
            for route in ROUTES:

                def forward_backward(route=route, y=y, p=p, g=g, dtype=dtype):
                    y.grad = None
                    frame = nearest_etf(y, p, solver=route, compute_dtype=dtype)
                    torch.autograd.backward(frame, g)

                row[f"{route}_s"] = _median_seconds(forward_backward, repeats, device)
            baseline = row.get("svd_gesvd_s", row.get("svd_default_s"))
            for route in ROUTES:
                if isinstance(baseline, float):
                    row[f"{route}_ratio"] = row[f"{route}_s"] / baseline
            rows.append(row)
    return rows


def _settings(dry: bool) -> dict[str, tuple]:
    # name: (backbone, image side, d, K, batch)
    if dry:
        return {"mlp": ("mlp", 8, 512, 10, 16)}
    return {
        "resnet18-cifar": ("resnet18", 32, 512, 10, 256),
        "resnet50-imagenet": ("resnet50", 224, 2048, 1000, 256),
    }


def _batch(name: str, side: int, num_classes: int, batch: int, device: torch.device):
    from guided_nc.models import build_backbone

    torch.manual_seed(0)
    shape = (3, side, side) if name != "mlp" else (1, side, side)
    backbone = build_backbone(name, input_shape=shape, affine=False, bias=False).to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, *shape, generator=generator).to(device)
    labels = (torch.arange(batch) % num_classes).to(device)
    return backbone, inputs, labels


def time_heads(device: torch.device, dry: bool, repeats: int) -> dict[str, Any]:
    """Section 4: Table 3 (time per step and peak memory per head), halving the batch on OOM."""
    from guided_nc.methods import TIMED_METHODS
    from guided_nc.timing import measure_heads

    results = {}
    for setting, (name, side, _, num_classes, batch) in _settings(dry).items():
        while True:
            try:
                backbone, inputs, labels = _batch(name, side, num_classes, batch, device)
                heads = measure_heads(
                    backbone, num_classes, inputs, labels, TIMED_METHODS, repeats, warmup=1
                )
                results[setting] = {"batch_size": batch, "heads": heads}
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch <= 16:
                    results[setting] = {"error": "out of memory at batch 16"}
                    break
                batch //= 2
    return results


def count_syncs(device: torch.device, dry: bool) -> dict[str, Any]:
    """Section 5: host synchronisations in one training step of each head (after warm-up)."""
    if device.type != "cuda":
        return {"skipped": "set_sync_debug_mode counts CUDA synchronisations only"}
    from guided_nc.heads import build_head
    from guided_nc.methods import TIMED_METHODS
    from guided_nc.models import Classifier
    from guided_nc.optim import build_optimizer
    from guided_nc.timing import training_step

    name, side, _, num_classes, batch = next(iter(_settings(dry).values()))
    backbone, inputs, labels = _batch(name, side, num_classes, min(batch, 64), device)
    counts = {}
    for method in TIMED_METHODS:
        head = build_head(method, backbone.num_features, num_classes)
        model = Classifier(backbone, head).to(device)
        optimizer = build_optimizer("agd", list(model.parameters()))
        for _ in range(2):  # warm-up: one-off allocations and lazy initialisations
            training_step(model, optimizer, inputs, labels)
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                training_step(model, optimizer, inputs, labels)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        messages = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        counts[method] = {"syncs": len(messages), "first": messages[:3]}
    return counts


def torchrun_smoke(device: torch.device, out: Path) -> dict[str, Any]:
    """Section 6: ``torchrun --nproc_per_node=1 -m guided_nc.cli train`` on the device."""
    folder = out / "torchrun-train"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        "-m",
        "guided_nc.cli",
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--width",
        "32",
        "--depth",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "100",
        "--device",
        device.type,
        "--no-progress",
        "--out",
        str(folder),
        "--resume-or-start",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=os.environ)
    result = {"returncode": done.returncode, "seconds": time.perf_counter() - started}
    summary = folder / "summary.json"
    if done.returncode == 0 and summary.exists():
        data = json.loads(summary.read_text())
        result.update(
            world_size=data["world_size"], backend=data.get("backend"), device=data["device"]
        )
    else:
        result["stderr_tail"] = done.stderr[-1500:]
    result["ok"] = done.returncode == 0 and result.get("world_size") == 1
    return result


SECTIONS = ("routes", "heads", "drivers", "table3", "syncs", "torchrun")


def run(args: argparse.Namespace) -> int:
    """Run every section (or those not in ``--skip``); write JSON and markdown; 0 if all pass."""
    from guided_nc.runfiles import atomic_write_json, check_kind, environment_info, mark_kind

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but CUDA is not available; use --device cpu")
    skipped = {item for item in args.skip.split(",") if item}
    unknown = skipped - set(SECTIONS)
    if unknown:
        raise ValueError(f"--skip {sorted(unknown)}: sections are {','.join(SECTIONS)}")
    report: dict[str, Any] = {
        "environment": {**environment_info(), "device": str(device)},
        "dry_run": args.dry_run,
    }
    check_kind(args.out, "bench")
    mark_kind(args.out, "bench")  # the folder's first write
    started = time.perf_counter()
    steps = {
        "routes": lambda: check_routes(device, args.dry_run),
        "heads": lambda: check_heads(device),
        "drivers": lambda: time_drivers(device, args.dry_run, args.repeats),
        "table3": lambda: time_heads(device, args.dry_run, args.repeats),
        "syncs": lambda: count_syncs(device, args.dry_run),
        "torchrun": lambda: torchrun_smoke(device, args.out),
    }
    for section in SECTIONS:
        if section in skipped:
            continue
        section_started = time.perf_counter()
        print(f"device check: {section} ...", file=sys.stderr, flush=True)
        report[section] = steps[section]()
        report.setdefault("seconds", {})[section] = time.perf_counter() - section_started
    report["total_seconds"] = time.perf_counter() - started
    atomic_write_json(args.out / "device_check.json", report)
    return 0 if passed(report) else 1


def passed(report: dict[str, Any]) -> bool:
    """Whether every correctness row and the torchrun smoke test passed."""
    rows = report.get("routes", []) + report.get("heads", [])
    return all(row["ok"] for row in rows) and report.get("torchrun", {}).get("ok", True)
