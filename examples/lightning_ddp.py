"""guided-nc inside PyTorch Lightning: an ETF head, AGD and the NC metric under DDP on the CPU.

    python examples/lightning_ddp.py --devices 2 --max-epochs 2

Needs ``pip install "guided-nc[lightning,data]"`` (Lightning and scikit-learn's bundled digits:
nothing is downloaded). What it shows:

* the head comes from the one builder (:func:`guided_nc.build_head`) on a small MLP backbone,
  inside the LightningModule, so DDP synchronises its gradients and the heads all-reduce their
  statistics: every rank holds the same head (the script checks it and prints the result);
* :class:`guided_nc.StratifiedBatchSampler` built in ``train_dataloader()``: under Lightning's
  default DDP (``use_distributed_sampler=True``) Lightning re-creates it with its
  DistributedSampler, and it takes the rank from that sampler;
* the NC metric logs with Lightning's usual calls: ``self.log("val/nc1", metric)`` for a scalar
  metric (``scalar="nc1"``, ``classifier=head``), and ``self.log_dict(metric.compute(...))`` for
  every key at the end of the epoch;
* skipping a non-finite batch without ending ``fit``: the head and AGD run with
  ``validation="deferred"`` (a bad batch changes no state, the step is skipped) and a callback
  clears the counters with :func:`guided_nc.timing.skip_rejected` (``--nan-step N`` poisons the
  inputs of global step N to show it).

``--out FILE`` writes a JSON summary (rank 0): every rank's head weight, the logged metrics and
the skipped batches; the test suite runs the script and reads it (tests/test_lightning.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from guided_nc import AGD, NeuralCollapseMetrics, StratifiedBatchSampler, build_head
from guided_nc.timing import skip_rejected


def digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (1797 samples, 10 classes): 1440 train, 357 val."""
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    inputs, labels = inputs[order], labels[order]
    return TensorDataset(inputs[:1440], labels[:1440]), TensorDataset(inputs[1440:], labels[1440:])


class GuidedNC(L.LightningModule):
    """An MLP backbone (no biases: AGD has no rule for 1-D tensors), an implicit ETF head, AGD,
    and the NC metric of the validation split."""

    def __init__(self, method: str = "implicit", width: int = 32, nan_step: int = -1) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(64, 128, bias=False), nn.ReLU(), nn.Linear(128, width, bias=False)
        )
        # validation="deferred": a non-finite batch is counted, never raised mid-step.
        self.head = build_head(method, width, 10, temperature=5.0, validation="deferred")
        self.val_nc1 = NeuralCollapseMetrics(10, width, classifier=self.head, scalar="nc1")
        self.val_nc = NeuralCollapseMetrics(10, width)
        self.nan_step = nan_step
        self.skipped: list[str] = []

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(inputs), labels)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        if self.global_step == self.nan_step:  # a poisoned batch (on every rank)
            inputs = torch.full_like(inputs, math.nan)
        loss = F.cross_entropy(self(inputs, labels), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        features = self.backbone(inputs)
        logits = self.head(features)
        normalized = self.head.normalize(features)
        self.val_nc1.update(normalized, labels, logits)
        self.val_nc.update(normalized, labels, logits)
        self.log("val_nc1", self.val_nc1)  # a torchmetrics scalar: computed and reset per epoch

    def on_validation_epoch_end(self):
        # compute() is collective and returns the same numbers on every rank (sync_dist then
        # averages equal values: it changes nothing, and keeps Lightning's DDP advice quiet).
        results = self.val_nc.compute(self.head.weight, self.head.bias)
        self.log_dict({f"val/{key}": value for key, value in results.items()}, sync_dist=True)
        self.val_nc.reset()

    def configure_optimizers(self):
        return AGD(self.parameters(), gain=10.0, validation="deferred")


class SkipNonFinite(L.Callback):
    """Go on past a non-finite batch: clear the deferred rejections after every step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        messages = skip_rejected(pl_module, trainer.optimizers[0])
        if messages:  # the same on every rank (the heads and DDP all-reduce the flags)
            pl_module.skipped.append(
                {"epoch": trainer.current_epoch, "batch": batch_idx, "messages": messages}
            )


class Digits(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train, self.val = digits()

    def train_dataloader(self):
        # Built here, Lightning can re-create it with its DistributedSampler (DDP): the batches
        # stay the same global stratified batches, each rank takes its slice.
        labels = self.train.tensors[1]
        sampler = StratifiedBatchSampler(labels, self.batch_size, seed=0)
        return DataLoader(self.train, batch_sampler=sampler)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=64)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=120, help="global batch")
    parser.add_argument("--method", default="implicit")
    parser.add_argument("--nan-step", type=int, default=-1, help="poison this global step")
    parser.add_argument("--out", default="", help="JSON summary (rank 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    L.seed_everything(0, verbose=False)
    model = GuidedNC(args.method, nan_step=args.nan_step)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.max_epochs,
        callbacks=[SkipNonFinite()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # The sampler's batch size is the global batch: each of the devices takes batch / devices.
    trainer.fit(model, datamodule=Digits(args.batch_size))
    weights = trainer.strategy.all_gather(model.head.weight.detach())  # (devices, K, d)
    weights = weights.reshape(-1, *model.head.weight.shape)
    sampler = trainer.train_dataloader.batch_sampler  # what Lightning made of ours
    shard = torch.tensor([sampler.num_replicas, sampler.rank, len(next(iter(sampler)))])
    shards = trainer.strategy.all_gather(shard).reshape(-1, 3).tolist()
    summary = {
        "world_size": trainer.world_size,
        "sampler": type(sampler).__name__,
        "sampler_shards": shards,  # [num_replicas, rank, indices per step] of every rank
        "ranks_agree": all(torch.equal(w, weights[0]) for w in weights),
        "head_weight_sums": [float(w.double().sum()) for w in weights],
        "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()},
        "skipped": model.skipped,
        "global_step": trainer.global_step,
    }
    if trainer.is_global_zero:
        print(json.dumps({k: summary[k] for k in ("world_size", "ranks_agree", "skipped")}))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
