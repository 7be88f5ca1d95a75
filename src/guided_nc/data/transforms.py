"""Normalisation, augmentation and batched tensor transforms.

Two kinds of transform:

* :class:`BatchTransform` works on a whole batch of in-memory images (uint8 or float tensors,
  on any device) at once: scale to [0, 1], random rotation, random crop with zero padding,
  random horizontal flip, per-channel normalisation. Randomness comes from an explicit CPU
  ``torch.Generator``. This is the fast path for MNIST-family, digits, CIFAR and STL-10.
* :func:`imagenet_transforms` returns torchvision per-sample PIL pipelines for ImageFolder data.

Normalisation constants and augmentations follow the authors' release
(reference-release.md section 8); see ``docs/data.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision import transforms as tv

__all__ = [
    "AUGMENTATIONS",
    "NORMALIZATION",
    "BatchTransform",
    "imagenet_transforms",
    "rotate_batch",
]

#: Per-channel (mean, std) of each dataset, on images scaled to [0, 1] (release table).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

#: Training augmentation of each dataset: keyword arguments of :class:`BatchTransform`.
AUGMENTATIONS: dict[str, dict[str, float | int | bool]] = {
    "cifar10": {"crop_padding": 4, "horizontal_flip": True},
    "cifar100": {"crop_padding": 4, "horizontal_flip": True},
    "stl10": {"crop_padding": 4, "horizontal_flip": True},
    "fashion-mnist": {"crop_padding": 4, "horizontal_flip": True},
    "mnist": {"rotation_degrees": 25.0},
    "digits": {},
    "mnist1d": {},
}


class BatchTransform:
    """Augment and normalise a batch of images in one set of tensor operations.

    Steps, in order (each optional): ``x / scale`` to [0, 1] (as float32), a random rotation by
    an angle uniform in ``[-rotation_degrees, rotation_degrees]`` (nearest-neighbour, zero fill,
    as ``torchvision.transforms.RandomRotation``), a random crop of the original size from the
    image zero-padded by ``crop_padding`` on every side (``RandomCrop(size, padding)``), a
    horizontal flip with probability 1/2 (``RandomHorizontalFlip``), then
    ``(x - mean) / std`` per channel. Each image gets its own random parameters, drawn from
    ``generator`` (a CPU generator, so a seed gives the same augmentation on every device).

    Args:
        mean: per-channel means (length C), or None for no normalisation.
        std: per-channel standard deviations (length C), or None.
        scale: divisor that maps the stored values to [0, 1] (255 for uint8 images).
        crop_padding: zero padding of the random crop (0: no crop).
        horizontal_flip: random horizontal flips.
        rotation_degrees: largest rotation angle in degrees (0: no rotation).

    Shape: images (B, C, H, W) uint8 or float -> (B, C, H, W) float32 on the same device.
    Vectors (B, L) are accepted when no spatial augmentation is configured.
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        scale: float = 255.0,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        rotation_degrees: float = 0.0,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError(f"mean={mean} and std={std} must be given together or both None")
        if std is not None and any(value <= 0 for value in std):
            raise ValueError(f"std={tuple(std)} must be positive")
        if mean is not None and len(mean) != len(std):
            raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} must have equal lengths")
        if scale <= 0:
            raise ValueError(f"scale={scale} must be positive (255 for uint8 images)")
        if crop_padding < 0:
            raise ValueError(f"crop_padding={crop_padding} must be >= 0")
        if rotation_degrees < 0:
            raise ValueError(f"rotation_degrees={rotation_degrees} must be >= 0")
        self.mean = None if mean is None else tuple(float(value) for value in mean)
        self.std = None if std is None else tuple(float(value) for value in std)
        self.scale = float(scale)
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.rotation_degrees = float(rotation_degrees)

    @property
    def augments(self) -> bool:
        """True when the transform is random (crop, flip or rotation configured)."""
        return self.crop_padding > 0 or self.horizontal_flip or self.rotation_degrees > 0

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.augments and images.ndim != 4:
            raise ValueError(
                f"images of shape {tuple(images.shape)} cannot be augmented: spatial "
                "augmentation needs (B, C, H, W)"
            )
        batch = images
        if self.rotation_degrees > 0:
            # Rotation interpolates, so it needs floats; crops and flips only move pixels and
            # run on the stored dtype (uint8: a quarter of the memory traffic).
            batch = _random_rotation(batch.to(torch.float32), self.rotation_degrees, generator)
        if self.crop_padding > 0 or self.horizontal_flip:
            batch = _random_crop_and_flip(batch, self.crop_padding, self.horizontal_flip, generator)
        batch = batch.to(torch.float32)
        if batch is images:
            batch = batch.clone()  # never modify the stored data in place
        if self.mean is None:
            return batch.mul_(1.0 / self.scale)
        # (x / scale - mean) / std as one multiply and one subtract, per channel.
        shape = (1, -1) + (1,) * (batch.ndim - 2)
        std = torch.tensor(self.std, dtype=torch.float64)
        mean = torch.tensor(self.mean, dtype=torch.float64)
        factor = (1.0 / (self.scale * std)).to(torch.float32).to(batch.device).view(shape)
        offset = (mean / std).to(torch.float32).to(batch.device).view(shape)
        return batch.mul_(factor).sub_(offset)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mean={self.mean}, std={self.std}, scale={self.scale}, "
            f"crop_padding={self.crop_padding}, horizontal_flip={self.horizontal_flip}, "
            f"rotation_degrees={self.rotation_degrees})"
        )


