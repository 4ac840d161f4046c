"""A judge of prompt adherence for the synthetic shapes: colour, shape and background read off
an image by pixel statistics, and the accuracy of a set of verdicts against their prompts.

The judge reads an image as the data set draws it. The background is the palette colour
nearest the corners' median; the shape is the largest connected region of pixels that are far
from that colour and nearer another palette colour; its colour is the most common palette label
inside the region, and its shape the template that best overlaps (IoU) the region, fitted to
its bounding box. One region and a vote over labels keep it robust to the blur, halos and
stray specks of generated images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ldm.data.synthetic import SyntheticShapes, draw_shape

# A pixel belongs to the shape when it is this far (RGB distance) from the background colour.
FOREGROUND_DISTANCE = 60.0
# A region of fewer pixels than this means no shape was drawn at all.
MIN_FOREGROUND = 4


@dataclass(frozen=True)
class Verdict:
    """What the judge sees: indices into the data set's colour and shape lists (-1: none)."""

    color: int
    shape: int
    background: int


def palette_labels(image: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) index of the palette colour (n, 3) nearest to each pixel of `image` (H, W, 3)."""
    distances = ((image[..., None, :].astype(float) - palette.astype(float)) ** 2).sum(-1)
    return distances.argmin(-1)


def corner_pixels(image: np.ndarray, margin: int) -> np.ndarray:
    """The pixels (or labels) of the four corner squares, which the data set keeps background."""
    m = margin
    corners = (image[:m, :m], image[:m, -m:], image[-m:, :m], image[-m:, -m:])
    return np.concatenate([c.reshape(m * m, *image.shape[2:]) for c in corners])


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask."""
    regions, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, regions, index=range(1, count + 1))
    return regions == 1 + int(np.argmax(sizes))


def fit_shape(mask: np.ndarray, shape_names: list[str]) -> int:
    """Index of the shape whose template, fitted to the mask's bounding box, overlaps it most."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    center = ((left + right) / 2, (top + bottom) / 2)
    radius = max(bottom - top, right - left) / 2
    scores = []
    for name in shape_names:
        size = (mask.shape[1], mask.shape[0])  # (W, H)
        template = draw_shape(name, size, center, radius, (255, 255, 255), (0, 0, 0))
        filled = template[..., 0] >= 128
        scores.append((mask & filled).sum() / max((mask | filled).sum(), 1))
    return int(np.argmax(scores))


def judge(image: np.ndarray, data: SyntheticShapes) -> Verdict:
    """Read (colour, shape, background) off a uint8 (H, W, 3) image in the data set's style."""
    labels = palette_labels(image, data.color_values)  # (H, W)
    background_rgb = np.median(corner_pixels(image, data.margin).astype(float), axis=0)
    background = int(palette_labels(background_rgb[None, None], data.color_values)[0, 0])
    distance = np.sqrt(((image.astype(float) - background_rgb) ** 2).sum(-1))  # (H, W)
    region = largest_region((distance > FOREGROUND_DISTANCE) & (labels != background))
    if region.sum() < MIN_FOREGROUND:
        return Verdict(-1, -1, background)
    color = int(np.bincount(labels[region]).argmax())
    return Verdict(color, fit_shape(region, data.shape_names), background)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] as uint8 (B, H, W, 3)."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().byte()
    return images.permute(0, 2, 3, 1).cpu().numpy()


def prompt_grid(data: SyntheticShapes, seed: int = 0) -> list[tuple[int, int, int]]:
    """Every (colour, shape) pair once, each on a seeded random other background colour."""
    rng = np.random.default_rng(seed)
    n = len(data.color_names)
    pairs = itertools.product(range(n), range(len(data.shape_names)))
    return [(c, s, (c + 1 + int(rng.integers(n - 1))) % n) for c, s in pairs]


def accuracy(verdicts: list[Verdict], labels: list[tuple[int, int, int]]) -> dict[str, float]:
    """Fractions of images whose colour, shape, background, and all three, match the prompt."""
    hits = np.array(
        [
            (v.color == c, v.shape == s, v.background == b)
            for v, (c, s, b) in zip(verdicts, labels, strict=True)
        ]
    )
    return {
        "color": float(hits[:, 0].mean()),
        "shape": float(hits[:, 1].mean()),
        "background": float(hits[:, 2].mean()),
        "all": float(hits.all(axis=1).mean()),
    }
