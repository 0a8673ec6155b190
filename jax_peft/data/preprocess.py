"""Host-side image preprocessing with numpy and PIL (no TensorFlow), and its device-side normalization.

Every function takes and returns one image as a numpy array (H, W, C). The training pipeline calls
`Preprocess.__call__(image, rng)` once per example in worker threads; PIL releases the GIL while
resizing, so a few threads keep up with a CPU/GPU step.

Conventions follow the PyTorch recipes the PEFT papers used (torchvision on PIL images):
`resize` = PIL resize (antialiased bicubic or bilinear) to an exact (H, W) without keeping the aspect
ratio; `random_resized_crop` = torchvision's RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3),
10 attempts, then a centre crop fallback); normalization applies to [0, 1] pixels.

Normalization runs on the host (`normalize`, numpy) or inside jitted code (`normalize_on_device`,
the training steps' form: uint8 batches leave the host, 4x fewer bytes); both give the same bits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

NORMALIZATIONS = ("minus_one_one", "imagenet", "zero_one")
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3); gray is tiled."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an image (H, W, C), got shape {image.shape}")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        return image[..., :3]
    if image.shape[-1] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got shape {image.shape}")
    return image


def resize(image: np.ndarray, size: int | tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size_h, size_w, 3) with PIL (antialiased), aspect ratio not kept."""
    h, w = _pair(size)
    if image.shape[0] == h and image.shape[1] == w:
        return image
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; use one of {sorted(INTERPOLATIONS)}")
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((w, h), INTERPOLATIONS[interpolation]))


def normalize(image: np.ndarray, kind: str = "minus_one_one") -> np.ndarray:
    """uint8 (..., 3) -> float32 with the recipe's normalization.

    minus_one_one: x/127.5 - 1 (= mean 0.5, std 0.5 on [0, 1]); imagenet: ([0, 1] - mean) / std;
    zero_one: x/255.
    """
    if kind not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {kind!r}; use one of {NORMALIZATIONS}")
    x = np.array(image, np.float32)  # a new array, updated in place (no temporaries: whole batches)
    if kind == "minus_one_one":
        x /= np.float32(127.5)
        x -= np.float32(1.0)
    elif kind == "imagenet":
        x /= np.float32(255.0)
        x -= IMAGENET_MEAN
        x /= IMAGENET_STD
    else:
        x /= np.float32(255.0)
    return x


def normalization_table(kind: str = "minus_one_one") -> np.ndarray:
    """float32 (256, 3): `normalize` of every uint8 value v in each channel c at [v, c]."""
    return normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1), kind)


def normalize_on_device(images, kind: str = "minus_one_one"):
    """uint8 (..., 3) jax array -> float32 (..., 3), bit-identical to `normalize` on every backend.

    A lookup in `normalization_table` (computed by numpy on the host), not arithmetic: XLA does not
    reproduce numpy's float32 `x / c - m`: its simplifier turns a division by a constant into a
    multiplication by the reciprocal, and XLA:CPU divides that way even by a run-time divisor
    (x / 255: 126 of the 256 values 1 ulp off numpy's); TPUs divide approximately. The lookup of a
    3 KB table costs about what the arithmetic does (2-5 ms for 32x224x224x3 on one CPU core)."""
    import jax.numpy as jnp

    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (..., 3), got shape {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"normalize_on_device takes uint8 images, got {images.dtype}; float images are "
                         "already normalized")
    table = jnp.asarray(normalization_table(kind).reshape(-1))
    index = images.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)
    return table.at[index].get(mode="promise_in_bounds")  # every index is in [0, 768)


def hflip(image: np.ndarray) -> np.ndarray:
    return image[:, ::-1]