def _random_crop_and_flip(
    batch: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None
) -> torch.Tensor:
    # RandomCrop(size=(H, W), padding) then RandomHorizontalFlip for every image at once: pad
    # with zeros, draw each image's top-left corner in [0, 2 * padding] and its flip, and read
    # all windows with one gather on the flattened padded images (a flipped window reads its
    # columns in reverse order).
    size, channels, height, width = batch.shape
    device = batch.device
    if padding > 0:
        batch = F.pad(batch, (padding, padding, padding, padding))
        top = torch.randint(0, 2 * padding + 1, (size,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (size,), generator=generator)
    else:
        top = left = torch.zeros(size, dtype=torch.long)
    columns = torch.arange(width).expand(size, width)
    if flip:
        flipped = torch.rand(size, generator=generator) < 0.5
        columns = torch.where(flipped[:, None], columns.flip(-1), columns)
    rows = top[:, None] + torch.arange(height)  # (B, H)
    columns = left[:, None] + columns  # (B, W)
    padded_width = batch.shape[-1]
    flat = (rows[:, :, None] * padded_width + columns[:, None, :]).view(size, 1, height * width)
    flat = flat.to(device).expand(size, channels, height * width)
    windows = torch.gather(batch.reshape(size, channels, -1), 2, flat)
    return windows.view(size, channels, height, width)


def _random_rotation(
    batch: torch.Tensor, degrees: float, generator: torch.Generator | None
) -> torch.Tensor:
    # RandomRotation(degrees): angle uniform in [-degrees, degrees] for every image.
    uniform = torch.rand(batch.shape[0], generator=generator, dtype=torch.float64)
    angles = (uniform * 2 - 1) * degrees
    return rotate_batch(batch, angles)


def rotate_batch(batch: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its angle (degrees, counter-clockwise), as
    ``torchvision.transforms.functional.rotate`` with nearest-neighbour sampling and zero fill.

    Shape: batch (B, C, H, W) float, angles (B,) -> (B, C, H, W).
    """
    radians = angles.to(torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zeros = torch.zeros_like(cos)
    height, width = batch.shape[-2:]
    # affine_grid maps output to input in normalised coordinates ([-1, 1] on each axis); the
    # aspect ratio converts the pixel-space rotation into that frame (identity for squares).
    ratio = width / height
    theta = torch.stack(
        [
            torch.stack([cos, -sin / ratio, zeros], 1),
            torch.stack([sin * ratio, cos, zeros], 1),
        ],
        1,
    )
    theta = theta.to(device=batch.device, dtype=batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def imagenet_transforms(image_size: int = 224, augment: bool = True) -> tv.Compose:
    """Per-sample PIL pipelines for ImageFolder data (release table, reference-release.md s.8).

    Training (``augment=True``): Resize(image_size * 8/7) -> RandomCrop(image_size, padding=4)
    -> RandomHorizontalFlip -> ToTensor -> Normalize(ImageNet statistics). Evaluation:
    Resize(image_size * 8/7) -> CenterCrop(image_size) -> ToTensor -> Normalize. With the default
    224 the resize is to 256, as in the release.

    Shape: PIL image -> (3, image_size, image_size) float32.
    """
    resize = round(image_size * 8 / 7)
    mean, std = NORMALIZATION["imagenet"]
    steps: list = [tv.Resize(resize)]
    if augment:
        steps += [tv.RandomCrop(image_size, padding=4), tv.RandomHorizontalFlip()]
    else:
        steps += [tv.CenterCrop(image_size)]
    steps += [tv.ToTensor(), tv.Normalize(mean, std)]
    return tv.Compose(steps)
