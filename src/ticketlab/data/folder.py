"""Image folders read with Pillow while training: ``train/<class>/*.png|jpg`` and
``val/<class>/...`` (the ImageNet layout), without torchvision.

Images are decoded, cropped and flipped in DataLoader workers
(:mod:`ticketlab.data.streaming`); each training image's random-resized crop and flip
come from its own seed (augmentation seed, step, position), so the batches of a resumed
run are those of an uninterrupted one. The ``val`` folder is the test split; validation
examples are held out of ``train`` by seed.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.utils.data as tud

from ticketlab.errors import DataError

from .streaming import StreamingData, Subset

EXTENSIONS = (".png", ".jpg", ".jpeg")
# random-resized crop: area fraction and aspect ratio ranges (Szegedy et al. 2015, as
# ImageNet training pipelines use them)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
STAT_IMAGES = 256  # images (evenly spaced over the training files) the statistics use


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of the images extra
        raise DataError(
            "reading image folders needs Pillow: pip install 'ticketlab[images]'"
        ) from None
    return Image


def list_split(root: Path, classes: list[str] | None = None):
    """``(classes, [(path, label), ...])`` of one split folder, sorted by class and name."""
    if not root.is_dir():
        raise DataError(f"image folder: {root} is not a directory (want {root}/<class>/*.png)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes is None:
        classes = found
        if not classes:
            raise DataError(f"image folder: no class folders in {root}")
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"image folder: {root} has classes the training split lacks: {unknown}")
    samples = []
    for label, c in enumerate(classes):
        d = root / c
        if not d.is_dir():
            continue
        for name in sorted(os.listdir(d)):
            if name.lower().endswith(EXTENSIONS):
                samples.append((str(d / name), label))
    return classes, samples


class ImageFolder(tud.Dataset):
    """``(image tensor, label)`` items of one split, decoded with Pillow.

    ``get(i, seed, train)``: with ``train`` and ``augment``, a random-resized crop to
    ``size`` x ``size`` and a horizontal flip with probability 1/2, drawn from a generator
    seeded by ``seed``; otherwise the centred square resized to ``size``. Pixels are
    scaled to [0, 1] and standardised by ``mean`` and ``std`` per channel. A file Pillow
    cannot decode is a :class:`~ticketlab.errors.DataError` naming its path.
    """

    def __init__(self, samples, size: int, channels: int, augment: bool, mean=None, std=None):
        self.samples, self.size, self.channels, self.augment = samples, size, channels, augment
        self.mean = torch.zeros(channels) if mean is None else mean
        self.std = torch.ones(channels) if std is None else std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.get(i, None, False)

    def decode(self, path: str):
        Image = _pil()
        try:
            with Image.open(path) as im:
                return im.convert("L" if self.channels == 1 else "RGB")  # decodes it all
        except Exception as exc:  # Pillow raises several types for broken files
            raise DataError(f"bad image {path}: {exc}") from None

    def pixels(self, i: int, seed: int | None, train: bool) -> torch.Tensor:
        """The uint8 (C, size, size) image, before scaling."""
        Image = _pil()
        im = self.decode(self.samples[i][0])
        w, h = im.size
        if train and self.augment and seed is not None:
            g = torch.Generator().manual_seed(seed)
            box = _crop_box(w, h, g)
            flip = bool(torch.rand((), generator=g) < 0.5)
        else:
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            box, flip = (left, top, left + side, top + side), False
        if box != (0, 0, self.size, self.size) or (w, h) != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BILINEAR, box=box)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.uint8)
        t = torch.from_numpy(arr.copy())
        return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()

    def get(self, i: int, seed: int | None, train: bool):
        x = self.pixels(i, seed, train).float().div_(255.0)
        x = x.sub_(self.mean.view(-1, 1, 1)).div_(self.std.view(-1, 1, 1))
        return x, self.samples[i][1]


def _crop_box(w: int, h: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """A random-resized crop's box: area in CROP_SCALE, aspect in CROP_RATIO, ten tries,
    then the centred crop of the nearest allowed aspect."""
    area = w * h
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        u = torch.rand(4, generator=g).tolist()
        target = area * (CROP_SCALE[0] + u[0] * (CROP_SCALE[1] - CROP_SCALE[0]))
        ratio = math.exp(log_lo + u[1] * (log_hi - log_lo))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left = min(int(u[2] * (w - cw + 1)), w - cw)
            top = min(int(u[3] * (h - ch + 1)), h - ch)
            return left, top, left + cw, top + ch
    ratio = w / h
    if ratio < CROP_RATIO[0]:
        cw, ch = w, round(w / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        cw, ch = round(h * CROP_RATIO[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _fingerprint(samples: list, val_samples: list, root: Path) -> str:
    """A hash of the file list (relative paths, sizes): what the run's identity names."""
    h = hashlib.sha256()
    for path, label in samples + val_samples:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1
        h.update(f"{os.path.relpath(path, root)}:{size}:{label}\n".encode())
    return h.hexdigest()[:12]


