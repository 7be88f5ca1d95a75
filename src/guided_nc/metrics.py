"""Neural-collapse metrics: a thin torchmetrics adapter and the two-pass route, over one
statistics module (:mod:`guided_nc.nc_statistics`).

Every measure the paper plots (method.md section 6; definitions, sources and differences from the
authors' code in ``docs/metrics.md``), computed from a whole split:

* :class:`NeuralCollapseMetrics` - a ``torchmetrics.Metric``: ``update(features, labels, logits)``
  accumulates float64 sufficient statistics whose size does not depend on N (class sums K x d,
  counts, one d x d second moment, correct counts) and keeps up to ``max_kept_samples``
  features per process for the per-sample measures (NCC mismatch, cosine margins, which need the
  *final* class means); ``compute(weight, bias)`` turns the states into metrics with
  :mod:`guided_nc.nc_statistics` (:func:`~guided_nc.nc_statistics.statistics_from_sums`,
  :func:`~guided_nc.nc_statistics.global_metrics`, and the one per-sample route
  :func:`~guided_nc.nc_statistics.per_sample_metrics`). What the adapter itself adds is what
  torchmetrics needs: the states, the sync (:meth:`~NeuralCollapseMetrics._sync_dist`), float64
  under a parent's casts, and forward/merge/load semantics. ``classifier=head, scalar="nc1"``
  makes ``compute()`` a scalar for Lightning's ``self.log(name, metric)``.
* :func:`collect_metrics` - two passes over a loader (pass 1: the statistics; pass 2: NCC mismatch
  and margins against the final means, through the same per-sample route), memory independent of
  N apart from one float64 margin per sample.
* The pure functions, one per formula, are re-exported from :mod:`guided_nc.nc_statistics`
  (:func:`nc1_from_statistics`, :func:`etf_gram_deviation`, :func:`coefficient_of_variation`,
  :func:`bias_collapse`, :func:`nearest_class_centre`, :func:`cosine_margins`,
  :func:`ce_lower_bound`).

Under ``torch.distributed`` each process updates with its shard; torchmetrics' sync (run by
:meth:`~NeuralCollapseMetrics.compute`) is :meth:`~NeuralCollapseMetrics._sync_dist`, which
converts every process's statistics to one common shift and sums them through
:func:`guided_nc.distributed.all_reduce_sum` (torchmetrics' own all-gather is never called);
``compute`` then measures the per-sample quantities of its own samples against the global means,
and sums/gathers those, so every rank returns identical numbers. ``compute`` is collective: call
it on every rank, with the same ``weight``/``bias``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError
from tqdm import tqdm

from guided_nc import distributed
from guided_nc.nc_statistics import (
    _NAN,
    GLOBAL_MEANS,
    MARGIN_QUANTILES,
    METRIC_KEYS,
    STATISTICS_DTYPE,
    Statistics,
    bias_collapse,
    ce_lower_bound,
    check_batch,
    check_classifier,
    check_global_mean,
    coefficient_of_variation,
    cosine_margins,
    etf_gram_deviation,
    global_metrics,
    nan_per_sample,
    nc1_from_statistics,
    nearest_class_centre,
    ordered_metrics,
    per_sample_metrics,
    shifted_batch,
    statistics_from_sums,
    sum_over_processes,
)

__all__ = [
    "GLOBAL_MEANS",
    "MARGIN_QUANTILES",
    "METRIC_KEYS",
    "NeuralCollapseMetrics",
    "bias_collapse",
    "ce_lower_bound",
    "coefficient_of_variation",
    "collect_metrics",
    "cosine_margins",
    "etf_gram_deviation",
    "nc1_from_statistics",
    "nearest_class_centre",
]

# --- the stateful metric -----------------------------------------------------------------------

#: Scalar float64 states, in their order in the flat all-reduce buffer of the sync.
_SCALAR_STATES: tuple[str, ...] = (
    "correct_top1",
    "correct_top5",
    "samples_with_logits",
    "dropped_samples",
    "restored_samples",
)

#: List states: what the per-sample measures need, per kept batch (never synced, not in state_dict).
_KEPT_STATES: tuple[str, ...] = ("kept_features", "kept_labels", "kept_predictions")


def _distributed_available() -> bool:
    """torchmetrics' ``distributed_available_fn``: asks :mod:`guided_nc.distributed` (late-bound,
    so tests can monkeypatch ``guided_nc.distributed.is_distributed``)."""
    return distributed.is_distributed()


def _reduced_only_by_sync_dist(stacked: torch.Tensor) -> torch.Tensor:
    """``dist_reduce_fx`` of the states that no state-by-state reduction may touch.

    The class shifts differ between processes (and between a metric and a batch), and the kept
    features stay on their process; :meth:`NeuralCollapseMetrics._sync_dist` converts every
    process to a common shift before summing. torchmetrics reduces state by state only in
    ``_reduce_states`` (``merge_state`` and its own ``forward``) and in its own ``_sync_dist``, all
    three of which this metric overrides, so reaching this function is a bug.
    """
    raise RuntimeError(
        "a NeuralCollapseMetrics state was reduced on its own (torchmetrics' state-by-state "
        "reduction); its class shifts and kept features need NeuralCollapseMetrics._sync_dist. "
        "This is a bug in guided_nc: please report it with your torchmetrics version"
    )


def _missing_features_message(dropped: float, restored: float, cap: int | None) -> str:
    """Why the per-sample measures are NaN, and what to do (the warning of ``compute``)."""
    causes = []
    if restored:
        causes.append(
            f"{int(restored)} samples were restored from a state_dict without their features "
            "(a state_dict holds the statistics, not the features)"
        )
    if dropped:
        causes.append(
            f"more samples than max_kept_samples={cap} per process were seen, so the kept "
            f"features of {int(dropped)} samples were dropped"
        )
    return (
        "the per-sample measures (ncc_mismatch, margin_*) are NaN: "
        + "; ".join(causes)
        + ". Use guided_nc.metrics.collect_metrics (two passes over the loader)"
        + (
            ", or reset() and update with every batch again."
            if restored
            else ", or raise max_kept_samples."
        )
    )


class NeuralCollapseMetrics(Metric):
    """Streaming neural-collapse metrics of a split, as a ``torchmetrics.Metric`` (method.md
    section 6, ``docs/metrics.md``).

    Call :meth:`update` per batch with the head's normalised features ``h`` (the caller decides
    which features), the labels and optionally the network's logits, then :meth:`compute` with the
    classifier, and :meth:`reset` to start again. Being a torchmetrics ``Metric``, it also works
    as ``metric(h, labels, logits)`` (:meth:`forward`: accumulate, and return the batch's own
    metrics), inside a ``torchmetrics.MetricCollection`` and as a child module of a model (moved
    between devices with it; state_dict round-trips).

    States (torchmetrics ``add_state``), float64 whatever the input dtype; a parent's
    ``.half()``/``.float()``/``.bfloat16()``/``.to(dtype)`` and :meth:`set_dtype` leave them
    float64 (only device moves apply):

    * ``class_counts`` (K,), ``class_shifts`` (K, d), ``shifted_class_sums`` (K, d) and
      ``shifted_second_moment`` (d, d) = ``sum_i (h_i - s_{y_i})(h_i - s_{y_i})^T``, where the
      shift ``s_k`` is the mean of class k in the first batch that contained it. Shifting by a
      class-mean estimate keeps ``Sigma_W = (1/N)[sum (h - s)(h - s)^T - sum_k T_k T_k^T / n_k]``
      free of the cancellation that ``sum h h^T - sum n_k mu_k mu_k^T`` suffers near collapse
      (both terms ~ tau^2, their difference ~ the tiny within-class spread). The shifts differ
      between processes, so these are not summed as they are: :meth:`_sync_dist` first converts
      every process to one common shift (the global class means), then sums
      (``dist_reduce_fx="sum"``); ``class_shifts`` becomes that common shift.
    * ``correct_top1``, ``correct_top5``, ``samples_with_logits``, ``dropped_samples`` (scalars,
      summed) and ``restored_samples`` (summed, not in ``state_dict``).
    * ``kept_features``, ``kept_labels``, ``kept_predictions`` (lists of per-batch tensors, never
      synced, not in ``state_dict``).

    The statistics' size does not depend on N. Per-sample measures (``ncc_mismatch``,
    ``margin_*``) need the final class means, so the features (in their input dtype), labels and
    logit predictions of up to ``max_kept_samples`` samples per process are also kept. Past the
    cap they are dropped, a warning is issued, and those keys are NaN: use
    :func:`collect_metrics` (two passes) for large splits. ``max_kept_samples=0`` turns the
    per-sample measures off without a warning. After ``load_state_dict`` the loaded samples have
    no kept features either: those keys are NaN, with a warning that says so.

    Under ``torch.distributed``, :meth:`compute` (and torchmetrics' ``sync``/``sync_context``)
    syncs through :meth:`_sync_dist`, which converts every process's statistics to a common shift
    and sums them with :func:`guided_nc.distributed.all_reduce_sum` (torchmetrics' own all-gather
    is never used); the per-sample measures are then measured on each process's own kept samples
    against the global means and summed/gathered, so every rank returns identical numbers, equal to
    one process given all the data. ``compute`` is collective: call it on every rank, with the same
    ``weight``/``bias``.

    Args:
        num_classes: K >= 2.
        dim: d >= 1, the feature width.
        max_kept_samples: cap on kept samples per process (``None``: no cap). The default, 100000,
            holds CIFAR's training set (100000 x 512 float32 features = 205 MB).
        device: where the states live (features are moved there); ``metric.to(device)`` also works.
        global_mean: mu_G, which centres the class means (Hbar, hence nc1, nc2_h, nc3, cv_h,
            etf_distance, bias_collapse and the margins): ``"weighted"`` (default: the mean of
            all samples) or ``"unweighted"`` (the mean of the class means, to match
            rhubarbwu/neural-collapse); the same for balanced classes (:data:`GLOBAL_MEANS`).
        classifier: the head (a module with ``weight`` (K, d) and ``bias`` (K,) or None) whose
            current classifier :meth:`compute` uses when called without ``weight``/``bias``
            (held by reference, not as a child module).
        scalar: a key of :data:`METRIC_KEYS`: :meth:`compute` returns that key alone as a 0-d
            float64 tensor (for Lightning's ``self.log(name, metric)``); None (default): the
            dict of every key (``self.log_dict(metric.compute(...))``).
        persistent: keep the statistics in ``state_dict`` (and so in every checkpoint of a model
            that holds the metric; d x d + 2 K x d float64, 65 MB at K = 1000, d = 2048). Off by
            default, as torchmetrics' states; the kept per-sample features are never saved.

    Shape:
        update / forward: features (B, d) float, labels (B,) int in [0, K), logits (B, K) float or
        None.
        compute: weight (K, d) float or None, bias (K,) float or None -> ``dict[str, float]``.
    """

    is_differentiable = False
    higher_is_better = None
    #: ``update`` reads the state (a class's shift is set by the first batch that contains it).
    full_state_update = True

    def __init__(
        self,
        num_classes: int,
        dim: int,
        max_kept_samples: int | None = 100_000,
        device: torch.device | str | None = None,
        *,
        global_mean: str = "weighted",
        persistent: bool = False,
        classifier: torch.nn.Module | None = None,
        scalar: str | None = None,
    ) -> None:
        check_global_mean(global_mean)
        if scalar is not None and scalar not in METRIC_KEYS:
            raise ValueError(
                f"scalar={scalar!r} is not a metric key; use one of {list(METRIC_KEYS)} (or None "
                "for the dict of every key)"
            )
        if classifier is not None and not hasattr(classifier, "weight"):
            raise TypeError(
                f"classifier={type(classifier).__name__} has no weight; pass the head (a module "
                "with weight (K, d) and bias (K,) or None)"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
        if scalar == "acc5" and num_classes < 5:
            raise ValueError(f"scalar='acc5' needs num_classes >= 5, got {num_classes}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive integer (the feature width)")
        if max_kept_samples is not None and (
            isinstance(max_kept_samples, bool)
            or not isinstance(max_kept_samples, int)
            or max_kept_samples < 0
        ):
            raise ValueError(
                f"max_kept_samples={max_kept_samples!r} must be an integer >= 0 or None (no cap)"
            )
        # compute(weight, bias) depends on its arguments: torchmetrics' result cache would return
        # the first call's numbers for another classifier, so it is off.
        super().__init__(compute_with_cache=False, distributed_available_fn=_distributed_available)
        self.num_classes = num_classes
        self.dim = dim
        self.max_kept_samples = max_kept_samples
        self.global_mean = global_mean
        self.scalar = scalar
        # A reference, not a child module: the head's parameters belong to the model.
        self.__dict__["_classifier"] = classifier
        self._dtype = STATISTICS_DTYPE

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=STATISTICS_DTYPE)

        persistent = bool(persistent)
        self.add_state(
            "class_counts", zeros(num_classes), dist_reduce_fx="sum", persistent=persistent
        )
        self.add_state(
            "class_shifts",
            zeros(num_classes, dim),
            dist_reduce_fx=_reduced_only_by_sync_dist,
            persistent=persistent,
        )
        self.add_state(
            "shifted_class_sums",
            zeros(num_classes, dim),
            dist_reduce_fx="sum",
            persistent=persistent,
        )
        self.add_state(
            "shifted_second_moment", zeros(dim, dim), dist_reduce_fx="sum", persistent=persistent
        )
        for name in _SCALAR_STATES:
            self.add_state(
                name,
                zeros(),
                dist_reduce_fx="sum",
                persistent=persistent and name != "restored_samples",
            )
        for name in _KEPT_STATES:
            self.add_state(name, [], dist_reduce_fx=_reduced_only_by_sync_dist, persistent=False)
        if device is not None:
            self.to(device)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, "
            f"max_kept_samples={self.max_kept_samples}, global_mean={self.global_mean!r}"
            + ("" if self.scalar is None else f", scalar={self.scalar!r}")
        )

    @property
    def num_samples(self) -> int:
        """Samples seen by this process since the last :meth:`reset` (all of them while synced)."""
        return int(self.class_counts.sum().item())

    @property
    def num_kept_samples(self) -> int:
        """Samples whose features this process currently keeps for the per-sample measures."""
        return sum(int(features.shape[0]) for features in self.kept_features)

    def update(
        self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None
    ) -> None:
        """Add one batch. Validates everything first: a rejected batch leaves the state unchanged.

        Sums are float64 (features and logits are converted before any arithmetic). torchmetrics'
        update wrapper runs this without autograd (and inputs are detached).

        Args:
            features: (B, d) floating, finite; the head's normalised features.
            labels: (B,) integer class indices in [0, K).
            logits: (B, K) floating, finite, or None. Either every batch has logits or none does.
        """
        self._check_batch(features, labels, logits)
        if features.shape[0] == 0:
            return
        device = self.class_counts.device
        values = features.detach().to(device=device, dtype=STATISTICS_DTYPE)
        labels = labels.detach().to(device=device, dtype=torch.long)
        batch_counts, shifts, shifted = shifted_batch(
            values, labels, self.class_counts, self.class_shifts
        )
        predictions = None
        if logits is not None:
            logits = logits.detach().to(device)
            predictions = logits.argmax(dim=1)
            top1 = (predictions == labels).sum()
            if self.num_classes >= 5:
                top5 = (logits.topk(5, dim=1).indices == labels.unsqueeze(1)).any(dim=1).sum()
        # Everything validated and computed: mutate.
        if shifts is not self.class_shifts:
            self.class_shifts.copy_(shifts)
        self.shifted_class_sums.index_add_(0, labels, shifted)
        self.shifted_second_moment.addmm_(shifted.T, shifted)
        self.class_counts.add_(batch_counts)
        if logits is not None:
            self.samples_with_logits.add_(labels.numel())
            self.correct_top1.add_(top1)
            if self.num_classes >= 5:
                self.correct_top5.add_(top5)
        self._keep(features, labels, predictions)

    def _keep(
        self, features: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor | None
    ) -> None:
        if self.restored_samples.item() > 0:
            return  # restored samples have no features: the per-sample measures are NaN anyway
        batch = features.shape[0]
        cap = self.max_kept_samples
        kept = self.num_kept_samples
        if self.dropped_samples.item() == 0 and (cap is None or kept + batch <= cap):
            # copy=True: never alias the caller's tensor (the release's CPU aliasing bug, item 25).
            device = self.class_counts.device
            self.kept_features.append(features.detach().to(device=device, copy=True))
            self.kept_labels.append(labels.clone())
            if predictions is not None:
                self.kept_predictions.append(predictions)
            return
        if cap != 0 and self.dropped_samples.item() == 0:
            warnings.warn(
                f"NeuralCollapseMetrics keeps at most max_kept_samples={cap} samples per process "
                f"and has now seen {kept + batch}; the kept features are dropped and "
                "ncc_mismatch and margin_* will be NaN. Use guided_nc.metrics.collect_metrics "
                "(two passes over the loader) or raise max_kept_samples.",
                stacklevel=4,  # _keep < update < torchmetrics' update wrapper < the caller
            )
        self.dropped_samples.add_(kept + batch)
        for name in _KEPT_STATES:
            getattr(self, name).clear()

    def compute(
        self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> dict[str, float] | torch.Tensor:
        """Every metric of the samples seen on all processes (collective under torch.distributed).

        With ``classifier=head`` given to the constructor, ``weight``/``bias`` default to the
        head's current ones; with ``scalar="nc1"`` (any key) the result is that key alone, as a
        0-d float64 tensor, so that Lightning's ``self.log("val_nc1", metric)`` works (it calls
        ``compute()`` with no arguments at the epoch's end, then ``reset()``).

        torchmetrics syncs the states (:meth:`_sync_dist`) before this runs and restores this
        process's own states after; all arithmetic is float64.

        Args:
            weight: the classifier W, (K, d) floating, or None: then ``nc2_w``, ``nc3``, ``cv_w``,
                ``equinorm``, ``bias_collapse`` and ``margin_*`` are NaN, and so is
                ``ncc_mismatch`` unless logits were given to :meth:`update`.
            bias: (K,) floating or None (b = 0 in ``bias_collapse`` and in the predictions).

        Returns:
            ``{key: float}`` with the keys of :data:`METRIC_KEYS` (``acc5`` only when K >= 5).
            ``acc1``/``acc5``/``ncc_mismatch`` are percentages; ``acc*`` are NaN without logits.
            The network's prediction for ``ncc_mismatch`` is the argmax of the logits given to
            :meth:`update`, otherwise of ``W h + b`` (float64).

        Raises:
            RuntimeError: no sample was seen on any process.
            ValueError: a class has no samples; weight or bias of the wrong shape or non-finite.
        """
        classifier = self.__dict__.get("_classifier")
        if weight is None and bias is None and classifier is not None:
            weight, bias = classifier.weight, getattr(classifier, "bias", None)
        try:
            results = self._evaluate(weight, bias, collective=self._is_synced, every_class=True)
            if self.scalar is None:
                return results
            return torch.tensor(results[self.scalar], dtype=STATISTICS_DTYPE)
        except BaseException:
            # torchmetrics' sync_context does not restore the local states when compute raises;
            # without this a bad weight would leave the global states in place for later updates.
            if self._is_synced:
                self.unsync()
            raise

    @torch.no_grad()
    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None
    ) -> dict[str, float]:
        """``metric(h, labels, logits)``: :meth:`update` with the batch, and return its own metrics.

        torchmetrics' forward semantics: the batch is added to the accumulated state, and the
        returned dict covers this batch alone, on this process (no sync, as torchmetrics'
        default ``dist_sync_on_step=False``). There is no classifier, so the classifier keys
        (``nc2_w``, ``nc3``, ``cv_w``, ``equinorm``, ``bias_collapse``, ``margin_*``) are NaN and
        ``ncc_mismatch`` uses the logits. A batch usually lacks some classes: then the keys that
        need every class mean (``nc1``, ``nc2_h``, ``nc3``, ``cv_h``, ``equinorm``,
        ``etf_distance``, ``ncc_mismatch``) are NaN instead of the ``ValueError`` of
        :meth:`compute`. An empty batch gives ``n = 0`` and NaN. Costs a copy of the states, one
        more update and a compute of the batch (float64): for split-level metrics call
        :meth:`update` per batch and :meth:`compute` once.

        Shape: as :meth:`update` -> ``dict[str, float]`` with the keys of :meth:`compute`.
        """
        if self._is_synced:
            raise TorchMetricsUserError(
                "forward() was called while the metric is synced; call unsync() first"
            )
        # Own copies first: in a MetricCollection compute group the states are shared with the
        # other members, whose forward adds this batch too (torchmetrics' own forward also
        # replaces the states rather than updating them in place). Lists: a shallow copy.
        for name, value in self.metric_state.items():
            setattr(self, name, value.clone() if isinstance(value, torch.Tensor) else list(value))
        self.update(features, labels, logits)
        batch = NeuralCollapseMetrics(
            self.num_classes,
            self.dim,
            max_kept_samples=None,
            device=self.device,
            global_mean=self.global_mean,
        )
        batch.update(features, labels, logits)
        if batch.num_samples == 0:
            results = dict.fromkeys(METRIC_KEYS, _NAN)
            results.update(n=0.0, etf_margin=self.num_classes / (self.num_classes - 1))
            result = ordered_metrics(results, self.num_classes)
        else:
            result = batch._evaluate(None, None, collective=False, every_class=False)
        self._forward_cache = result
        return result

    def _evaluate(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        *,
        collective: bool,
        every_class: bool,
    ) -> dict[str, float]:
        """The metrics of the current states; ``collective``: the states are synced, so reduce
        the per-sample measures over processes too; ``every_class``: a class without samples is
        an error (else its keys are NaN)."""
        weight, bias = check_classifier(weight, bias, self.num_classes, self.dim)
        statistics = self._statistics(every_class=every_class)
        results = global_metrics(statistics, self.num_classes, weight, bias)
        if statistics.dropped_samples > 0 or statistics.restored_samples > 0:
            if self.max_kept_samples != 0:
                warnings.warn(
                    _missing_features_message(
                        statistics.dropped_samples,
                        statistics.restored_samples,
                        self.max_kept_samples,
                    ),
                    stacklevel=4,  # _evaluate < compute < torchmetrics' compute wrapper < caller
                )
            results.update(nan_per_sample())
        else:
            predictions = self.kept_predictions or [None] * len(self.kept_features)
            kept = zip(self.kept_features, self.kept_labels, predictions, strict=True)
            results.update(
                per_sample_metrics(
                    kept, self.num_kept_samples, statistics, weight, bias, collective=collective
                )
            )
        return ordered_metrics(results, self.num_classes)

    def _statistics(self, *, every_class: bool = True) -> Statistics:
        """Means and Sigma_W from the current states (:func:`guided_nc.nc_statistics.
        statistics_from_sums`; float64, no communication)."""
        values = torch.stack([getattr(self, name) for name in _SCALAR_STATES]).tolist()
        return statistics_from_sums(
            self.class_counts,
            self.class_shifts,
            self.shifted_class_sums,
            self.shifted_second_moment,
            dict(zip(_SCALAR_STATES, values, strict=True)),
            global_mean=self.global_mean,
            every_class=every_class,
        )

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group=None) -> None:
        """torchmetrics' sync hook (run by ``compute``, ``sync`` and ``sync_context`` when
        :func:`guided_nc.distributed.is_distributed`): replace this process's states by the sums
        over all processes, about one common shift
        (:func:`guided_nc.nc_statistics.sum_over_processes`: two float64 all-reduces through
        :func:`guided_nc.distributed.all_reduce_sum`, the only route to torch.distributed).
        torchmetrics caches the local states first and puts them back on ``unsync``. The kept
        features stay local: the per-sample measures are reduced in :meth:`compute`.
        """
        if process_group is not None:
            raise ValueError(
                f"process_group={process_group!r}: NeuralCollapseMetrics syncs over the default "
                "process group through guided_nc.distributed; pass process_group=None"
            )
        if dist_sync_fn is not None and dist_sync_fn is not gather_all_tensors:
            raise ValueError(
                f"dist_sync_fn={dist_sync_fn!r} is not used by NeuralCollapseMetrics, which sums "
                "its statistics through guided_nc.distributed.all_reduce_sum; pass "
                "dist_sync_fn=None (tests replace guided_nc.distributed.all_reduce_sum instead)"
            )
        scalars = torch.stack([getattr(self, name) for name in _SCALAR_STATES])
        counts, shifts, sums, moment, scalars = sum_over_processes(
            self.class_counts,
            self.class_shifts,
            self.shifted_class_sums,
            self.shifted_second_moment,
            scalars,
        )
        self.class_counts, self.class_shifts = counts, shifts
        self.shifted_class_sums, self.shifted_second_moment = sums, moment
        for name, value in zip(_SCALAR_STATES, scalars.unbind(), strict=True):
            setattr(self, name, value)

    def merge_state(self, incoming_state) -> None:
        """Not supported: the incoming shifts differ and its kept features are not in its state."""
        raise RuntimeError(
            f"merge_state({type(incoming_state).__name__}) is not supported by "
            "NeuralCollapseMetrics: the statistics of two metrics have different class shifts "
            "and the kept features are not part of metric_state. Update one metric with every "
            "batch, or run under torch.distributed, where compute() sums every process exactly"
        )

    def set_dtype(self, dst_type: torch.dtype | str) -> NeuralCollapseMetrics:
        """Changes nothing: every statistic stays float64 (style habit 8); warns unless float64."""
        if dst_type not in (torch.float64, "torch.DoubleTensor"):
            warnings.warn(
                f"set_dtype({dst_type!r}) leaves NeuralCollapseMetrics unchanged: its statistics "
                "stay float64 and kept features keep their input dtype (docs/metrics.md)",
                stacklevel=2,
            )
        return self

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> NeuralCollapseMetrics:
        """Move the states between devices with the module; never change their dtype.

        ``Module.to``/``.cuda()``/``.half()``/``.float()``/``.bfloat16()``/``.type()`` all come
        here. torchmetrics' own ``_apply`` skips its states for ``.half()``/``.float()``/
        ``.double()``/``.bfloat16()``/``.type()`` but converts them for ``.to(dtype)`` (a
        parent's ``model.to(torch.float16)``). Here each state is passed through ``fn``, and when
        that changed its dtype the original is moved to the new device instead: float64
        statistics stay float64, kept features keep their input dtype.
        """
        this = super()._apply(fn, exclude_state=tuple(self._defaults))

        def move(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)

        for name, default in this._defaults.items():
            if isinstance(default, torch.Tensor):
                this._defaults[name] = move(default)
                setattr(this, name, move(getattr(this, name)))
            else:
                values = getattr(this, name)
                values[:] = [move(value) for value in values]  # in place: shared lists stay shared
        this._device = move(torch.zeros((), dtype=STATISTICS_DTYPE, device=this._device)).device
        this._dtype = STATISTICS_DTYPE
        return this

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load the statistics as float64 copies (never aliases of the given tensors).

        Every shape is checked first: a missing or mis-shaped statistic leaves the metric
        unchanged (reported as a missing key or an error, as ``nn.Module`` does). The kept
        features are not in a state_dict, so the loaded samples count as restored without
        features: ``compute`` gives NaN per-sample measures and a warning that says so.
        """
        persistent = [name for name in self._defaults if self._persistent[name]]
        if not persistent:  # persistent=False (the default): nothing of this metric is saved
            super()._load_from_state_dict(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
            return
        loaded: dict[str, torch.Tensor] = {}
        problems: list[str] = []
        for name in persistent:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            expected = tuple(self._defaults[name].shape)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                problems.append(
                    f"{key} must be a floating-point tensor of shape {expected}, got {kind}"
                )
            elif tuple(value.shape) != expected:
                problems.append(
                    f"{key} has shape {tuple(value.shape)} but this metric's is {expected} "
                    f"(num_classes={self.num_classes}, dim={self.dim}); build "
                    "NeuralCollapseMetrics with the num_classes and dim of the saved metric"
                )
            else:
                loaded[name] = value
        error_msgs.extend(problems)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(loaded) != len(persistent):
            return
        for name, value in loaded.items():
            device = getattr(self, name).device
            setattr(self, name, value.detach().to(device, STATISTICS_DTYPE, copy=True))
        for name in _KEPT_STATES:
            getattr(self, name).clear()
        self.restored_samples = self.class_counts.sum()
        if self.restored_samples.item() > 0:
            # A restored state is an update as far as torchmetrics' "compute before update"
            # warning goes.
            self._update_count = max(self._update_count, 1)

    def _check_batch(
        self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None
    ) -> None:
        check_batch(features, labels, logits, self.num_classes, self.dim)
        seen = self.class_counts.sum().item()
        if seen > 0 and (logits is not None) != (self.samples_with_logits.item() > 0):
            had = "with" if self.samples_with_logits.item() > 0 else "without"
            raise ValueError(
                f"logits={'None' if logits is None else 'a tensor'}, but earlier batches came "
                f"{had} logits; pass logits for every batch or for none (or call reset())"
            )


# --- the two-pass route ------------------------------------------------------------


def _features_and_logits(
    feature_fn: Callable, logits_fn: Callable | None, inputs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    output = feature_fn(inputs)
    if isinstance(output, tuple | list):
        if len(output) != 2 or logits_fn is not None:
            raise ValueError(
                "feature_fn returned a sequence: it must be exactly (features, logits), and then "
                "logits_fn must be None"
            )
        return output[0], output[1]
    return output, (None if logits_fn is None else logits_fn(output))


def collect_metrics(
    feature_fn: Callable,
    loader: Iterable,
    num_classes: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    logits_fn: Callable | None = None,
    *,
    progress: bool = True,
    return_margins: bool = False,
    global_mean: str = "weighted",
) -> dict[str, float] | tuple[dict[str, float], np.ndarray]:
    """Neural-collapse metrics of a whole split in two passes, memory independent of N.

    Pass 1 accumulates the float64 sufficient statistics (and accuracy); pass 2 recomputes the
    features and measures NCC mismatch and cosine margins against the *final* class means. Only
    the margins are kept (one float64 per sample, for exact quantiles). Same numbers as
    :meth:`NeuralCollapseMetrics.compute` with every feature kept.

    The loader must yield the same samples with the same features in both passes: evaluation
    transforms (no augmentation), a deterministic ``feature_fn`` (model in eval mode); the order
    may differ. Under torch.distributed every rank passes its own shard and gets the same numbers.

    Args:
        feature_fn: ``inputs -> features`` (B, d) or ``inputs -> (features, logits)``; run under
            ``torch.no_grad``.
        loader: iterable of ``(inputs, labels, ...)`` batches, labels (B,) int in [0, K).
        num_classes: K.
        weight, bias: the classifier, as in :meth:`NeuralCollapseMetrics.compute`.
        logits_fn: ``features -> logits`` (B, K), when ``feature_fn`` returns features only.
        progress: show tqdm bars (rank 0 only; tqdm also hides them when not on a terminal).
        return_margins: also return the per-sample cosine margins (N,) float64 (all ranks'
            samples, in rank order), e.g. for their distribution (paper Fig. 15c).
        global_mean: the convention for mu_G, as in :class:`NeuralCollapseMetrics`.

    Returns:
        the dict of :meth:`NeuralCollapseMetrics.compute` (and the margins, if asked).
    """
    check_global_mean(global_mean)
    show = progress and distributed.is_main_process()

    def batches(description: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        bar = tqdm(loader, desc=description, disable=None if show else True, leave=False)
        for batch in bar:
            inputs, labels = batch[0], batch[1]
            features, logits = _features_and_logits(feature_fn, logits_fn, inputs)
            yield features, labels, logits

    with torch.no_grad():
        metric = None
        for features, labels, logits in batches("NC metrics, pass 1/2 (statistics)"):
            if metric is None:
                dim = features.shape[-1] if isinstance(features, torch.Tensor) else 0
                metric = NeuralCollapseMetrics(
                    num_classes,
                    dim,
                    max_kept_samples=0,
                    device=features.device,
                    global_mean=global_mean,
                )
            metric.update(features, labels, logits)
        if metric is None:
            raise ValueError("loader yielded no batches; pass a loader over a non-empty split")
        weight, bias = check_classifier(weight, bias, num_classes, metric.dim)
        local_samples = metric.num_samples
        # torchmetrics' sync (NeuralCollapseMetrics._sync_dist, through guided_nc.distributed)
        # under torch.distributed; a no-op for one process.
        with metric.sync_context():
            collective = metric._is_synced
            statistics = metric._statistics(every_class=True)
        results = global_metrics(statistics, num_classes, weight, bias)
        second_pass = (
            (features, labels, None if logits is None else logits.argmax(dim=1))
            for features, labels, logits in batches("NC metrics, pass 2/2 (NCC, margins)")
        )
        kept: list = []
        results.update(
            per_sample_metrics(
                second_pass,
                local_samples,
                statistics,
                weight,
                bias,
                collective=collective,
                kept_margins=kept,
            )
        )
    results = ordered_metrics(results, num_classes)
    if return_margins:
        return results, (kept[0] if kept else np.empty(0))
    return results
