"""Procedurally generated image classification tasks: deterministic, vectorized numpy, no download.

Every image shows one or two flat objects (a shape from `SHAPES`, a colour, a texture: solid,
stripes or checker; small rotation jitter) on a noisy background with a colour gradient. Images are
rendered directly at the requested `image_size` (2x supersampled for anti-aliasing), so there is no
resizing and `interpolation` is accepted only for contract compatibility.

Tasks (names may carry the `synthetic/` prefix):

    upstream    one object; label = colour x texture (8 x 3 = 24 classes). Shape, position,
                size, rotation and background are nuisances. A pretraining task: it teaches a
                backbone colour and texture features and to be invariant to position.
    downstream  two objects, one in the left half and one in the right half; label = colour of
                the LEFT object (8 classes). The right object is a distractor with random
                attributes. The backbone has the needed colour features, but its pooled
                (CLS) representation mixes both objects, so a linear probe on frozen features
                cannot tell which colour is on the left; adapting attention can.
    smoke       one object; label = its colour among 4 (4 classes), tiny splits. Learnable in a
                few dozen steps; used by `jax_peft.configs.smoke` and tests.

Each split (`train`, `val`, `test`) has a fixed size and is generated from its own seed stream
(`numpy.random.SeedSequence((task_id, split_id))`), so the held-out test set is disjoint from the
training stream. Dataset content depends only on (name, split, image_size); the `seed` argument of
`make_dataset` controls shuffling and augmentation only.

A split is a record source (`get_source`) like a TFDS split: `jax_peft.data.make_dataset` batches,
shuffles, shards over hosts and resumes it with the same code as every other dataset
(`jax_peft.data.pipeline`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
TEXTURES = ("solid", "stripes", "checker")
# Saturated hues; the smoke task uses the first 4 as its classes.
PALETTE = np.array([
    [0.95, 0.15, 0.15],  # red
    [0.15, 0.85, 0.20],  # green
    [0.20, 0.35, 1.00],  # blue
    [0.95, 0.90, 0.15],  # yellow
    [0.90, 0.20, 0.90],  # magenta
    [0.15, 0.90, 0.90],  # cyan
    [1.00, 0.55, 0.10],  # orange
    [0.95, 0.95, 0.95],  # white
], dtype=np.float32)
SPLITS = ("train", "val", "test")
CROP_FRACTION = None  # rendered at the requested size: no resize, no crop


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A generated task: its label rule (`kind`), class count, split sizes and seed identity."""

    kind: str
    num_classes: int
    sizes: tuple[int, int, int]  # train, val, test
    task_id: int
    hflip_ok: bool  # whether a horizontal flip preserves the label
    description: str


TASKS: dict[str, TaskSpec] = {
    "upstream": TaskSpec("upstream", len(PALETTE) * len(TEXTURES), (16000, 1000, 2000), 101, True,
                         "one object; label = colour x texture"),
    "downstream": TaskSpec("downstream", len(PALETTE), (4000, 500, 2000), 202, False,
                           "two objects (left half, right half); label = colour of the left one"),
    "smoke": TaskSpec("smoke", 4, (1024, 256, 256), 303, True,
                      "one object; label = its colour (red, green, blue, yellow)"),
}


def task_names() -> list[str]:
    """Names accepted by `dataset_info` / `make_dataset` (also with a `synthetic/` prefix)."""
    return [f"synthetic/{k}" for k in TASKS]


def _spec(name: str) -> TaskSpec:
    key = name[len("synthetic/"):] if name.startswith("synthetic/") else name
    if key not in TASKS:
        raise ValueError(f"Unknown synthetic task {name!r}; valid names: {task_names()}.")
    return TASKS[key]


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for a synthetic task; valid splits: {list(SPLITS)}.")
    return SPLITS.index(split)


def dataset_info(name: str, split: str, *, data_dir: str | None = None) -> dict:
    """`dict(num_examples, num_classes)` of a synthetic split. `data_dir` is ignored (no files)."""
    spec = _spec(name)
    return dict(num_examples=spec.sizes[_split_index(split)], num_classes=spec.num_classes)


# ----------------------------------------------------------------------------- scene sampling


