"""The heads' training step under ``torch.compile(fullgraph=True)`` and without host reads.

* Compiled (inductor, CPU) against eager, in training and evaluation: logits, the updated
  buffers and the gradients agree to float64 rounding, for all three heads.
* The deferred step with the Newton-Schulz route (the accelerator default, forced here on the
  CPU) runs with every host read and every op that synchronises on CUDA made to raise: no
  ``.item()``/``bool()``/``.tolist()``, no ``eigh``/``svd``/``bincount``/``nonzero``.

No GPU is needed: the CUDA-path logic is the same code, selected by ``validation="deferred"``
and ``solver="newton-schulz"`` (what ``"auto"`` resolves to on an accelerator).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from guided_nc.heads import ImplicitETFHead, build_head
from guided_nc.optim import AGD

DIM, NUM_CLASSES, BATCH = 6, 3, 9


def _batches(generator, steps=3):
    batches = []
    for step in range(steps):
        features = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
        labels = torch.arange(BATCH) % NUM_CLASSES
        if step == 1:
            labels = torch.arange(BATCH) % (NUM_CLASSES - 1)  # a class missing from a batch
        batches.append((features, labels))
    return batches


def _state(module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_compiled_head_matches_eager_in_training_and_eval(method):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_head(method, DIM, NUM_CLASSES, dtype=torch.float64)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)  # raises on any graph break
    generator = torch.Generator().manual_seed(1)
    for features, labels in _batches(generator):
        upstream = torch.randn(BATCH, NUM_CLASSES, generator=generator, dtype=torch.float64)
        outputs = []
        for module in (eager, compiled):
            x = features.clone().requires_grad_(True)
            logits = module(x, labels)
            (logits * upstream).sum().backward()
            outputs.append((logits.detach(), x.grad))
        (eager_logits, eager_grad), (compiled_logits, compiled_grad) = outputs
        torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-12, rtol=1e-10)
        assert eager_grad.abs().max() > 1e-3  # a real gradient, through every path
        for key, value in _state(eager).items():
            # Inductor fuses and reorders float64 reductions: agreement to rounding, not bits.
            other = twin.state_dict()[key]
            if value.is_floating_point():
                torch.testing.assert_close(other, value, atol=1e-12, rtol=1e-10)
            else:
                assert torch.equal(other, value), key
        for p_eager, p_twin in zip(eager.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p_twin.grad, p_eager.grad, atol=1e-12, rtol=1e-10)
    # A NaN batch: the compiled step is the deferred one (no raise, state unchanged, counted);
    # eager on the CPU is strict and raises.
    bad = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    bad[0, 0] = float("nan")
    labels = torch.arange(BATCH) % NUM_CLASSES
    before = _state(twin)
    compiled(bad, labels)
    for key, value in before.items():
        assert torch.equal(twin.state_dict()[key], value), key
    assert twin.rejected_batches.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="features contain NaN or Inf"):
        eager(bad, labels)
    with pytest.raises(ValueError, match=r"rejected 1 batch\(es\)"):
        twin.eval()  # the report surfaces at the switch
    eager.eval()
    evaluation = torch.randn(4, DIM, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(compiled(evaluation), eager(evaluation), atol=1e-12, rtol=1e-12)


class _NoHostReads:
    """Make every host read and every op that synchronises on CUDA raise, while active."""

    TENSOR_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
    FUNCTIONS = (
        (torch.linalg, "eigh"),
        (torch.linalg, "svd"),
        (torch.linalg, "eigvalsh"),
        (torch, "bincount"),
        (torch, "nonzero"),
        (torch, "unique"),
    )

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        def forbidden(name):
            def raising(*args, **kwargs):
                raise AssertionError(f"{name} called in the sync-free step")

            return raising

        for name in self.TENSOR_METHODS:
            self.monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
        for owner, name in self.FUNCTIONS:
            self.monkeypatch.setattr(owner, name, forbidden(f"{owner.__name__}.{name}"))
        self.monkeypatch.setattr(torch.Tensor, "nonzero", forbidden("Tensor.nonzero"))
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deferred_newton_schulz_step_makes_no_host_read(monkeypatch, dtype):
    generator = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(BATCH, DIM, generator=generator, dtype=dtype), torch.arange(BATCH) % 3)
        for _ in range(4)
    ]
    batches[2][0][1, 1] = float("nan")  # one rejected batch along the way
    torch.manual_seed(0)
    backbone = nn.Linear(DIM, DIM, bias=False, dtype=dtype)
    heads = {
        "standard": build_head("standard", DIM, 3, validation="deferred", dtype=dtype),
        "fixed": build_head("fixed", DIM, 3, validation="deferred", dtype=dtype),
        "implicit": ImplicitETFHead(
            DIM, 3, solver="newton-schulz", validation="deferred", dtype=dtype
        ),
    }
    parameters = list(backbone.parameters()) + list(heads["standard"].parameters())
    optimizer = AGD(parameters, validation="deferred")
    snapshots = []
    with _NoHostReads(monkeypatch):
        for features, labels in batches:
            optimizer.zero_grad()
            hidden = backbone(features)
            loss = sum(
                nn.functional.cross_entropy(head(hidden, labels), labels) for head in heads.values()
            )
            loss.backward()
            optimizer.step()
            snapshots.append([p.detach().clone() for p in parameters])
    # Now read: one rejected batch per head, one refused optimiser step, nothing else.
    for head in heads.values():
        assert head.rejected_batches.tolist() == [1, 0, 0]
    assert int(heads["implicit"].num_steps) == 3 and int(heads["fixed"].num_steps) == 3
    for before, after in zip(snapshots[1], snapshots[2], strict=True):
        assert torch.equal(before, after)  # the NaN step moved no weight
    for before, after in zip(snapshots[2], snapshots[3], strict=True):
        assert not torch.equal(before, after)  # the next clean step did
    frame = heads["implicit"].frame.double()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-8  # stored_tolerance of the dtype
    assert (frame.T @ frame - torch.eye(3, dtype=torch.float64)).abs().max() < tolerance
    with pytest.raises(ValueError, match="non-finite features"):
        heads["implicit"].check()
    with pytest.raises(ValueError, match=r"refused 1 step"):
        optimizer.check()


def test_deferred_newton_schulz_head_equals_strict_gram_head(monkeypatch):
    """Same batches, no optimiser: the sync-free step gives the Gram route's state and output."""
    generator = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(12, 8, generator=generator, dtype=torch.float64), torch.arange(12) % 4)
        for _ in range(4)
    ]
    sync_free = ImplicitETFHead(
        8, 4, solver="newton-schulz", validation="deferred", dtype=torch.float64
    )
    gram = ImplicitETFHead(8, 4, solver="gram", validation="strict", dtype=torch.float64)
    for features, labels in batches:
        upstream = torch.randn(12, 4, generator=generator, dtype=torch.float64)
        grads = []
        for head, guard in ((sync_free, True), (gram, False)):
            x = features.clone().requires_grad_(True)
            if guard:
                with _NoHostReads(monkeypatch):
                    logits = head(x, labels)
                    (logits * upstream).sum().backward()
            else:
                logits = head(x, labels)
                (logits * upstream).sum().backward()
            grads.append((logits.detach(), x.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-10, rtol=1e-9)
    for key, value in gram.state_dict().items():
        other = sync_free.state_dict()[key]
        if value.is_floating_point():
            np.testing.assert_allclose(other.numpy(), value.numpy(), atol=1e-12)
        else:
            assert torch.equal(other, value)
