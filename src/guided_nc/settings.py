"""The one home of head and optimiser settings: two frozen dataclasses and their checks.

:class:`HeadSettings` holds every option of the heads that is a plain value (tau, delta, the DDN
gradient, the fixed ETF's rotation, the running-mean momentum, the solver, the compute dtype,
the validation mode, ...); :class:`OptimizerSettings` the optimiser's. Both run configurations
(:class:`guided_nc.config.TrainConfig` and :class:`~guided_nc.config.UFMConfig`) inherit these
fields, so each is declared, documented and validated once, each becomes a command-line flag of
``train``, ``compare`` and ``ufm`` (``--solver``, ``--compute-dtype``, ``--validation``, ...),
and the saved ``config.json`` stays flat. :func:`guided_nc.heads.build_head` and
:func:`guided_nc.models.replace_classifier` take a :class:`HeadSettings` (or the same names as
keywords); :meth:`HeadSettings.head_options` is the one place that turns settings into a head's
constructor arguments.

>>> from guided_nc.heads import LearnableHead
>>> HeadSettings(temperature=3.0).head_options(LearnableHead)
{'temperature': 3.0, 'validation': 'auto'}
>>> HeadSettings().for_method("implicit-no-ddn").ddn_grad
False
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

import torch

from guided_nc._checks import (
    VALIDATION_MODES,
    check_compute_dtype,
    check_number,
    check_validation,
)
from guided_nc.etf import SOLVERS, check_solver
from guided_nc.methods import METHOD_VARIANTS
from guided_nc.optim import OPTIMIZERS, SCHEDULES

__all__ = [
    "COMPUTE_DTYPE_NAMES",
    "HeadSettings",
    "OptimizerSettings",
    "check_head_settings",
    "check_number",
    "check_optimizer_settings",
    "check_type",
    "settings_of",
]

#: ``compute_dtype`` by name (the CLI and config.json spell dtypes as strings).
COMPUTE_DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32}


def check_type(name: str, value: Any, hint: Any) -> None:
    """TypeError unless ``value`` matches the annotation (ints accepted for floats, not bools)."""
    origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (tuple, list, str)):
            raise TypeError(f"{name}={value!r} must be a list of ints such as [1, 50, 200]")
        return
    allowed = get_args(hint) if origin is not None else (hint,)
    for option in allowed:
        if option is type(None) and value is None:
            return
        if option is bool and isinstance(value, bool):
            return
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if option is str and isinstance(value, str):
            return
    names = " or ".join("None" if o is type(None) else o.__name__ for o in allowed)
    raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected {names}")


def _check_types(settings: Any, settings_class: type) -> None:
    hints = get_type_hints(settings_class)
    for item in fields(settings_class):
        check_type(item.name, getattr(settings, item.name), hints[item.name])


def _check_choices(settings: Any, names: tuple[str, ...]) -> None:
    for name in names:
        item = next(f for f in fields(settings) if f.name == name)
        value = getattr(settings, name)
        if value not in item.metadata["choices"]:
            raise ValueError(
                f"{name}={value!r} is not one of {list(item.metadata['choices'])}; pick one of "
                "those"
            )


def check_head_settings(settings: Any) -> None:
    """Validate the :class:`HeadSettings` fields of ``settings`` (a HeadSettings or a run
    configuration that inherits them); ``compute_dtype`` may be given as a torch dtype and is
    stored by name."""
    if isinstance(settings.compute_dtype, torch.dtype):
        check_compute_dtype(settings.compute_dtype)
        names = {dtype: name for name, dtype in COMPUTE_DTYPE_NAMES.items()}
        object.__setattr__(settings, "compute_dtype", names[settings.compute_dtype])
    _check_types(settings, HeadSettings)
    _check_choices(settings, ("rotation", "compute_dtype"))
    check_solver(settings.solver)
    check_validation(settings.validation)
    check_number("temperature", settings.temperature, minimum=0, exclusive_minimum=True)
    check_number("delta", settings.delta, minimum=0)
    check_number("alpha_floor", settings.alpha_floor, minimum=0, exclusive_minimum=True)
    check_number(
        "running_mean_momentum",
        settings.running_mean_momentum,
        minimum=0,
        maximum=1,
        exclusive_minimum=True,
        optional=True,
    )


def check_optimizer_settings(settings: Any) -> None:
    """Validate the :class:`OptimizerSettings` fields of ``settings``."""
    _check_types(settings, OptimizerSettings)
    _check_choices(settings, ("optimizer", "schedule"))
    check_number("lr", settings.lr, minimum=0, exclusive_minimum=True, optional=True)
    check_number("gain", settings.gain, minimum=0, exclusive_minimum=True)
    check_number("momentum", settings.momentum, minimum=0, maximum=1, exclusive_maximum=True)
    check_number("weight_decay", settings.weight_decay, minimum=0, optional=True)
    if settings.optimizer == "agd" and settings.weight_decay:
        raise ValueError(
            f"weight_decay={settings.weight_decay} with optimizer='agd': AGD has no weight-decay "
            "rule; drop --weight-decay or use --optimizer sgd|adam|adamw"
        )


@dataclass(frozen=True)
class HeadSettings:
    """The heads' options that are plain values; every field is also a CLI flag.

    A field a head does not have is ignored by that head (``delta`` by the standard and fixed
    heads, ``rotation`` by all but the fixed head, ...). Shapes and dtypes: none, these are
    scalars and names; ``compute_dtype`` is ``"float64"`` or ``"float32"`` (a torch dtype is
    accepted and stored by name).

    Attributes:
        temperature: tau, the norm of the normalised features (paper: 5).
        delta: implicit head: the proximal coefficient.
        ddn_grad: implicit head: back-propagate through the nearest-ETF layer.
        rotation: fixed head: ``"canonical"`` or ``"haar"`` (random, from the run's seed).
        running_mean_momentum: ETF heads: momentum of the running feature mean (evaluation
            bias); None = automatic (0.1; the UFM uses 1 with full batches).
        alpha_floor: implicit head: floor of the class-mean smoothing factor.
        bias_gradient: fixed head: back-propagate through its bias ``-W mu``.
        solver: implicit head: the nearest-ETF route (docs/etf.md).
        compute_dtype: ETF heads: the dtype of their statistics and solves.
        validation: how bad batches are reported: ``"auto"``, ``"strict"`` or ``"deferred"``
            (docs/heads.md).
    """

    temperature: float = field(default=5.0, metadata={"help": "feature norm tau"})
    delta: float = field(default=1e-3, metadata={"help": "implicit head: proximal coefficient"})
    ddn_grad: bool = field(
        default=True,
        metadata={"help": "implicit head: back-propagate through the nearest-ETF layer"},
    )
    rotation: str = field(
        default="canonical",
        metadata={
            "choices": ("canonical", "haar"),
            "help": "fixed head: the simplex ETF's rotation (haar: random, drawn from --seed)",
        },
    )
    running_mean_momentum: float | None = field(
        default=None,
        metadata={
            "help": "ETF heads' running-mean momentum (None: 0.1; the UFM: 1 with full batches)"
        },
    )
    alpha_floor: float = field(
        default=1e-4, metadata={"help": "implicit head: floor of the class-mean smoothing"}
    )
    bias_gradient: bool = field(
        default=True, metadata={"help": "fixed head: back-propagate through its bias -W mu"}
    )
    solver: str = field(
        default="auto",
        metadata={"choices": SOLVERS, "help": "implicit head: nearest-ETF route (docs/etf.md)"},
    )
    compute_dtype: str = field(
        default="float64",
        metadata={
            "choices": tuple(COMPUTE_DTYPE_NAMES),
            "help": "ETF heads: dtype of their statistics and solves",
        },
    )
    validation: str = field(
        default="auto",
        metadata={
            "choices": VALIDATION_MODES,
            "help": "bad batches: strict (raise at once), deferred (count, raise at check()), "
            "auto (strict on the CPU)",
        },
    )

    def __post_init__(self) -> None:
        check_head_settings(self)

    def for_method(self, method: str) -> HeadSettings:
        """These settings with ``method``'s own options applied (``"implicit-no-ddn"`` sets
        ``ddn_grad=False``, ``"fixed-haar"`` ``rotation="haar"``).

        A setting that differs from both its default and the variant's value is an error naming
        the conflict: it would otherwise be overridden silently.
        """
        if method not in METHOD_VARIANTS:
            raise ValueError(f"method={method!r} is not a head; use one of {list(METHOD_VARIANTS)}")
        variant = METHOD_VARIANTS[method]
        defaults = {item.name: item.default for item in fields(HeadSettings)}
        for name, value in variant.options:
            current = getattr(self, name, value)
            if current not in (value, defaults.get(name, value)):
                raise ValueError(
                    f"{name}={current!r} conflicts with method={method!r}, which fixes "
                    f"{name}={value!r}; drop {name}= or use method={variant.head!r}"
                )
        changes = {name: value for name, value in variant.options if hasattr(self, name)}
        return dataclasses.replace(self, **changes) if changes else self

    def head_options(self, head_class: type) -> dict[str, Any]:
        """The constructor keywords of ``head_class`` that these settings give: the settings its
        ``__init__`` accepts, with ``compute_dtype`` as a torch dtype and
        ``running_mean_momentum=None`` left out (the head's default)."""
        accepted = inspect.signature(head_class.__init__).parameters
        options: dict[str, Any] = {}
        for item in fields(HeadSettings):
            value = getattr(self, item.name)
            if item.name not in accepted or (
                item.name == "running_mean_momentum" and value is None
            ):
                continue
            options[item.name] = (
                COMPUTE_DTYPE_NAMES[value] if item.name == "compute_dtype" else value
            )
        return options


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimiser and its schedule; every field is also a CLI flag.

    Attributes:
        optimizer: ``agd`` (the paper), ``sgd``, ``adam`` or ``adamw``.
        gain: AGD's gain (paper: 10).
        lr: learning rate (None: :func:`guided_nc.optim.build_optimizer`'s default per
            optimiser; for AGD a multiplier of the gain).
        momentum: SGD momentum.
        weight_decay: None = the optimiser's default (0 except AdamW 0.01); AGD refuses one.
        schedule: per-step learning-rate schedule, ``none``, ``cosine`` or ``step``.
    """

    optimizer: str = field(default="agd", metadata={"choices": OPTIMIZERS})
    gain: float = field(default=10.0, metadata={"help": "AGD gain (paper: 10)"})
    lr: float | None = field(
        default=None,
        metadata={"help": "learning rate; AGD: multiplier of the gain (default per optimiser)"},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float | None = field(
        default=None, metadata={"help": "weight decay (default per optimiser; AGD has none)"}
    )
    schedule: str = field(
        default="none", metadata={"choices": SCHEDULES, "help": "learning-rate schedule"}
    )

    def __post_init__(self) -> None:
        check_optimizer_settings(self)


def settings_of(settings_class: type, source: Any, **overrides: Any) -> Any:
    """A :class:`HeadSettings` or :class:`OptimizerSettings` from the same-named attributes of
    ``source`` (a run configuration), with ``overrides``."""
    values = {item.name: getattr(source, item.name) for item in fields(settings_class)}
    return settings_class(**{**values, **overrides})