def _sample_objects(rng: np.random.Generator, n: int, *, r_lo: float, r_hi: float,
                    x_lo: np.ndarray | float, x_hi: np.ndarray | float,
                    shape: np.ndarray | None = None, texture: np.ndarray | None = None,
                    color: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Attributes of one object per image, all arrays of length n (coordinates in [0, 1] units)."""
    r = rng.uniform(r_lo, r_hi, n)
    # Centre x in [x_lo + r, x_hi - r]; y anywhere the object fits.
    cx = np.asarray(x_lo) + r + rng.uniform(0, 1, n) * (np.asarray(x_hi) - np.asarray(x_lo) - 2 * r)
    cy = r + rng.uniform(0, 1, n) * (1 - 2 * r)
    return dict(
        cx=cx, cy=cy, r=r,
        theta=rng.uniform(-np.pi / 12, np.pi / 12, n),
        shape=rng.integers(0, len(SHAPES), n) if shape is None else shape,
        texture=rng.integers(0, len(TEXTURES), n) if texture is None else texture,
        color=rng.integers(0, len(PALETTE), n) if color is None else color,
        brightness=rng.uniform(0.75, 1.0, n),
        tex_freq=rng.uniform(4.5, 6.5, n),       # texture cycles per image width
        tex_angle=rng.uniform(0, np.pi, n),
        tex_phase=rng.uniform(0, 2 * np.pi, n),
    )


def _sample_scenes(spec: TaskSpec, rng: np.random.Generator, n: int) -> tuple[dict, list[dict], np.ndarray]:
    """(background, objects, labels) for n images of a task."""
    background = dict(
        level=rng.uniform(0.05, 0.4, n),
        tint=rng.uniform(-0.06, 0.06, (n, 3)),
        grad=rng.uniform(-0.15, 0.15, (n, 2)),
    )
    if spec.kind == "upstream":
        obj = _sample_objects(rng, n, r_lo=0.12, r_hi=0.24, x_lo=0.02, x_hi=0.98)
        labels = obj["color"] * len(TEXTURES) + obj["texture"]
        return background, [obj], labels
    if spec.kind == "smoke":
        color = rng.integers(0, 4, n)
        obj = _sample_objects(rng, n, r_lo=0.2, r_hi=0.32, x_lo=0.02, x_hi=0.98, color=color)
        return background, [obj], color
    if spec.kind == "downstream":
        left = _sample_objects(rng, n, r_lo=0.12, r_hi=0.19, x_lo=0.02, x_hi=0.49)
        right = _sample_objects(rng, n, r_lo=0.12, r_hi=0.19, x_lo=0.51, x_hi=0.98)
        return background, [left, right], left["color"]
    raise AssertionError(spec.kind)


# ----------------------------------------------------------------------------- rendering


def _shape_masks(u: np.ndarray, v: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Boolean (n, H, W): pixel inside the object, given local coordinates u, v (unit radius)."""
    au, av = np.abs(u), np.abs(v)
    rho2 = u * u + v * v
    masks = (
        rho2 <= 1.0,                                                    # circle
        np.maximum(au, av) <= 0.82,                                     # square
        (v <= 0.75) & (v >= -0.9) & (au <= 0.55 * (v + 0.9)),           # triangle (apex up)
        (rho2 <= 1.0) & (rho2 >= 0.36),                                 # ring
        ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95)),    # cross
        au + av <= 1.05,                                                # diamond
    )
    out = np.zeros(u.shape, bool)
    for s, m in enumerate(masks):
        out |= (shape == s)[:, None, None] & m
    return out


