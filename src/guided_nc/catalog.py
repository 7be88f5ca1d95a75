"""The names of the built-in datasets and backbones, in a module that imports only the standard
library.

The command line lists them as ``--dataset`` / ``--model`` choices, so ``guided-nc --help``
must not import torchvision to learn them; :mod:`guided_nc.data` and :mod:`guided_nc.models`
take their lists from here. :func:`unknown_name` words the error for a name not in such a list,
with the closest valid names; :class:`MissingPackage` and :class:`DownloadFailed` are the
errors of a dataset that cannot be loaded on this machine.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

#: Names accepted by :func:`guided_nc.data.build_datasets`.
DATASET_NAMES = (
    "cifar10",
    "cifar100",
    "stl10",
    "imagenet",
    "mnist",
    "fashion-mnist",
    "digits",
    "mnist1d",
)

#: Names accepted by :func:`guided_nc.models.build_backbone`.
MODEL_NAMES = ("resnet18", "resnet50", "vgg13", "mlp", "cnn")

#: Names of the training losses (:func:`guided_nc.timing.build_loss`).
LOSSES = ("ce", "mse", "label-smoothing")

#: What ``dataset`` and ``model`` say when a run trains a user's own data or backbone
#: (:func:`guided_nc.train.train_model`).
CUSTOM = "custom"


#: Extra of the optional packages that the offline datasets need (pyproject's ``[data]``).
DATA_EXTRA_INSTALL = 'pip install "guided-nc[data]"'


class MissingPackage(ModuleNotFoundError):
    """A dataset needs an optional package that is not installed; the one-line message names
    the extra that installs it (:data:`DATA_EXTRA_INSTALL`)."""


class DownloadFailed(ConnectionError):
    """A dataset's download failed; the one-line message names the dataset, what could not be
    reached and how to train without a network."""


def did_you_mean(
    value: object, names: Iterable[str], aliases: Mapping[str, str] | None = None
) -> str:
    """``"did you mean 'a' or 'b'?"`` with the valid names closest to ``value``, or ``""``.

    The closest names: the one :func:`difflib.get_close_matches` finds (case-insensitive), then
    those whose alias (a method's label such as "Fixed ETF") contains ``value``; at most two.

    >>> did_you_mean("etf", ["fixed", "implicit"], {"Fixed ETF": "fixed"})
    "did you mean 'fixed'?"
    >>> did_you_mean("cifar-10", ["cifar10", "mnist"])
    "did you mean 'cifar10'?"
    """
    candidates = {name.lower(): name for name in names}
    candidates.update({alias.lower(): name for alias, name in (aliases or {}).items()})
    text = str(value).lower()
    found = difflib.get_close_matches(text, list(candidates), n=1, cutoff=0.6)
    found += [key for key in candidates if len(text) >= 3 and text in key]
    closest = list(dict.fromkeys(candidates[key] for key in found))[:2]
    return f"did you mean {' or '.join(repr(name) for name in closest)}?" if closest else ""


def unknown_name(
    argument: str, value: object, names: Iterable[str], aliases: Mapping[str, str] | None = None
) -> str:
    """One line for ``value`` not in ``names``: the valid names and the closest ones
    (:func:`did_you_mean`).

    >>> unknown_name("dataset", "cifar-10", ["cifar10", "cifar100", "mnist"])
    "dataset='cifar-10' is not one of ['cifar10', 'cifar100', 'mnist']; did you mean 'cifar10'?"
    """
    names = list(names)
    return f"{argument}={value!r} is not one of {names}; " + (
        did_you_mean(value, names, aliases) or "pick one of those"
    )
