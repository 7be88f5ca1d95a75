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
import json
import platform
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "add_config_arguments",
    "environment_info",
    "parse_int_list",
]

METHODS = ("standard", "fixed", "implicit")
OPTIMIZERS = ("agd", "sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")

#: Fields that may differ between an interrupted run and its ``--resume``: they change where and
#: how verbosely a run executes, not the numbers it produces. ``eval_epochs`` is one of them
#: because evaluation runs on a forked RNG (it cannot shift the training's random stream), so
#: which epochs are evaluated changes the rows of ``metrics.csv``, never their values.
RESUME_FREE_FIELDS = frozenset(
    {"resume", "progress", "threads", "download", "data_root", "out", "eval_epochs"}
)


def parse_int_list(text: str | list | tuple) -> tuple[int, ...]:
    """Parse ``"1,50,200"`` (or a list of ints) into a sorted tuple of unique positive ints."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [item for item in str(text).replace(" ", "").split(",") if item]
    try:
        values = sorted({int(item) for item in items})
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"eval_epochs={text!r} is not a comma-separated list of integers; "
            "pass e.g. --eval-epochs 1,50,200"
        ) from error
    if any(value < 1 for value in values):
        raise ValueError(f"eval_epochs={text!r} contains an epoch < 1; epochs count from 1")
    return tuple(values)


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one real-network training run (paper section 5 protocol).

    Defaults follow the paper where it is explicit (AGD with gain 10, tau = 5, batch 256,
    stratified batches) and the project's method page elsewhere. ``bias=None`` means "automatic":
    no biases and no norm-layer affine parameters with AGD (which has no update rule for 1-D
    tensors, as in the paper), biases elsewhere; an explicit ``bias=True`` with AGD is an error.

    Every field becomes a flag of ``guided-nc train`` (``eval_epochs`` -> ``--eval-epochs``;
    booleans get ``--name/--no-name``).
    """

    dataset: str = field(default="fashion-mnist", metadata={"help": "dataset name"})
    model: str = field(default="mlp", metadata={"help": "backbone name"})
    width: int | None = field(
        default=None, metadata={"help": "MLP width (= d) or CNN first-block channels"}
    )
    depth: int | None = field(default=None, metadata={"help": "MLP hidden layers"})
    batch_norm: bool = field(default=True, metadata={"help": "batch norm in the MLP/CNN"})
    method: str = field(
        default="standard", metadata={**_choices(*METHODS), "help": "classifier head"}
    )
    ddn_grad: bool = field(
        default=True,
        metadata={"help": "implicit head: back-propagate through the nearest-ETF layer"},
    )
    optimizer: str = field(default="agd", metadata=_choices(*OPTIMIZERS))
    gain: float = field(default=10.0, metadata={"help": "AGD gain (paper: 10)"})
    lr: float | None = field(
        default=None,
        metadata={"help": "learning rate; AGD: multiplier of the gain (default per optimiser)"},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float | None = field(
        default=None,
        metadata={"help": "weight decay (default per optimiser; AGD has none)"},
    )
    schedule: str = field(
        default="none", metadata={**_choices(*SCHEDULES), "help": "learning-rate schedule"}
    )
    epochs: int = field(default=10, metadata={"help": "number of training epochs"})
    batch_size: int = field(default=256, metadata={"help": "global batch size (all ranks)"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice in the run"})
    out: str = field(default="runs/train", metadata={"help": "run folder"})
    eval_epochs: tuple[int, ...] = field(
        default=(),
        metadata={"help": "comma-separated epochs to evaluate (the last is always added)"},
    )
    resume: bool = field(default=False, metadata={"help": "continue from the run's checkpoint"})
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
    bias: bool | None = field(
        default=None,
        metadata={"help": "biases and norm-layer affine parameters (default: off with AGD)"},
    )
    temperature: float = field(default=5.0, metadata={"help": "feature norm tau"})
    delta: float = field(default=1e-3, metadata={"help": "implicit head: proximal coefficient"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: leave as is)"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    device: str = field(default="auto", metadata=_choices(*DEVICES))

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for item in fields(self):
            _check_type(item.name, getattr(self, item.name), hints[item.name])
            choices = item.metadata.get("choices")
            value = getattr(self, item.name)
            if choices is not None and value not in choices:
                raise ValueError(
                    f"{item.name}={value!r} is not one of {list(choices)}; pick one of those"
                )
        object.__setattr__(self, "eval_epochs", parse_int_list(self.eval_epochs))
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("temperature", "gain"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("lr", "weight_decay", "delta", "momentum"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
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
        if self.optimizer == "agd" and self.weight_decay:
            raise ValueError(
                f"weight_decay={self.weight_decay} with optimizer='agd': AGD has no weight-decay "
                "rule; drop --weight-decay or use --optimizer sgd|adam|adamw"
            )
        if not self.ddn_grad and self.method != "implicit":
            raise ValueError(
                f"ddn_grad=False only applies to method='implicit' (got method={self.method!r}); "
                "drop --no-ddn-grad"
            )

    # ------------------------------------------------------------------ conversions
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
        values = {
            item.name: getattr(namespace, item.name)
            for item in fields(cls)
            if hasattr(namespace, item.name)
        }
        return cls(**values)

    def eval_epoch_set(self) -> tuple[int, ...]:
        """Epochs to evaluate: the requested ones within range, plus the last epoch."""
        return tuple(sorted({e for e in self.eval_epochs if e <= self.epochs} | {self.epochs}))

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
        from guided_nc.checkpoint import atomic_write_text

        payload = {"config": self.to_dict(), "environment": environment_info()}
        atomic_write_text(Path(path), json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a config written by :meth:`save` (or a plain dict of fields)."""
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data.get("config", data))


def _check_type(name: str, value: Any, hint: Any) -> None:
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


def add_config_arguments(
    parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), defaults: dict | None = None
) -> None:
    """Add one flag per :class:`TrainConfig` field (``snake_case`` -> ``--kebab-case``).

    Booleans get ``--name`` / ``--no-name``; ``eval_epochs`` takes ``1,50,200``. ``exclude``
    names fields the caller handles itself; ``defaults`` overrides shown defaults.
    """
    hints = get_type_hints(TrainConfig)
    defaults = defaults or {}
    for item in fields(TrainConfig):
        if item.name in exclude:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = defaults.get(item.name, item.default)
        help_text = item.metadata.get("help", "")
        hint = hints[item.name]
        kwargs: dict[str, Any] = {"dest": item.name, "default": default}
        options = [a for a in get_args(hint) if a is not type(None)] if get_args(hint) else [hint]
        if get_origin(hint) is tuple:
            kwargs["type"] = parse_int_list
            kwargs["metavar"] = "E1,E2,..."
        elif options == [bool]:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = options[0]
            if "choices" in item.metadata:
                kwargs["choices"] = item.metadata["choices"]
        parser.add_argument(flag, help=f"{help_text} (default: {default})".strip(), **kwargs)


def environment_info() -> dict[str, Any]:
    """Versions of the interpreter and libraries a run used (saved with its config)."""
    import numpy
    import torch

    import guided_nc

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "guided_nc": guided_nc.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        info["torchvision"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
