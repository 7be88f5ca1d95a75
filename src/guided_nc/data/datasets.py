"""Dataset construction: :func:`build_datasets` returns the three splits of a dataset.

Readers take the files in their official on-disk formats (CIFAR python pickles, STL-10 binary,
MNIST idx, optionally gzip-compressed, ImageFolder trees) and nothing is ever downloaded unless
``download=True``, which hands over to torchvision's downloaders. See ``docs/data.md`` for the
expected locations, normalisation, augmentation, long-tail and label-noise rules.
"""

from __future__ import annotations

import copy
import gzip
import os
import pickle
import random
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from guided_nc.catalog import DATA_EXTRA_INSTALL, DATASET_NAMES, DownloadFailed, MissingPackage
from guided_nc.data.imbalance import (
    LABEL_NOISE_MODES,
    LONG_TAIL_PROFILES,
    add_label_noise,
    long_tail_indices,
)
from guided_nc.data.memory import EpochLoader, RelabeledDataset, TensorImageDataset, build_loader
from guided_nc.data.transforms import (
    AUGMENTATIONS,
    NORMALIZATION,
    BatchTransform,
    imagenet_transforms,
)

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_ROOT_VARIABLE",
    "SYSTEM_FASHION_MNIST",
    "DataSplits",
    "build_datasets",
    "default_root",
    "read_idx",
]


#: Environment variable holding the default data root (else ``./data``).
DEFAULT_ROOT_VARIABLE = "GUIDED_NC_DATA"

