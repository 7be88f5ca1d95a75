"""Datasets, transforms, long-tail, label noise and loaders.

Every reader is checked on small files that the test writes in the official on-disk format
(CIFAR python pickles, STL-10 column-major binary, MNIST idx with and without gzip, ImageFolder
PNG trees); values read back are compared with what was written. Long-tail counts are re-derived
from the formula, label noise is counted, augmentation is compared with torchvision's
per-image transforms and brute force.
"""

from __future__ import annotations

import gzip
import math
import pickle
import random
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import guided_nc.data.datasets as datasets_module
from guided_nc.data import (
    DATASET_NAMES,
    NORMALIZATION,
    BatchTransform,
    TensorImageDataset,
    add_label_noise,
    build_datasets,
    build_loader,
    default_root,
    long_tail_counts,
    read_idx,
)
from guided_nc.data.transforms import rotate_batch

# ---------------------------------------------------------------------------------------------
# Writers of the official formats (independent of the readers under test)


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    """MNIST idx: 0x0000, type 0x08 (uint8), ndim, big-endian uint32 sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    content = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(content)
    else:
        path.write_bytes(content)


def write_mnist_folder(folder, rng, compress, train=12, test=5):
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, compress)
    return arrays


def denormalise(images: torch.Tensor, mean, std, scale=255.0) -> torch.Tensor:
    shape = (1, -1) + (1,) * (images.ndim - 2)
    mean = torch.tensor(mean).view(shape)
    std = torch.tensor(std).view(shape)
    return torch.round((images * std + mean) * scale)


def all_items(dataset):
    images, labels = dataset[torch.arange(len(dataset))]
    return images, labels


# ---------------------------------------------------------------------------------------------
# MNIST family


@pytest.mark.parametrize(
    ("name", "subfolder", "compress"),
    [("mnist", "MNIST/raw", True), ("fashion-mnist", "fashion-mnist", False)],
)
def test_mnist_family_reads_idx_files(tmp_path, name, subfolder, compress):
    arrays = write_mnist_folder(tmp_path / subfolder, np.random.default_rng(1), compress)
    splits = build_datasets(name, root=tmp_path)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.in_memory
    images, labels = all_items(splits.train_eval)
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.float32
    mean, std = NORMALIZATION[name]
    written = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32))
    torch.testing.assert_close(denormalise(images, mean, std)[:, 0], written)
    expected_labels = torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64))
    assert torch.equal(labels, expected_labels)
    assert torch.equal(splits.train_labels, expected_labels)
    test_images, test_labels = all_items(splits.test)
    written_test = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32))
    torch.testing.assert_close(denormalise(test_images, mean, std)[:, 0], written_test)
    assert torch.equal(test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    # The augmented split has the same labels and shapes.
    augmented, augmented_labels = all_items(splits.train)
    assert augmented.shape == images.shape and torch.equal(augmented_labels, labels)


def test_fashion_mnist_found_in_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = write_mnist_folder(system, np.random.default_rng(2), compress=True)
    monkeypatch.setattr(datasets_module, "SYSTEM_FASHION_MNIST", system)
    splits = build_datasets("fashion-mnist", root=tmp_path / "empty-root")
    assert torch.equal(
        splits.test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long()
    )


def test_read_idx_rejects_bad_header(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + b"\x00" * 8)
    with pytest.raises(ValueError, match=r"not an unsigned-byte idx file"):
        read_idx(path)
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(ValueError, match=r"holds 2 values but its header says shape \(5,\)"):
        read_idx(short)


# ---------------------------------------------------------------------------------------------
# CIFAR and STL-10


def write_cifar10(root, rng, per_batch=3, test=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = [], []
    for index in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / f"data_batch_{index}", "wb") as handle:
            pickle.dump({"batch_label": f"batch {index}", "data": data, "labels": labels}, handle)
        train_images.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, (test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, test).tolist()
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": test_data, "labels": test_labels}, handle)
    names = [f"class{k}" for k in range(10)]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, handle)
    return np.concatenate(train_images), train_labels, test_data, test_labels, names


def test_cifar10_reads_python_batches(tmp_path):
    train_data, train_labels, test_data, test_labels, names = write_cifar10(
        tmp_path, np.random.default_rng(3)
    )
    splits = build_datasets("cifar10", root=tmp_path)
    assert splits.classes == tuple(names) and splits.input_shape == (3, 32, 32)
    mean, std = NORMALIZATION["cifar10"]
    images, labels = all_items(splits.train_eval)
    # Row layout of the official files: 1024 red, then green, then blue values, row-major.
    expected = torch.from_numpy(train_data.reshape(-1, 3, 32, 32).astype(np.float32))
    torch.testing.assert_close(denormalise(images, mean, std), expected)
    assert labels.tolist() == train_labels
    test_images, labels = all_items(splits.test)
    expected = torch.from_numpy(test_data.reshape(-1, 3, 32, 32).astype(np.float32))
    torch.testing.assert_close(denormalise(test_images, mean, std), expected)
    assert labels.tolist() == test_labels


def test_cifar100_reads_python_files(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    written = {}
    for split, size in (("train", 7), ("test", 3)):
        data = rng.integers(0, 256, (size, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size).tolist()
        coarse = rng.integers(0, 20, size).tolist()
        with open(folder / split, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": coarse}, handle)
        written[split] = (data, fine)
    names = [f"fine{k}" for k in range(100)]
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["c"] * 20}, handle)
    splits = build_datasets("cifar100", root=tmp_path)
    assert splits.num_classes == 100 and splits.classes == tuple(names)
    mean, std = NORMALIZATION["cifar100"]
    for dataset, split in ((splits.train_eval, "train"), (splits.test, "test")):
        images, labels = all_items(dataset)
        data, fine = written[split]
        expected = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32))
        torch.testing.assert_close(denormalise(images, mean, std), expected)
        assert labels.tolist() == fine


def test_stl10_reads_column_major_binary(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    written = {}
    for split, size in (("train", 3), ("test", 2)):
        images = rng.integers(0, 256, (size, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
        labels = rng.integers(1, 11, size, dtype=np.uint8)  # 1-based on disk
        # On disk each channel is column-major: store the transpose (N, C, W, H) row-major.
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        labels.tofile(folder / f"{split}_y.bin")
        written[split] = (images, labels)
    splits = build_datasets("stl10", root=tmp_path)
    assert splits.input_shape == (3, 96, 96)
    mean, std = NORMALIZATION["stl10"]
    for dataset, split in ((splits.train_eval, "train"), (splits.test, "test")):
        images, labels = all_items(dataset)
        expected = torch.from_numpy(written[split][0].astype(np.float32))
        torch.testing.assert_close(denormalise(images, mean, std), expected)
        assert labels.tolist() == (written[split][1].astype(int) - 1).tolist()


# ---------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)


def test_imagenet_image_folder(tmp_path):
    colours = {"n01": (10, 200, 30), "n02": (250, 0, 128), "n03": (60, 60, 60)}
    for split, count in (("train", 2), ("val", 1)):
        for class_name, colour in colours.items():
            (tmp_path / split / class_name).mkdir(parents=True)
            for index in range(count):
                image = Image.new("RGB", (10, 12), colour)
                image.save(tmp_path / split / class_name / f"{index}.png")
    splits = build_datasets("imagenet", root=tmp_path, image_size=8)
    assert splits.classes == ("n01", "n02", "n03") and splits.num_classes == 3
    assert splits.input_shape == (3, 8, 8) and not splits.in_memory
    assert splits.train_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits.test_labels.tolist() == [0, 1, 2]
    mean, std = NORMALIZATION["imagenet"]
    for dataset in (splits.train_eval, splits.test):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 8, 8)
            # A constant image stays constant under resize and crop.
            colour = torch.tensor(list(colours.values())[label], dtype=torch.float32)
            torch.testing.assert_close(
                denormalise(image[None], mean, std)[0], colour.view(3, 1, 1).expand(3, 8, 8)
            )
    augmented, _ = splits.train[0]
    assert augmented.shape == (3, 8, 8)
    noisy = build_datasets("imagenet", root=tmp_path, image_size=8, label_noise=0.5, seed=1)
    assert [noisy.train[i][1] for i in range(6)] == noisy.train_labels.tolist()
    assert (noisy.train_labels != noisy.clean_train_labels).sum() == 3
    loader = noisy.eval_loader("train", batch_size=4, num_workers=0)
    batches = [(x.shape, y.tolist()) for x, y in loader]
    assert [shape[0] for shape, _ in batches] == [4, 2]
    assert [label for _, labels in batches for label in labels] == noisy.train_labels.tolist()


# ---------------------------------------------------------------------------------------------
# Missing files and bad options


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("cifar10", r"data_batch_1.*test_batch.*cifar-10-batches-py.*download=True"),
        ("cifar100", r"train, test, meta.*cifar-100-python.*download=True"),
        ("stl10", r"train_X\.bin.*test_y\.bin.*stl10_binary.*download=True"),
        ("mnist", r"train-images-idx3-ubyte\[\.gz\].*MNIST/raw.*download=True"),
        (
            "fashion-mnist",
            r"t10k-labels-idx1-ubyte\[\.gz\].*FashionMNIST/raw.*apt-get install "
            r"dataset-fashion-mnist",
        ),
        ("imagenet", r"train/<class>/<image>.*val/<class>/<image>.*cannot be downloaded"),
    ],
)
def test_missing_dataset_names_files_and_path(tmp_path, monkeypatch, name, match):
    monkeypatch.setattr(datasets_module, "SYSTEM_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=match) as error:
        build_datasets(name, root=tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "svhn"}, r"unknown dataset name='svhn'.*cifar10.*fashion-mnist.*mnist1d"),
        ({"long_tail": "linear"}, r"unknown long_tail='linear'.*exp, step"),
        ({"long_tail": "exp", "imbalance_factor": 0.0}, r"imbalance_factor=0.0 must be in"),
        ({"long_tail": "exp", "imbalance_factor": 100.0}, r"e.g. 0.01 for a 100:1"),
        ({"imbalance_factor": 0.1}, r"imbalance_factor=0.1 needs a long-tail profile"),
        ({"label_noise": 1.5}, r"label_noise=1.5 must be in \[0, 1\]"),
        ({"label_noise_mode": "pairs"}, r"unknown label_noise_mode='pairs'.*other, uniform"),
        ({"image_size": 16}, r"image_size=16 is only a positive crop size for 'imagenet'"),
    ],
)
def test_build_datasets_rejects_bad_options(kwargs, match):
    kwargs = {"name": "digits", **kwargs}
    with pytest.raises(ValueError, match=match):
        build_datasets(**kwargs)


def test_default_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GUIDED_NC_DATA", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("GUIDED_NC_DATA")
    assert str(default_root()) == "data"
    assert set(DATASET_NAMES) == {
        "cifar10", "cifar100", "stl10", "imagenet", "mnist", "fashion-mnist", "digits", "mnist1d"
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Offline datasets: digits and MNIST-1D


def _global_states():
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002 (checking the legacy global)
    return random.getstate(), numpy_state, torch.random.get_rng_state()


def test_digits_offline_and_deterministic():
    from sklearn.datasets import load_digits

    before = _global_states()
    splits = build_datasets("digits")
    after = _global_states()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])
    digits = load_digits()
    assert len(splits.train) + len(splits.test) == len(digits.target) == 1797
    assert splits.input_shape == (1, 8, 8)
    images, labels = all_items(splits.train_eval)
    test_images, test_labels = all_items(splits.test)
    restored = torch.cat([denormalise(images, splits.mean, splits.std, 16.0),
                          denormalise(test_images, splits.mean, splits.std, 16.0)])  # fmt: skip
    # Every image read back is one of the bundled images, with its label; none is repeated.
    bundled = {
        (tuple(image.astype(int).ravel()), int(label))
        for image, label in zip(digits.images, digits.target, strict=True)
    }
    seen = {
        (tuple(image.long().ravel().tolist()), int(label))
        for image, label in zip(restored[:, 0], torch.cat([labels, test_labels]), strict=True)
    }
    assert seen == bundled
    # Stratified split: class proportions agree within one example per class.
    train_counts = torch.bincount(labels, minlength=10).double()
    test_counts = torch.bincount(test_labels, minlength=10).double()
    assert torch.all((test_counts - 0.25 * train_counts).abs() <= 1.5)
    again = build_datasets("digits", seed=5)
    assert torch.equal(all_items(again.test)[1], test_labels)


def test_mnist1d_generated_offline_without_touching_global_rng():
    before = _global_states()
    splits = build_datasets("mnist1d")
    after = _global_states()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])
    assert splits.input_shape == (40,) and splits.num_classes == 10
    train, labels = all_items(splits.train_eval)
    test, test_labels = all_items(splits.test)
    assert train.shape == (4000, 40) and test.shape == (1000, 40)
    # The generator standardises the whole set (train and test together).
    everything = torch.cat([train, test]).double()
    assert abs(everything.mean().item()) < 1e-3 and abs(everything.std().item() - 1) < 1e-2
    # 500 per class overall, shuffled.
    counts = torch.bincount(torch.cat([labels, test_labels]), minlength=10)
    assert counts.tolist() == [500] * 10


# ---------------------------------------------------------------------------------------------
# Long tail and label noise


def test_long_tail_counts_formula():
    # Re-derived: exponential n_c = floor(n_max * f^(c/(K-1))); step: first K//2 classes n_max.
    classes = np.arange(10)
    expected = np.floor(5000 * 0.01 ** (classes / 9) + 1e-9).astype(int).tolist()
    assert long_tail_counts(10, 5000, 0.01, "exp") == expected
    assert expected[0] == 5000 and expected[-1] == 50
    assert long_tail_counts(10, 5000, 0.1, "step") == [5000] * 5 + [500] * 5
    assert long_tail_counts(5, 100, 0.5, "step") == [100, 100, 50, 50, 50]
    assert long_tail_counts(4, 100, 1.0, "exp") == [100] * 4
    with pytest.raises(ValueError, match=r"num_classes=1 must be >= 2"):
        long_tail_counts(1, 10, 0.5)


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_long_tail_subset_of_digits(profile):
    before = _global_states()
    full = build_datasets("digits")
    splits = build_datasets("digits", long_tail=profile, imbalance_factor=0.1, seed=3)
    after = _global_states()
    assert np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    full_counts = torch.bincount(full.train_labels, minlength=10)
    n_max = int(full_counts.min())
    classes = np.arange(10)
    if profile == "exp":
        expected = np.floor(n_max * 0.1 ** (classes / 9) + 1e-9).astype(int)
    else:
        expected = np.where(classes < 5, n_max, math.floor(n_max * 0.1))
    assert torch.bincount(splits.train_labels, minlength=10).tolist() == expected.tolist()
    # The kept examples are the full split's rows at train_indices, with their labels.
    images, labels = all_items(splits.train_eval)
    full_images, full_labels = all_items(full.train_eval)
    torch.testing.assert_close(images, full_images[splits.train_indices])
    assert torch.equal(labels, full_labels[splits.train_indices])
    assert torch.all(splits.train_indices[1:] > splits.train_indices[:-1])
    # The test split stays balanced and complete.
    assert torch.equal(splits.test_labels, full.test_labels)
    same = build_datasets("digits", long_tail=profile, imbalance_factor=0.1, seed=3)
    other = build_datasets("digits", long_tail=profile, imbalance_factor=0.1, seed=4)
    assert torch.equal(same.train_indices, splits.train_indices)
    assert not torch.equal(other.train_indices, splits.train_indices)


def test_label_noise_other_mode_exact_rate_and_seeding():
    splits = build_datasets("digits", label_noise=0.3, seed=7)
    clean = build_datasets("digits").train_labels
    size = clean.shape[0]
    changed = torch.nonzero(splits.train_labels != clean).flatten()
    assert changed.numel() == math.floor(size * 0.3)
    assert torch.equal(changed, splits.noisy_indices)
    assert torch.equal(splits.clean_train_labels, clean)
    assert torch.equal(all_items(splits.train_eval)[1], splits.train_labels)
    assert torch.equal(all_items(splits.train)[1], splits.train_labels)
    assert torch.equal(build_datasets("digits", label_noise=0.3, seed=7).train_labels,
                       splits.train_labels)  # fmt: skip
    assert not torch.equal(
        build_datasets("digits", label_noise=0.3, seed=8).train_labels, splits.train_labels
    )


def test_label_noise_distribution():
    labels = torch.zeros(100_000, dtype=torch.long)
    noisy, chosen = add_label_noise(labels, 5, 0.5, seed=0, mode="other")
    assert chosen.numel() == 50_000 and torch.all(noisy[chosen] != 0)
    counts = torch.bincount(noisy[chosen], minlength=5)[1:].double()
    # Uniform over the 4 other classes: 12500 each, binomial sd ~ 97; allow 5 sd.
    assert torch.all((counts - 12_500).abs() < 5 * math.sqrt(50_000 * 0.25 * 0.75))
    noisy, chosen = add_label_noise(labels, 5, 0.5, seed=0, mode="uniform")
    assert chosen.numel() == 50_000
    # Release rule: the new label may equal the old one (expected 1/5 of the chosen).
    unchanged = int((noisy[chosen] == 0).sum())
    assert abs(unchanged - 10_000) < 5 * math.sqrt(50_000 * 0.2 * 0.8)
    assert torch.equal(labels, torch.zeros(100_000, dtype=torch.long))  # input untouched


# ---------------------------------------------------------------------------------------------
# Augmentation and the in-memory loader


def test_batch_crop_and_flip_match_torchvision_windows():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8, generator=generator)
    transform = BatchTransform(scale=1.0, crop_padding=2, horizontal_flip=True)
    out = transform(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.float32
    padded = TF.pad(images.float(), [2])
    flips = 0
    for index in range(16):
        windows = [
            TF.crop(padded[index], top, left, 10, 10) for top in range(5) for left in range(5)
        ]
        plain = any(torch.equal(out[index], w) for w in windows)
        flipped = any(torch.equal(out[index], TF.hflip(w)) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 0 < flips < 16
    again = transform(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert not torch.equal(out, transform(images, torch.Generator().manual_seed(2)))


def test_rotation_matches_torchvision():
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    angles = torch.tensor([0.0, 25.0, -12.5, 90.0])
    rotated = rotate_batch(images, angles)
    for index, angle in enumerate(angles.tolist()):
        expected = TF.rotate(images[index], angle, interpolation=InterpolationMode.NEAREST)
        torch.testing.assert_close(rotated[index], expected)
    transform = BatchTransform(scale=1.0, rotation_degrees=25.0)
    out = transform(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape
    assert torch.equal(out, transform(images, torch.Generator().manual_seed(3)))


def test_normalisation_and_errors():
    images = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)
    out = BatchTransform((0.1, 0.2, 0.3), (0.5, 0.5, 0.25))(images)
    expected = (torch.tensor([0.2, 0.2, 0.2]) - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor(
        [0.5, 0.5, 0.25]
    )
    torch.testing.assert_close(out[:, :, 1, 2], expected.expand(2, 3))
    with pytest.raises(ValueError, match=r"std=\(0.0,\) must be positive"):
        BatchTransform((0.5,), (0.0,))
    with pytest.raises(ValueError, match=r"crop_padding=-1 must be >= 0"):
        BatchTransform(crop_padding=-1)
    with pytest.raises(ValueError, match=r"spatial augmentation needs \(B, C, H, W\)"):
        BatchTransform(scale=1.0, horizontal_flip=True)(torch.zeros(2, 40))


def test_tensor_dataset_indexing_and_loader():
    data = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).clone()
    labels = torch.arange(20) % 4
    dataset = TensorImageDataset(data, labels, BatchTransform(scale=1.0))
    image, label = dataset[3]
    assert image.shape == (1, 2, 2) and float(image[0, 0, 0]) == 3.0 and int(label) == 3
    batch, batch_labels = dataset[[5, 1]]
    assert batch[:, 0, 0, 0].tolist() == [5.0, 1.0] and batch_labels.tolist() == [1, 1]
    loader = build_loader(dataset, 6, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
    assert len(loader) == 4 and sorted(seen.long().tolist()) == list(range(20))
    moved = dataset.to("cpu")
    assert torch.equal(moved[[2, 7]][0], dataset[[2, 7]][0])
    with pytest.raises(ValueError, match=r"give exactly one of batch_size"):
        build_loader(dataset)
    with pytest.raises(ValueError, match=r"data has 20 rows but labels has 3"):
        TensorImageDataset(data, labels[:3])


def test_epoch_loader_reseeds_augmentation_per_epoch():
    from guided_nc.sampler import StratifiedBatchSampler

    splits = build_datasets("digits", augmentation_seed=0)
    # Digits have no augmentation; give the split a random one to observe the reseeding.
    splits.train.transform = BatchTransform(splits.mean, splits.std, 16.0, crop_padding=1,
                                            horizontal_flip=True)  # fmt: skip
    sampler = StratifiedBatchSampler(splits.train_labels, 64, seed=1)
    loader = splits.train_loader(sampler)
    assert len(loader) == len(sampler)

    def epoch(number):
        sampler.set_epoch(number)
        return [x for x, _ in loader][:3]

    first = epoch(2)
    epoch(3)
    again = epoch(2)  # as a resumed run would
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = epoch(3)
    assert not torch.equal(first[0], other[0])
    state = splits.train.state_dict()
    x1, _ = splits.train[[0, 1, 2]]
    splits.train.load_state_dict(state)
    x2, _ = splits.train[[0, 1, 2]]
    assert torch.equal(x1, x2)


def test_fashion_mnist_fast_path_shapes(tmp_path):
    write_mnist_folder(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(9), True, 40, 8)
    splits = build_datasets("fashion-mnist", root=tmp_path, augmentation_seed=4)
    loader = splits.eval_loader("train", lambda size: range(1, size, 2), batch_size=8)
    sizes = [x.shape for x, _ in loader]
    assert sizes == [(8, 1, 28, 28), (8, 1, 28, 28), (4, 1, 28, 28)]
    with pytest.raises(ValueError, match=r"split='val' must be 'train' or 'test'"):
        splits.eval_loader("val")
