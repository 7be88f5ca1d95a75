"""Training configuration: one frozen dataclass whose fields generate the CLI flags.

:class:`TrainConfig` is the single source of truth for a real-network run. The ``train`` and
``compare`` commands build their flags from its fields (:func:`add_config_arguments`), a run
folder stores the resolved configuration as ``config.json`` next to the versions of its
environment (:func:`environment_info`), and :meth:`TrainConfig.from_dict` rebuilds it, rejecting
unknown keys and values of the wrong type.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from guided_nc.catalog import CUSTOM, DATASET_NAMES, LOSSES, MODEL_NAMES, unknown_name
from guided_nc.methods import HEAD_NAMES, METHOD_VARIANTS, METHODS, parse_methods
from guided_nc.runfiles import (
    RunFileError,
    atomic_write_json,
    environment_info,
    read_config,
    unreadable,
)
from guided_nc.runtime import DEVICES
from guided_nc.settings import (
    HeadSettings,
    OptimizerSettings,
    check_head_settings,
    check_number,
    check_optimizer_settings,
    check_type,
    settings_of,
)

__all__ = [
    "POOL_FREE_FIELDS",
    "PRESETS",
    "Preset",
    "TrainConfig",
    "UFMConfig",
    "add_config_arguments",
    "check_number",
    "config_from_namespace",
    "int_at_least",
    "parse_int_list",
    "parse_preset",
]

#: Fields that may differ between an interrupted run and its ``--resume``: they change where and
#: how verbosely a run executes, not the numbers it produces. ``eval_epochs`` is one of them
#: because evaluation runs on a forked RNG (it cannot shift the training's random stream), so
#: which epochs are evaluated changes the rows of ``metrics.csv``, never their values.
RESUME_FREE_FIELDS = frozenset(
    {
        "resume",
        "resume_or_start",
        "progress",
        "threads",
        "download",
        "data_root",
        "out",
        "eval_epochs",
    }
)


#: Fields in which the runs of one comparison may differ and still be pooled into one table:
#: the seed and the method (with its option ``ddn_grad``), and how a run executed. ``epochs`` is
#: pooled too when every run has ``schedule="none"`` (epoch e is then the same in a longer run).
POOL_FREE_FIELDS = RESUME_FREE_FIELDS | {"seed", "method", "ddn_grad", "rotation"}


def parse_int_list(text: str | list | tuple, name: str = "eval_epochs") -> tuple[int, ...]:
    """Parse ``"1,50,200"`` or ``"1-60"`` (ranges included), or a list of ints, into a sorted
    tuple of unique positive ints.

    ``name`` is the option the value came from, for the error message.
    """
    flag = "--" + name.replace("_", "-")
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [item for item in str(text).replace(" ", "").split(",") if item]
    try:
        values = sorted({value for item in items for value in _int_range(item)})
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name}={text!r} is not a comma-separated list of integers; pass e.g. {flag} 1,50,200"
        ) from error
    if any(value < 1 for value in values):
        raise ValueError(f"{name}={text!r} contains an epoch < 1; epochs count from 1")
    return tuple(values)


def _int_range(item: Any) -> range | tuple[int]:
    """``"5"`` -> (5,), ``"1-60"`` -> 1..60; ints pass through."""
    if isinstance(item, str) and "-" in item.lstrip("-"):
        start, stop = item.rsplit("-", 1)
        return range(int(start), int(stop) + 1)
    return (int(item),)


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class TrainConfig(OptimizerSettings, HeadSettings):
    """Everything that determines one real-network training run (paper section 5 protocol).

    Defaults follow the paper where it is explicit (AGD with gain 10, tau = 5, batch 256,
    stratified batches) and the project's method page elsewhere. ``bias=None`` means "automatic":
    no biases and no norm-layer affine parameters with AGD (which has no update rule for 1-D
    tensors, as in the paper), biases elsewhere; an explicit ``bias=True`` with AGD is an error.

    Every field becomes a flag of ``guided-nc train`` (``eval_epochs`` -> ``--eval-epochs``;
    booleans get ``--name/--no-name``). The head's and the optimiser's fields are those of
    :class:`guided_nc.settings.HeadSettings` and :class:`~guided_nc.settings.OptimizerSettings`
    (declared and validated there; :meth:`head_settings` and :meth:`optimizer_settings` return
    them); config.json stays flat.
    """

    dataset: str = field(
        default="fashion-mnist",
        metadata={"choices": DATASET_NAMES, "also": (CUSTOM,), "help": "dataset name"},
    )
    model: str = field(
        default="mlp",
        metadata={"choices": MODEL_NAMES, "also": (CUSTOM,), "help": "backbone name"},
    )
    width: int | None = field(
        default=None, metadata={"help": "MLP width (= d) or CNN first-block channels"}
    )
    depth: int | None = field(default=None, metadata={"help": "MLP hidden layers"})
    batch_norm: bool = field(default=True, metadata={"help": "batch norm in the MLP/CNN"})
    method: str = field(
        default="implicit", metadata={**_choices(*HEAD_NAMES), "help": "classifier head"}
    )
    epochs: int = field(default=10, metadata={"help": "number of training epochs"})
    batch_size: int = field(default=256, metadata={"help": "global batch size (all ranks)"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice in the run"})
    out: str = field(default="runs/train", metadata={"help": "run folder"})
    eval_epochs: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "comma-separated epochs to evaluate (the last is always added; empty: "
            "1, 2, 5, 10, then every 10)"
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue from the run's checkpoint (an error if there is none)"},
    )
    resume_or_start: bool = field(
        default=False,
        metadata={"help": "continue from the checkpoint if there is one, else start a new run"},
    )
    data_root: str | None = field(
        default=None, metadata={"help": "dataset folder (default: $GUIDED_NC_DATA or ./data)"}
    )
    download: bool = field(default=False, metadata={"help": "allow torchvision downloads"})
    augment: bool = field(default=True, metadata={"help": "training-set augmentation"})
    long_tail: str | None = field(
        default=None,
        metadata={"help": "long-tailed training split: 'exp' or 'step' (with --imbalance-factor)"},
    )
    imbalance_factor: float = field(
        default=1.0, metadata={"help": "long tail: smallest / largest class size (< 1)"}
    )
    label_noise: float = field(
        default=0.0, metadata={"help": "fraction of training labels replaced by another class"}
    )
    agd_init: bool = field(
        default=True,
        metadata={"help": "AGD: initialise the backbone orthogonally (the paper's init)"},
    )
    bias: bool | None = field(
        default=None,
        metadata={"help": "biases and norm-layer affine parameters (default: off with AGD)"},
    )
    loss: str = field(
        default="ce",
        metadata={
            **_choices(*LOSSES),
            "help": "training loss: cross-entropy (the paper), MSE to one-hot targets, or "
            "cross-entropy with label smoothing",
        },
    )
    label_smoothing: float = field(
        default=0.1, metadata={"help": "the smoothing of --loss label-smoothing"}
    )
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: leave as is)"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    device: str = field(default="auto", metadata=_choices(*DEVICES))

    def __post_init__(self) -> None:
        check_head_settings(self)
        check_optimizer_settings(self)
        hints = get_type_hints(type(self))
        for item in fields(self):
            check_type(item.name, getattr(self, item.name), hints[item.name])
            choices = item.metadata.get("choices")
            value = getattr(self, item.name)
            if choices is not None and value not in (*choices, *item.metadata.get("also", ())):
                raise ValueError(unknown_name(item.name, value, choices))
        object.__setattr__(self, "eval_epochs", parse_int_list(self.eval_epochs))
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        check_number(
            "imbalance_factor", self.imbalance_factor, minimum=0, maximum=1, exclusive_minimum=True
        )
        check_number("label_noise", self.label_noise, minimum=0, maximum=1, exclusive_maximum=True)
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0 keeps torch's default)")
        if self.bias is None:
            object.__setattr__(self, "bias", self.optimizer != "agd")
        if self.bias and self.optimizer == "agd":
            raise ValueError(
                "bias=True with optimizer='agd': AGD with biases is not defined (AGD has no "
                "update rule for 1-D tensors such as biases and norm-layer affine parameters); "
                "drop --bias (AGD runs without biases), or use --optimizer sgd|adam|adamw"
            )
        if not self.ddn_grad and self.method != "implicit":
            raise ValueError(
                f"ddn_grad=False only applies to method='implicit' (got method={self.method!r}); "
                "drop --no-ddn-grad"
            )
        if self.rotation != "canonical" and self.method != "fixed":
            raise ValueError(
                f"rotation={self.rotation!r} only applies to method='fixed' (got "
                f"method={self.method!r}); drop --rotation"
            )
        if self.loss == "label-smoothing":
            check_number(
                "label_smoothing",
                self.label_smoothing,
                minimum=0,
                maximum=1,
                exclusive_minimum=True,
                exclusive_maximum=True,
            )

    # ------------------------------------------------------------------ conversions
    def head_settings(self) -> HeadSettings:
        """The head's fields as a :class:`~guided_nc.settings.HeadSettings`."""
        return settings_of(HeadSettings, self)

    def optimizer_settings(self) -> OptimizerSettings:
        """The optimiser's fields as an :class:`~guided_nc.settings.OptimizerSettings`."""
        return settings_of(OptimizerSettings, self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["eval_epochs"] = list(self.eval_epochs)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config from a dict; unknown keys -> ValueError, wrong types -> TypeError."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> TrainConfig:
        """Build a config from parsed CLI arguments (absent flags keep their defaults)."""
        return config_from_namespace(cls, namespace)

    def eval_epoch_set(self) -> tuple[int, ...]:
        """Epochs to evaluate: the requested ones within range, plus the last epoch.

        With no ``eval_epochs``: 1, 2, 5, 10, then every 10th epoch, and the last, so that the
        curves have points early (where the heads differ most) and all along.
        """
        requested = set(self.eval_epochs) or {1, 2, 5, *range(10, self.epochs + 1, 10)}
        return tuple(sorted({e for e in requested if e <= self.epochs} | {self.epochs}))

    def extends(self, saved: TrainConfig) -> bool:
        """Whether this config trains ``saved``'s run for more epochs, exactly.

        Only with ``schedule="none"``: the step size then does not depend on the total number
        of steps, so epochs 1..saved.epochs are the same as in a run that was always this long.
        """
        return self.schedule == saved.schedule == "none" and self.epochs > saved.epochs

    def resume_mismatches(self, saved: TrainConfig) -> list[str]:
        """Fields that differ from a saved config in a way that would change the run's numbers.

        Ignores :data:`RESUME_FREE_FIELDS`, and ``epochs`` when :meth:`extends` holds.
        """
        return [
            item.name
            for item in fields(self)
            if item.name not in RESUME_FREE_FIELDS
            and not (item.name == "epochs" and self.extends(saved))
            and getattr(self, item.name) != getattr(saved, item.name)
        ]

    def save(self, path: str | Path) -> None:
        """Write ``{"config": ..., "environment": ...}`` as JSON, atomically."""
        atomic_write_json(path, {"config": self.to_dict(), "environment": environment_info()})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a config written by :meth:`save` (or a plain dict of fields).

        Raises:
            RunFileError: a broken file, or fields that are not a TrainConfig's (names the file).
        """
        try:
            return cls.from_dict(read_config(path))
        except RunFileError:
            raise
        except (TypeError, ValueError) as error:
            raise unreadable(path, f"it is not a train run's config.json ({error})") from error


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_class: type = TrainConfig,
    exclude: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> None:
    """Add one flag per field of a config dataclass (``snake_case`` -> ``--kebab-case``).

    Booleans get ``--name`` / ``--no-name``; tuples of ints take ``1,50,200``. A field's
    metadata may give ``help``, ``choices``, ``metavar`` and ``type`` (an argparse type
    function, for values the annotation alone cannot parse). Fields with ``cli=False`` in their
    metadata, and those in ``exclude``, are left to the caller. ``defaults`` overrides the
    defaults (and the shown defaults).
    """
    hints = get_type_hints(config_class)
    defaults = defaults or {}
    for item in fields(config_class):
        if item.name in exclude or item.metadata.get("cli", True) is False:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = defaults.get(item.name, item.default)
        help_text = item.metadata.get("help", "")
        hint = hints[item.name]
        kwargs: dict[str, Any] = {"dest": item.name, "default": default}
        options = [a for a in get_args(hint) if a is not type(None)] if get_args(hint) else [hint]
        if "type" in item.metadata:
            kwargs["type"] = item.metadata["type"]
        elif get_origin(hint) is tuple:
            kwargs["type"] = parse_int_list
            kwargs["metavar"] = "E1,E2,..."
        elif options == [bool]:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = options[0]
        if "choices" in item.metadata:
            kwargs["choices"] = item.metadata["choices"]
            if "type" not in item.metadata:
                kwargs["type"] = choice_of(item.name, item.metadata["choices"])
        if "metavar" in item.metadata:
            kwargs["metavar"] = item.metadata["metavar"]
        shown = ",".join(default) if isinstance(default, tuple) and default else default
        parser.add_argument(flag, help=f"{help_text} (default: {shown})".strip(), **kwargs)


def config_from_namespace(config_class: type, namespace: argparse.Namespace, **overrides):
    """Build a config from parsed CLI arguments; absent flags keep their defaults."""
    values = {
        item.name: getattr(namespace, item.name)
        for item in fields(config_class)
        if hasattr(namespace, item.name)
    }
    values.update(overrides)
    return config_class(**values)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else an error naming value and bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


def choice_of(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse ``type``: one of ``choices``, else an error that names the closest ones
    (:func:`guided_nc.catalog.unknown_name`); argparse's own check of ``choices`` then passes."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(unknown_name(name, text, choices))
        return text

    return parse


def methods_argument(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated method names (:func:`parse_methods`)."""
    try:
        return parse_methods(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _batch_size_argument(text: str) -> int | None:
    value = int_at_least(0)(text)
    return value or None  # 0 = full batch


# --- unconstrained feature models -----------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A UFM size: K classes, N free features (N/K per class), feature dimension d."""

    name: str
    num_classes: int
    num_samples: int
    num_features: int


#: The paper's configurations (section 4; method.md section 7).
PRESETS = {
    "ufm-10": Preset("ufm-10", 10, 1000, 512),
    "ufm-100": Preset("ufm-100", 100, 5000, 1024),
    "ufm-200": Preset("ufm-200", 200, 5000, 1024),
    "ufm-1000": Preset("ufm-1000", 1000, 10000, 1024),
}


def parse_preset(text: str) -> Preset:
    """A preset by name (``ufm-10``, ``ufm-100``, ``ufm-200``, ``ufm-1000``) or ``K:N:d``.

    The custom form ``K:N:d`` (e.g. ``4:40:8``, named ``ufm-4x40x8``) is for tests and quick
    looks; it needs K >= 2, N >= K and d >= K (the ETF heads need d >= K).
    """
    if text in PRESETS:
        return PRESETS[text]
    parts = text.split(":")
    if len(parts) == 3 and all(part.isdigit() for part in parts):
        num_classes, num_samples, num_features = (int(part) for part in parts)
        if num_classes < 2 or num_samples < num_classes or num_features < num_classes:
            raise ValueError(
                f"preset={text!r} needs K >= 2, N >= K and d >= K (K:N:d); got K={num_classes}, "
                f"N={num_samples}, d={num_features}"
            )
        name = f"ufm-{num_classes}x{num_samples}x{num_features}"
        return Preset(name, num_classes, num_samples, num_features)
    raise ValueError(
        f"preset={text!r} is not known; use one of {sorted(PRESETS)} or 'K:N:d' "
        f"(e.g. '4:40:8' for 4 classes, 40 features of dimension 8)"
    )


@dataclass(frozen=True, kw_only=True)
class UFMConfig(OptimizerSettings, HeadSettings):
    """Everything that determines a UFM experiment on one preset (all methods, all seeds).

    Every field but ``preset`` and ``seeds`` is a flag of ``guided-nc ufm``
    (:func:`add_config_arguments`); the command takes ``--preset`` (several, comma-separated),
    ``--seeds N`` and ``--first-seed S``.

    Attributes:
        preset: the problem size.
        methods: methods to compare (names from :data:`guided_nc.methods.METHOD_VARIANTS`).
        seeds: seeds; seed s fixes the initial features, the standard head's initial W and the
            batch order, identically for every method.
        iterations: optimiser steps per run (paper: 2000).
        batch_size: None = full batch (every step sees all N features, the default); otherwise
            stratified batches of this size (:class:`guided_nc.sampler.StratifiedBatchSampler`).
        eval_interval: NC metrics every this many iterations (and at 0 and the last); loss and
            accuracy are evaluated after every iteration.

    The head's and the optimiser's fields (``temperature``, ``delta``, ``ddn_grad``,
    ``running_mean_momentum``, ``solver``, ..., ``optimizer``, ``gain``, ``lr``, ...) are those
    of :class:`guided_nc.settings.HeadSettings` and :class:`~guided_nc.settings.
    OptimizerSettings`; ``running_mean_momentum=None`` means 1.0 with full batches (the batch is
    the whole data set), 0.1 otherwise; ``schedule`` is ``none`` or ``cosine`` (per step).
    """

    preset: Preset = field(metadata={"cli": False})
    #: OptimizerSettings' field with the UFM's choices (no "step": it has no epochs to step at).
    schedule: str = field(
        default="none",
        metadata={"choices": ("none", "cosine"), "help": "learning-rate schedule, per step"},
    )
    methods: tuple[str, ...] = field(
        default=METHODS,
        metadata={
            "type": methods_argument,
            "help": f"comma-separated subset of {','.join(METHOD_VARIANTS)}",
            "metavar": "M1,M2,...",
        },
    )
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3, 4), metadata={"cli": False})
    iterations: int = field(
        default=2000, metadata={"type": int_at_least(1), "help": "optimiser steps per run"}
    )
    batch_size: int | None = field(
        default=None,
        metadata={
            "type": _batch_size_argument,
            "help": "stratified batches of this size; 0 or None = full batch",
        },
    )
    eval_interval: int = field(
        default=20, metadata={"type": int_at_least(1), "help": "NC metrics every N iterations"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.preset, Preset):
            raise TypeError(f"preset must be a Preset (see parse_preset), got {self.preset!r}")
        if not self.methods:
            raise ValueError("methods is empty; pass at least one of 'standard,fixed,implicit'")
        object.__setattr__(self, "methods", parse_methods(self.methods))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be non-empty and distinct")
        if any(
            isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 for seed in self.seeds
        ):
            raise ValueError(f"seeds={self.seeds} must be integers >= 0")
        for name in ("iterations", "eval_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.batch_size is not None:
            if not isinstance(self.batch_size, int) or self.batch_size < 1:
                raise ValueError(
                    f"batch_size={self.batch_size!r} must be a positive integer or None (full "
                    f"batch)"
                )
            if self.batch_size > self.preset.num_samples:
                raise ValueError(
                    f"batch_size={self.batch_size} exceeds N={self.preset.num_samples}; use "
                    f"batch_size=None (or 0 on the command line) for full batches"
                )
        check_head_settings(self)
        check_optimizer_settings(self)  # schedule: the UFM's narrower choices (field above)

    @property
    def full_batch(self) -> bool:
        """Whether every step uses all N features."""
        return self.batch_size is None or self.batch_size == self.preset.num_samples

    @property
    def resolved_running_mean_momentum(self) -> float:
        """The ETF heads' running-mean momentum actually used."""
        if self.running_mean_momentum is not None:
            return self.running_mean_momentum
        return 1.0 if self.full_batch else 0.1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (preset expanded)."""
        data = dataclasses.asdict(self)
        data["methods"] = list(self.methods)
        data["seeds"] = list(self.seeds)
        data["resolved_running_mean_momentum"] = self.resolved_running_mean_momentum
        return data

    def head_settings(self, method: str | None = None) -> HeadSettings:
        """The head's fields as a :class:`~guided_nc.settings.HeadSettings`, with the resolved
        running-mean momentum (and, given ``method``, that method's own options)."""
        momentum = self.resolved_running_mean_momentum
        settings = settings_of(HeadSettings, self, running_mean_momentum=momentum)
        return settings if method is None else settings.for_method(method)

    def run_dict(self, method: str, seed: int) -> dict[str, Any]:
        """The configuration of one run: everything that changes its metrics.csv.

        The head settings added after version 0.1 (:data:`UFM_V01_ABSENT`) enter only when they
        differ from their defaults, so that the runs 0.1 finished are still recognised.
        """
        data = self.to_dict()
        del data["methods"], data["seeds"]
        defaults = {item.name: item.default for item in fields(HeadSettings)}
        for name in UFM_V01_ABSENT:
            if data[name] == defaults[name]:
                del data[name]
        data.update(method=method, seed=seed)
        return data


#: Head settings a version-0.1 UFM run's config.json does not have.
UFM_V01_ABSENT = (
    "rotation",
    "alpha_floor",
    "bias_gradient",
    "solver",
    "compute_dtype",
    "validation",
)
