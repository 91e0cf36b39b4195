"""Embedded datasets that need no download: scikit-learn's handwritten digits, as images and video.

`digits(split)` renders the 1,797 8x8 digits as RGB images; `moving_digits(split)` makes clips of a
digit bouncing across a dark frame. Held-out = every 5th image (index % 5 == 0), train = the rest:
the demo trains on "train" and the eval service measures class accuracy of samples on "heldout".
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

SPLITS = ("train", "heldout", "all")
CLASSES = [str(i) for i in range(10)]


def _indices(n: int, split: str) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split == "all":
        return list(range(n))
    held = split == "heldout"
    return [i for i in range(n) if (i % 5 == 0) == held]


@functools.lru_cache(maxsize=1)
def _load():
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 ink -> 0..255 white-on-black
    return (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8), d.target.astype(int)


def digits(split: str = "train", size: int = 16):
    """Yields (name, RGB uint8 HxWx3 array, label) for the digits of a split."""
    images, labels = _load()
    for i in _indices(len(images), split):
        img = Image.fromarray(images[i], "L").resize((size, size), Image.BILINEAR).convert("RGB")
        yield f"digit{i:04d}", np.asarray(img), int(labels[i])


def moving_digits(split: str = "train", frames: int = 16, size: int = 16, digit_size: int = 8):
    """Yields (name, uint8 TxHxWx3 clip, label): one digit bouncing across the frame per source image.

    Constant velocity with mirror bounces, on whole pixels: start position and velocity (1 or 2
    pixels a frame on each axis, either sign) are integers, so two given frames determine the rest
    of the clip (sub-pixel speeds rounded to pixels made the future ambiguous). Start, velocity and
    tint are drawn from a generator seeded by the image index: the same set on every machine.
    """
    images, labels = _load()
    span = size - digit_size
    for i in _indices(len(images), split):
        rng = np.random.default_rng(i)
        d = np.asarray(Image.fromarray(images[i], "L").resize((digit_size, digit_size), Image.BILINEAR))
        tint = rng.uniform(0.5, 1.0, size=3)
        pos = rng.integers(0, span + 1, size=2)
        vel = rng.integers(1, 3, size=2) * rng.choice([-1, 1], size=2)
        clip = np.zeros((frames, size, size, 3), np.uint8)
        for t in range(frames):
            y, x = pos
            clip[t, y:y + digit_size, x:x + digit_size] = (d[..., None] * tint).astype(np.uint8)
            pos = pos + vel
            for k in range(2):  # mirror bounce off the walls
                if pos[k] < 0 or pos[k] > span:
                    pos[k] = -pos[k] if pos[k] < 0 else 2 * span - pos[k]
                    vel[k] = -vel[k]
        yield f"moving{i:04d}", clip, int(labels[i])