def _render(background: dict, objects: list[dict], size: int, noise_rng: np.random.Generator,
            supersample: int = 2) -> np.ndarray:
    """uint8 images (n, size, size, 3) of the scenes (vectorized over images)."""
    n = background["level"].shape[0]
    s = size * supersample
    coords = ((np.arange(s, dtype=np.float32) + 0.5) / s)
    yy, xx = coords[None, :, None], coords[None, None, :]  # (1, s, 1), (1, 1, s)
    col = lambda a: a.astype(np.float32)[:, None, None]  # noqa: E731  (n,) -> (n, 1, 1)

    ramp = col(background["grad"][:, 0]) * (xx - 0.5) + col(background["grad"][:, 1]) * (yy - 0.5)
    img = (col(background["level"]) + ramp)[..., None] + background["tint"].astype(np.float32)[:, None, None, :]
    for obj in objects:
        dx, dy = (xx - col(obj["cx"])) / col(obj["r"]), (yy - col(obj["cy"])) / col(obj["r"])
        c, sn = col(np.cos(obj["theta"])), col(np.sin(obj["theta"]))
        u, v = dx * c + dy * sn, -dx * sn + dy * c
        inside = _shape_masks(u, v, obj["shape"])
        # Texture in image coordinates: stripes along tex_angle, checker = xor of two stripe sets.
        ca, sa = col(np.cos(obj["tex_angle"])), col(np.sin(obj["tex_angle"]))
        w = 2 * np.pi * col(obj["tex_freq"])
        t1 = np.sin(w * (xx * ca + yy * sa) + col(obj["tex_phase"])) > 0
        t2 = np.sin(w * (-xx * sa + yy * ca)) > 0
        tex = obj["texture"][:, None, None]
        pattern = np.where(tex == 0, True, np.where(tex == 1, t1, t1 ^ t2))
        shade = np.where(pattern, 1.0, 0.45).astype(np.float32) * col(obj["brightness"])
        colour = PALETTE[obj["color"]][:, None, None, :] * shade[..., None]
        img = np.where(inside[..., None], colour, img)
    if supersample > 1:
        img = img.reshape(n, size, supersample, size, supersample, 3).mean(axis=(2, 4))
    img = img + noise_rng.normal(0.0, 0.03, img.shape).astype(np.float32)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def generate(name: str, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole split: images uint8 (N, image_size, image_size, 3) and labels int32 (N,).

    Deterministic in (name, split, image_size); cached in memory (a 16k-image 32 px split is ~50 MB).
    Read-only arrays: copy before modifying.
    """
    spec = _spec(name)
    split_id = _split_index(split)
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 for synthetic data, got {image_size!r}.")
    n = spec.sizes[split_id]
    rng = np.random.default_rng(np.random.SeedSequence((spec.task_id, split_id)))
    background, objects, labels = _sample_scenes(spec, rng, n)
    chunk = max(1, (1 << 22) // (image_size * image_size * 4))  # bound temporaries to ~100 MB
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for i, start in enumerate(range(0, n, chunk)):
        sl = slice(start, min(n, start + chunk))
        noise_rng = np.random.default_rng(np.random.SeedSequence((spec.task_id, split_id, image_size, i)))
        images[sl] = _render({k: (v[sl] if isinstance(v, np.ndarray) else v) for k, v in background.items()},
                             [{k: v[sl] for k, v in o.items()} for o in objects], image_size, noise_rng)
    labels = labels.astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


# ----------------------------------------------------------------------------- source


class SyntheticSource:
    """A generated split as a record source for `jax_peft.data.pipeline` (the TFDS contract):
    `len(src)`, `src[i] -> {"image": uint8 (S, S, 3), "label": int}`, rendered at `image_size` S."""

    def __init__(self, name: str, split: str, image_size: int):
        self.images, self.labels = generate(_full_name(name), split, image_size)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


def _full_name(name: str) -> str:
    return name if name.startswith("synthetic/") else f"synthetic/{name}"


def get_source(name: str, split: str, *, image_size: int, data_dir: str | None = None) -> SyntheticSource:
    """The split rendered at `image_size` as a record source (`data_dir` is ignored: no files)."""
    return SyntheticSource(name, split, image_size)


def num_classes(name: str) -> int:
    return _spec(name).num_classes


def check_augmentation(name: str, *, train: bool, hflip: bool, random_resized_crop: bool) -> None:
    """Rejects augmentations that would change a synthetic task's labels (ValueError naming the fix)."""
    spec = _spec(name)
    if random_resized_crop:
        raise ValueError("random_resized_crop is not supported for synthetic tasks: crops can cut objects "
                         "out and change the label (shape, left/right). Set data.random_resized_crop=False.")
    if hflip and train and not spec.hflip_ok:
        raise ValueError(f"hflip would change the labels of synthetic/{spec.kind} ({spec.description}); "
                         "set data.hflip=False.")