def center_crop(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """torchvision CenterCrop (top/left offsets rounded)."""
    h, w = _pair(size)
    top = int(round((image.shape[0] - h) / 2.0))
    left = int(round((image.shape[1] - w) / 2.0))
    if top < 0 or left < 0:
        raise ValueError(f"crop {h}x{w} larger than image {image.shape[:2]}")
    return image[top:top + h, left:left + w]


def random_crop(image: np.ndarray, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """torchvision RandomCrop without padding."""
    h, w = _pair(size)
    top = int(rng.integers(0, image.shape[0] - h + 1))
    left = int(rng.integers(0, image.shape[1] - w + 1))
    return image[top:top + h, left:left + w]


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision.transforms.RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, size: int | tuple[int, int], rng: np.random.Generator,
                        interpolation: str = "bicubic") -> np.ndarray:
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng)
    return resize(image[top:top + h, left:left + w], size, interpolation)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """One example's transform: uint8 image (H, W, C) -> float32 (size, size, 3).

    Geometry:
      - `crop_fraction` None (VTAB): direct resize to `image_size` (train and eval).
      - `crop_fraction` f (FGVC, few-shot): eval resizes to image_size/f then centre-crops
        image_size (RLRR/VPT: Resize(256, 256) -> CenterCrop(224), f = 0.875); train does the same
        resize and a random crop instead (RLRR FGVC), unless `random_resized_crop`.
      - `random_resized_crop` (train only): torchvision RandomResizedCrop to image_size.
    Then a random horizontal flip (train, `hflip`) and the normalization.

    Stages: `prepare` (to RGB, resize to `stored_size`; deterministic, cacheable), `augment` (crop,
    flip; per example from its rng), `normalize` (element-wise; applied to whole batches);
    `geometry` = augment(prepare(.)) (or the random resized crop and flip), `__call__` = all three.
    """

    image_size: int
    train: bool
    normalization: str = "minus_one_one"
    interpolation: str = "bicubic"
    hflip: bool = False
    random_resized_crop: bool = False
    crop_fraction: float | None = None

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; use one of {NORMALIZATIONS}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; "
                             f"use one of {sorted(INTERPOLATIONS)}")
        if self.crop_fraction is not None and not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    @property
    def stored_size(self) -> int | None:
        """Side of `prepare`'s output (the deterministic, cacheable stage), or None when the geometry
        is random from the original image on (random_resized_crop in training)."""
        if self.train and self.random_resized_crop:
            return None
        if self.crop_fraction is None:
            return self.image_size
        return int(math.floor(self.image_size / self.crop_fraction))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The deterministic stage: uint8 (H, W, C) -> uint8 (S, S, 3), S = `stored_size` (RGB, resized).
        The same every epoch, so `jax_peft.data.cache` stores it once per split."""
        return resize(to_rgb(image), self.stored_size, self.interpolation)

    def augment_params(self, rng: np.random.Generator | None) -> tuple[int, int, bool]:
        """(top, left, flip) of `augment` on a prepared (S, S, 3) image, drawn from `rng` in the order
        of torchvision's RandomCrop (no padding) then RandomHorizontalFlip; CenterCrop's offsets in eval."""
        s, size = self.stored_size, self.image_size
        top = left = 0
        if self.crop_fraction is not None:
            if self.train:
                top, left = int(rng.integers(0, s - size + 1)), int(rng.integers(0, s - size + 1))
            else:
                top = left = int(round((s - size) / 2.0))
        flip = bool(self.train and self.hflip and rng.random() < 0.5)
        return top, left, flip

    def augment(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """The per-example stage after `prepare`: uint8 (S, S, 3) -> uint8 (size, size, 3) (crop, flip)."""
        top, left, flip = self.augment_params(rng)
        image = image[top:top + self.image_size, left:left + self.image_size]
        return hflip(image) if flip else image

    def geometry(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Everything but the normalization: uint8 (H, W, C) -> uint8 (size, size, 3)."""
        if self.stored_size is not None:
            return self.augment(self.prepare(image), rng)
        image = random_resized_crop(to_rgb(image), self.image_size, rng, self.interpolation)
        if self.hflip and rng.random() < 0.5:
            image = hflip(image)
        return image

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 (..., 3) -> float32 with this recipe's normalization (element-wise: a batch at once
        gives the same bits as one image at a time)."""
        return normalize(images, self.normalization)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        return self.normalize(self.geometry(image, rng))