#: Where Debian's ``dataset-fashion-mnist`` package installs the Fashion-MNIST idx files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: Fraction of scikit-learn's digits held out as the test split (stratified, fixed).
DIGITS_TEST_FRACTION = 0.2

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# eq=False: the fields hold datasets and tensors, which have no meaningful ==.
@dataclass(frozen=True, eq=False)
class DataSplits:
    """The splits of one dataset and what a training run needs to know about them.

    Attributes:
        name: dataset name (one of :data:`DATASET_NAMES`).
        train: training split with training augmentation (after long-tail and label noise).
        train_eval: the same examples and labels as ``train`` without augmentation, for
            evaluating the training split (method.md section 5).
        test: test split, no augmentation (never long-tailed or noisy).
        num_classes: K.
        input_shape: shape of one transformed input: (C, H, W), or (L,) for MNIST-1D.
        train_labels: (N_train,) int64 labels of ``train`` (noisy if ``label_noise > 0``), e.g.
            for ``StratifiedBatchSampler``.
        test_labels: (N_test,) int64.
        clean_train_labels: (N_train,) int64 labels of ``train`` before label noise.
        noisy_indices: int64 positions in ``train`` whose label was re-drawn (empty if none).
        train_indices: (N_train,) int64 positions of ``train``'s examples in the full training
            split (``arange`` unless long-tailed).
        classes: class names, index k is label k.
        mean, std: per-channel normalisation applied to the inputs (None for MNIST-1D, which
            the generator already standardises).
    """

    name: str
    train: Dataset
    train_eval: Dataset
    test: Dataset | None
    num_classes: int
    input_shape: tuple[int, ...]
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    clean_train_labels: torch.Tensor
    noisy_indices: torch.Tensor
    train_indices: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_datasets(
        cls,
        train: Dataset,
        test: Dataset | None = None,
        *,
        train_eval: Dataset | None = None,
        num_classes: int | None = None,
        train_labels: Sequence[int] | torch.Tensor | None = None,
        name: str = "custom",
    ) -> DataSplits:
        """Your own datasets as the splits of a run (:func:`guided_nc.train.train_model`).

        Args:
            train: map-style dataset of ``(input, label)`` pairs; the stratified sampler makes
                its batches, so its labels are needed: ``train_labels``, else its ``targets``
                or ``labels`` attribute (torchvision datasets have one), else one pass over it.
            test: the test split, or None (then only the training split is evaluated).
            train_eval: the training examples without augmentation, for the NC metrics of the
                training split (default: ``train`` itself, fine when it does not augment).
            num_classes: K (default: the largest training label + 1).
            train_labels: (N,) int labels of ``train``.
            name: recorded as the dataset's name.
        """
        labels = _dataset_labels(train, train_labels)
        test_labels = _dataset_labels(test, None) if test is not None else labels[:0]
        if labels.numel() == 0:
            raise ValueError("train is empty; pass a dataset with at least one example")
        if labels.min() < 0:
            raise ValueError(f"train has a label {int(labels.min())} < 0; labels are 0..K-1")
        classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if int(labels.max()) >= classes:
            raise ValueError(
                f"num_classes={classes} but train has a label {int(labels.max())}; labels must "
                f"lie in [0, {classes - 1}]"
            )
        sample = train[0][0]
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else ()
        empty = torch.empty(0, dtype=torch.int64)
        return cls(
            name=name,
            train=train,
            train_eval=train if train_eval is None else train_eval,
            test=test,
            num_classes=classes,
            input_shape=shape,
            train_labels=labels,
            test_labels=test_labels,
            clean_train_labels=labels,
            noisy_indices=empty,
            train_indices=torch.arange(len(labels)),
            classes=tuple(str(k) for k in range(classes)),
            mean=None,
            std=None,
        )

    @property
    def in_memory(self) -> bool:
        """True for the fast path: ``train`` is a :class:`TensorImageDataset`."""
        return isinstance(self.train, TensorImageDataset)

    def _workers(self, num_workers: int | None) -> int:
        if num_workers is not None:
            if num_workers < 0:
                raise ValueError(f"num_workers={num_workers} must be >= 0")
            return num_workers
        return 0 if self.in_memory else min(8, os.cpu_count() or 1)

    def train_loader(
        self,
        batch_sampler: Sampler[Sequence[int]] | Iterable[Sequence[int]],
        num_workers: int | None = None,
        pin_memory: bool = False,
    ) -> EpochLoader:
        """Batches of ``train`` (augmented) in the order of ``batch_sampler``.

        Returns an :class:`~guided_nc.data.memory.EpochLoader`: call
        ``batch_sampler.set_epoch(epoch)`` before iterating, and the augmentations are reseeded
        from (seeds, epoch, rank), so resumed runs repeat them. Yields ``(inputs, labels)``:
        inputs (B, *input_shape) float32, labels (B,) int64, on the CPU (or on the device the
        in-memory dataset was moved to).

        Args:
            batch_sampler: yields lists of indices into ``train`` (e.g. ``StratifiedBatchSampler``).
            num_workers: for ImageFolder data (default min(8, CPUs)); in-memory data uses none.
            pin_memory: pin host memory for faster copies to a GPU.
        """
        return EpochLoader(self.train, batch_sampler, self._workers(num_workers), pin_memory)

    def eval_loader(
        self,
        split: str,
        indices: Callable[[int], Sequence[int]] | Sequence[int] | None = None,
        batch_size: int = 256,
        num_workers: int | None = None,
        pin_memory: bool = False,
    ) -> DataLoader:
        """Batches of a split without augmentation, in order: ``"train"`` (``train_eval``) or
        ``"test"``.

        Args:
            split: ``"train"`` or ``"test"``.
            indices: which examples (e.g. this rank's shard): a sequence, or a function of the
                split's size returning one; None for all.
            batch_size: examples per batch (the last batch may be smaller).
            num_workers: for ImageFolder data (default min(8, CPUs)); in-memory data uses none.
            pin_memory: pin host memory for faster copies to a GPU.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} must be 'train' or 'test'")
        dataset = self.train_eval if split == "train" else self.test
        if indices is None:
            indices = range(len(dataset))
        elif callable(indices):
            indices = indices(len(dataset))
        return build_loader(
            dataset,
            batch_sampler=BatchSampler(list(indices), batch_size, drop_last=False),
            num_workers=self._workers(num_workers),
            pin_memory=pin_memory,
        )


def _dataset_labels(dataset: Dataset, labels) -> torch.Tensor:
    """(N,) int64 labels of a dataset: given, its ``targets``/``labels``, or read from it."""
    if labels is None:
        labels = getattr(dataset, "targets", None)
        if labels is None:
            labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[index][1]) for index in range(len(dataset))]
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() != len(dataset):
        raise ValueError(
            f"got {labels.numel()} labels for a dataset of {len(dataset)} examples; pass one "
            "label per example"
        )
    return labels


@dataclass
class _InMemory:
    """Raw tensors of a dataset that fits in memory, before long-tail, noise and transforms."""

    train_data: torch.Tensor
    train_labels: torch.Tensor
    test_data: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    scale: float | None  # None: no transform at all (MNIST-1D)


def default_root() -> Path:
    """The data root used when ``root=None``: ``$GUIDED_NC_DATA``, else ``./data``."""
    return Path(os.environ.get(DEFAULT_ROOT_VARIABLE, "data"))


def build_datasets(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    augment: bool = True,
    long_tail: str | None = None,
    imbalance_factor: float = 1.0,
    label_noise: float = 0.0,
    seed: int = 0,
    *,
    label_noise_mode: str = "other",
    augmentation_seed: int | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """Load a dataset's splits with the paper's normalisation and augmentation.

    Args:
        name: one of :data:`DATASET_NAMES`.
        root: data root (default :func:`default_root`). Expected layout per dataset in
            ``docs/data.md``; Fashion-MNIST is also found in :data:`SYSTEM_FASHION_MNIST`.
        download: let torchvision download a missing dataset into ``root`` (needs internet;
            not available for ImageNet; nothing to download for digits and MNIST-1D).
        augment: training augmentation on ``train`` (``train_eval``/``test`` never augment).
        long_tail: None, ``"exp"`` or ``"step"``: subsample the training split
            (:func:`~guided_nc.data.imbalance.long_tail_indices`).
        imbalance_factor: smallest / largest class size of the long tail, in (0, 1].
        label_noise: fraction of training labels to corrupt, in [0, 1].
        seed: seed of the long-tail subset and of the label noise (separate streams).
        label_noise_mode: ``"other"`` (a corrupted label never equals the true one) or
            ``"uniform"`` (the release's rule; it may).
        augmentation_seed: seed of the in-memory augmentation generator (default ``seed``);
            pass the run's seed (plus the rank in distributed runs).
        image_size: ImageNet crop size (default 224); other datasets have a fixed size.

    Returns:
        :class:`DataSplits`. MNIST-family, digits, MNIST-1D, CIFAR and STL-10 are held in memory
        as :class:`TensorImageDataset` (the fast path; load batches with
        :func:`~guided_nc.data.memory.build_loader`); ImageNet is an ``ImageFolder``.

    Raises:
        ValueError: unknown name or invalid option (message lists the valid values).
        FileNotFoundError: the dataset's files are missing; the message names the files, the
            folders searched and how to get them.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name={name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if long_tail is not None and long_tail not in LONG_TAIL_PROFILES:
        raise ValueError(
            f"unknown long_tail={long_tail!r}; choose None or one of "
            f"{', '.join(LONG_TAIL_PROFILES)}"
        )
    if not 0.0 < imbalance_factor <= 1.0:
        raise ValueError(
            f"imbalance_factor={imbalance_factor} must be in (0, 1]: the ratio of the smallest to "
            "the largest class, e.g. 0.01 for a 100:1 long tail"
        )
    if long_tail is None and imbalance_factor != 1.0:
        raise ValueError(
            f"imbalance_factor={imbalance_factor} needs a long-tail profile; set long_tail='exp' "
            "(the paper's) or 'step'"
        )
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise={label_noise} must be in [0, 1] (a fraction of the labels)")
    if label_noise_mode not in LABEL_NOISE_MODES:
        raise ValueError(
            f"unknown label_noise_mode={label_noise_mode!r}; choose one of "
            f"{', '.join(LABEL_NOISE_MODES)}"
        )
    if image_size is not None and (name != "imagenet" or image_size < 1):
        raise ValueError(
            f"image_size={image_size} is only a positive crop size for 'imagenet'; leave it None "
            f"for {name!r}"
        )
    root = default_root() if root is None else Path(root)
    augmentation_seed = seed if augmentation_seed is None else augmentation_seed
    # Independent streams for the subset and the noise, so one does not shift the other.
    long_tail_seed, noise_seed = np.random.SeedSequence(seed).generate_state(2).tolist()

    if name == "imagenet":
        return _build_image_folder(
            root,
            augment,
            long_tail,
            imbalance_factor,
            label_noise,
            label_noise_mode,
            long_tail_seed,
            noise_seed,
            image_size or 224,
        )
    raw = _IN_MEMORY_LOADERS[name](root, download)
    num_classes = len(raw.classes)
    train_indices = torch.arange(raw.train_labels.shape[0])
    if long_tail is not None:
        train_indices = long_tail_indices(
            raw.train_labels, num_classes, imbalance_factor, long_tail, long_tail_seed
        )
    clean_labels = raw.train_labels[train_indices]
    labels, noisy_indices = _noisy(
        clean_labels, num_classes, label_noise, noise_seed, label_noise_mode
    )
    train_data = raw.train_data if long_tail is None else raw.train_data[train_indices]

    if raw.scale is None:
        evaluation = training = None
    else:
        evaluation = BatchTransform(raw.mean, raw.std, raw.scale)
        training = (
            BatchTransform(raw.mean, raw.std, raw.scale, **AUGMENTATIONS[name])
            if augment
            else evaluation
        )
    train = TensorImageDataset(train_data, labels, training, seed=augmentation_seed)
    return DataSplits(
        name=name,
        train=train,
        train_eval=train.with_transform(evaluation),
        test=TensorImageDataset(raw.test_data, raw.test_labels, evaluation),
        num_classes=num_classes,
        input_shape=tuple(raw.train_data.shape[1:]),
        train_labels=labels,
        test_labels=raw.test_labels,
        clean_train_labels=clean_labels,
        noisy_indices=noisy_indices,
        train_indices=train_indices,
        classes=raw.classes,
        mean=raw.mean,
        std=raw.std,
    )


def _noisy(
    labels: torch.Tensor, num_classes: int, rate: float, seed: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if rate == 0.0:
        return labels.clone(), torch.zeros(0, dtype=torch.long)
    return add_label_noise(labels, num_classes, rate, seed, mode)


# --------------------------------------------------------------------------------------------
# Errors


def _missing(
    dataset: str, files: Sequence[str], searched: Sequence[Path], how: str
) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {dataset!r} not found: expected {', '.join(files)} in "
        f"{' or '.join(str(path) for path in searched)}. {how}"
    )


def _download_hint(dataset: str, root: Path, extra: str = "") -> str:
    return (
        f"Pass download=True (--download) to let torchvision fetch it into {root} (needs "
        f"internet){extra}, or point root (--data-root, ${DEFAULT_ROOT_VARIABLE}) at the folder "
        "that holds it."
    )


def _download(dataset: str, root: Path, torchvision_class: type, **options: object) -> None:
    """Let torchvision download ``dataset`` into ``root``.

    On failure (no network, a host that refuses, a corrupt file) remove what the attempt
    created, the folders included, and raise :class:`~guided_nc.catalog.DownloadFailed`: one
    line naming the dataset, the address that could not be reached and the offline ways.
    """
    created = [folder for folder in (root, *root.parents) if not folder.exists()]
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        torchvision_class(str(root), download=True, **options)
    except (OSError, RuntimeError) as error:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        else:
            for path in set(root.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        url = getattr(torchvision_class, "url", None) or torchvision_class.mirrors[0]
        reason = " ".join(str(getattr(error, "reason", error)).split())
        raise DownloadFailed(
            f"dataset {dataset!r}: could not download {url} ({reason}); without a network, "
            f"put its files in {root} (layout in docs/data.md) and drop --download, or train "
            "on an offline dataset: --dataset fashion-mnist (apt-get install "
            f"dataset-fashion-mnist), digits or mnist1d ({DATA_EXTRA_INSTALL})"
        ) from error


# --------------------------------------------------------------------------------------------
# MNIST family (idx files, optionally gzip-compressed)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte idx file (the MNIST format), plain or gzip-compressed (``.gz``).

    torchvision's ``read_image_file`` reads only uncompressed files inside its own
    ``<root>/<Class>/raw`` layout, so Debian's ``.gz`` files are parsed here: a big-endian header
    (two zero bytes, type code 0x08 = uint8, number of dimensions, then one uint32 per
    dimension) followed by the data.

    Returns: uint8 array of the stored shape, e.g. (N, 28, 28) images or (N,) labels.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        content = handle.read()
    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad header {content[:4]!r})")
    num_dims = content[3]
    shape = struct.unpack(f">{num_dims}I", content[4 : 4 + 4 * num_dims])
    data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * num_dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} values but its header says shape {shape}")
    return data.reshape(shape)


def _find_idx_folder(candidates: Sequence[Path]) -> dict[str, Path] | None:
    for folder in candidates:
        found = {}
        for key, stem in _IDX_FILES.items():
            for file_name in (stem, stem + ".gz"):
                if (folder / file_name).is_file():
                    found[key] = folder / file_name
                    break
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _load_mnist_family(name: str, root: Path, download: bool) -> _InMemory:
    torchvision_class = {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
    }[name]
    candidates = [root / torchvision_class.__name__ / "raw", root / name, root]
    if name == "fashion-mnist":
        candidates.append(SYSTEM_FASHION_MNIST)
    files = _find_idx_folder(candidates)
    if files is None and download:
        _download(name, root, torchvision_class, train=True)
        files = _find_idx_folder(candidates)
    if files is None:
        extra = (
            "; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` installs it into "
            f"{SYSTEM_FASHION_MNIST}, which is searched"
            if name == "fashion-mnist"
            else ""
        )
        raise _missing(
            name,
            [stem + "[.gz]" for stem in _IDX_FILES.values()],
            candidates,
            _download_hint(name, root, extra),
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    mean, std = NORMALIZATION[name]
    return _InMemory(
        train_data=torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_data=torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        classes=tuple(torchvision_class.classes),
        mean=mean,
        std=std,
        scale=255.0,
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10/100 (python pickles) and STL-10 (binary)


def _load_cifar(name: str, root: Path, download: bool) -> _InMemory:
    if name == "cifar10":
        folder_name, train_files, test_files = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
        )
        meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
        torchvision_class = torchvision.datasets.CIFAR10
    else:
        folder_name, train_files, test_files = "cifar-100-python", ["train"], ["test"]
        meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
        torchvision_class = torchvision.datasets.CIFAR100
    folder = root / folder_name

    def missing() -> list[str]:
        return [f for f in train_files + test_files if not (folder / f).is_file()]

    if missing() and download:
        _download(name, root, torchvision_class, train=True)
    if missing():
        raise _missing(
            name,
            train_files + test_files + [meta_file],
            [folder],
            _download_hint(name, root, ", or extract the official python tarball there"),
        )

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for file_name in files:
            with open(folder / file_name, "rb") as handle:
                # The official files are Python 2 pickles of numpy arrays (torchvision reads
                # them the same way).
                entry = pickle.load(handle, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8))
            labels.extend(entry[labels_key])
        data = np.concatenate(images).reshape(-1, 3, 32, 32)
        return torch.from_numpy(data), torch.tensor(labels, dtype=torch.long)

    train_data, train_labels = read(train_files)
    test_data, test_labels = read(test_files)
    num_classes = 10 if name == "cifar10" else 100
    classes = tuple(str(k) for k in range(num_classes))
    if (folder / meta_file).is_file():
        with open(folder / meta_file, "rb") as handle:
            classes = tuple(pickle.load(handle, encoding="latin1")[names_key])
    mean, std = NORMALIZATION[name]
    return _InMemory(train_data, train_labels, test_data, test_labels, classes, mean, std, 255.0)


def _load_stl10(root: Path, download: bool) -> _InMemory:
    folder = root / "stl10_binary"
    files = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    if download and not all((folder / f).is_file() for f in files):
        _download("stl10", root, torchvision.datasets.STL10, split="train")
    if not all((folder / f).is_file() for f in files):
        raise _missing(
            "stl10",
            files,
            [folder],
            _download_hint("stl10", root, ", or extract stl10_binary.tar.gz there"),
        )

    def read(images_file: str, labels_file: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Each image is stored channel by channel, each channel column-major: (3, W, H) per image.
        images = np.fromfile(folder / images_file, dtype=np.uint8).reshape(-1, 3, 96, 96)
        images = np.ascontiguousarray(images.transpose(0, 1, 3, 2))
        labels = np.fromfile(folder / labels_file, dtype=np.uint8).astype(np.int64) - 1
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{folder / labels_file} has {labels.shape[0]} labels but {folder / images_file} "
                f"has {images.shape[0]} images"
            )
        return torch.from_numpy(images), torch.from_numpy(labels)

    train_data, train_labels = read("train_X.bin", "train_y.bin")
    test_data, test_labels = read("test_X.bin", "test_y.bin")
    classes = tuple(str(k) for k in range(10))
    if (folder / "class_names.txt").is_file():
        classes = tuple((folder / "class_names.txt").read_text().split())
    mean, std = NORMALIZATION["stl10"]
    return _InMemory(train_data, train_labels, test_data, test_labels, classes, mean, std, 255.0)


# --------------------------------------------------------------------------------------------
# Offline datasets: scikit-learn digits and MNIST-1D


#: The pip names of the optional packages, by import name.
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "mnist1d": "mnist1d"}