def image_folder(
    data_dir: str | os.PathLike | None,
    *,
    val_size: int | None = None,
    split_seed: int = 0,
    augment: bool | None = None,
    workers: int = 0,
    bad_files: str = "fail",
    image_size: int | None = None,
) -> StreamingData:
    """``data_dir/train/<class>/*`` (training, validation held out by ``split_seed``) and
    ``data_dir/val/<class>/*`` (test), read while training.

    ``image_size`` defaults to the shorter side of the first training image; channels
    are 1 if that image is greyscale, else 3. ``augment`` (default on) applies the
    random-resized crop and flip to training images. ``val_size`` defaults to a tenth of
    the training images (at most 10,000). Statistics for standardising come from
    :data:`STAT_IMAGES` training images spread over the file list.
    """
    if data_dir is None:
        raise DataError("dataset 'imagefolder' needs --data-dir DIR (with train/ and val/)")
    root = Path(data_dir)
    classes, train = list_split(root / "train")
    _, test = list_split(root / "val", classes)
    if not train:
        raise DataError(f"image folder: no .png or .jpg files under {root / 'train'}")
    Image = _pil()
    first = train[0][0]
    try:
        with Image.open(first) as im:
            mode, (w, h) = im.mode, im.size
    except Exception as exc:
        raise DataError(f"bad image {first}: {exc}") from None
    channels = 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    size = image_size or min(w, h)
    if size < 1:
        raise DataError(f"image size must be >= 1; got {size}")
    augment = True if augment is None else augment
    plain = ImageFolder(train, size, channels, False)
    picks = np.linspace(0, len(train) - 1, min(STAT_IMAGES, len(train))).round().astype(int)
    stats = []
    for i in sorted(set(picks.tolist())):
        try:
            stats.append(plain.pixels(i, None, False).float().div_(255.0))
        except DataError:
            if bad_files == "fail":
                raise
    if not stats:
        raise DataError(f"image folder: no readable images under {root / 'train'}")
    x = torch.stack(stats)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    full = ImageFolder(train, size, channels, augment, mean, std)
    n = len(train)
    val_size = min(n // 10, 10_000) if val_size is None else val_size
    if not 0 <= val_size < n:
        raise DataError(f"val_size {val_size}: the image folder has {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, keep_idx = perm[:val_size].sort().values.tolist(), perm[val_size:].sort().values
    return StreamingData(
        "imagefolder",
        Subset(full, keep_idx.tolist()),
        Subset(full, val_idx),
        ImageFolder(test, size, channels, False, mean, std),
        len(classes),
        workers=workers,
        bad_files=bad_files,
        fingerprint=f"{n - val_size}+{val_size}+{len(test)}:{size}:"
        + _fingerprint(train, test, root),
    )