def _optional(module: str, dataset: str):
    """Import an optional dependency of a dataset, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise MissingPackage(
            f"dataset {dataset!r} needs the optional package {_DISTRIBUTIONS[package]!r} "
            f"(import {package}), which is not installed; {DATA_EXTRA_INSTALL}"
        ) from error


def _load_digits(root: Path, download: bool) -> _InMemory:
    load_digits = _optional("sklearn.datasets", "digits").load_digits
    train_test_split = _optional("sklearn.model_selection", "digits").train_test_split

    digits = load_digits()  # bundled with scikit-learn: 1797 images 8x8, values 0..16
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    # A fixed, stratified split, independent of the run's seed.
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=0
    )
    train_images = images[np.sort(train_index)]
    test_images = images[np.sort(test_index)]
    # Normalisation statistics of the (fixed) training split, on values scaled to [0, 1].
    scaled = train_images.astype(np.float64) / 16.0
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    return _InMemory(
        train_data=torch.from_numpy(train_images).unsqueeze(1),
        train_labels=torch.from_numpy(labels[np.sort(train_index)]),
        test_data=torch.from_numpy(test_images).unsqueeze(1),
        test_labels=torch.from_numpy(labels[np.sort(test_index)]),
        classes=tuple(str(k) for k in range(10)),
        mean=mean,
        std=std,
        scale=16.0,
    )


def _load_mnist1d(root: Path, download: bool) -> _InMemory:
    mnist1d_data = _optional("mnist1d.data", "mnist1d")
    get_dataset_args, make_dataset = mnist1d_data.get_dataset_args, mnist1d_data.make_dataset

    # make_dataset() generates the standard MNIST-1D (4000 train / 1000 test, length 40, its
    # own seed 42) locally; it reseeds Python's and numpy's global generators, so their states
    # are restored afterwards.
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
    return _InMemory(
        train_data=torch.from_numpy(np.asarray(data["x"], dtype=np.float32)),
        train_labels=torch.from_numpy(np.asarray(data["y"], dtype=np.int64)),
        test_data=torch.from_numpy(np.asarray(data["x_test"], dtype=np.float32)),
        test_labels=torch.from_numpy(np.asarray(data["y_test"], dtype=np.int64)),
        classes=tuple(str(k) for k in range(10)),
        mean=None,
        std=None,
        scale=None,
    )


_IN_MEMORY_LOADERS: dict[str, Callable[[Path, bool], _InMemory]] = {
    "cifar10": lambda root, download: _load_cifar("cifar10", root, download),
    "cifar100": lambda root, download: _load_cifar("cifar100", root, download),
    "stl10": _load_stl10,
    "mnist": lambda root, download: _load_mnist_family("mnist", root, download),
    "fashion-mnist": lambda root, download: _load_mnist_family("fashion-mnist", root, download),
    "digits": _load_digits,
    "mnist1d": _load_mnist1d,
}


# --------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)


def _build_image_folder(
    root: Path,
    augment: bool,
    long_tail: str | None,
    imbalance_factor: float,
    label_noise: float,
    label_noise_mode: str,
    long_tail_seed: int,
    noise_seed: int,
    image_size: int,
) -> DataSplits:
    candidates = [root, root / "imagenet"]
    folder = next((c for c in candidates if (c / "train").is_dir() and (c / "val").is_dir()), None)
    if folder is None:
        raise _missing(
            "imagenet",
            ["train/<class>/<image>", "val/<class>/<image>"],
            candidates,
            "ImageNet cannot be downloaded automatically: put ILSVRC-2012 there as an "
            "ImageFolder tree, with the validation images sorted into one folder per class.",
        )
    evaluation = imagenet_transforms(image_size, augment=False)
    train_full = torchvision.datasets.ImageFolder(
        str(folder / "train"), transform=imagenet_transforms(image_size, augment)
    )
    test = torchvision.datasets.ImageFolder(str(folder / "val"), transform=evaluation)
    if train_full.classes != test.classes:
        raise ValueError(
            f"{folder / 'train'} and {folder / 'val'} have different class folders "
            f"({len(train_full.classes)} vs {len(test.classes)}); they must match"
        )
    # The same file list with the evaluation transform, without scanning the tree again.
    train_eval_full = copy.copy(train_full)
    train_eval_full.transform = evaluation
    full_labels = torch.tensor(train_full.targets, dtype=torch.long)
    num_classes = len(train_full.classes)
    train_indices = torch.arange(full_labels.shape[0])
    if long_tail is not None:
        train_indices = long_tail_indices(
            full_labels, num_classes, imbalance_factor, long_tail, long_tail_seed
        )
    clean_labels = full_labels[train_indices]
    labels, noisy_indices = _noisy(
        clean_labels, num_classes, label_noise, noise_seed, label_noise_mode
    )
    if long_tail is None and label_noise == 0.0:
        train, train_eval = train_full, train_eval_full
    else:
        train = RelabeledDataset(train_full, train_indices, labels)
        train_eval = RelabeledDataset(train_eval_full, train_indices, labels)
    mean, std = NORMALIZATION["imagenet"]
    return DataSplits(
        name="imagenet",
        train=train,
        train_eval=train_eval,
        test=test,
        num_classes=num_classes,
        input_shape=(3, image_size, image_size),
        train_labels=labels,
        test_labels=torch.tensor(test.targets, dtype=torch.long),
        clean_train_labels=clean_labels,
        noisy_indices=noisy_indices,
        train_indices=train_indices,
        classes=tuple(train_full.classes),
        mean=mean,
        std=std,
    )
