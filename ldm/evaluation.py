"""Prompt adherence on the synthetic shapes: generate for known prompts, judge by pixel statistics.

The judge reads an image as the data set draws it: the background colour from the corner
pixels, the shape's colour from the pixels that differ from it, and the shape by fitting each
shape template to the foreground's bounding box and keeping the best overlap (IoU).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ldm.data.synthetic import SyntheticShapes, draw_shape

# A pixel belongs to the shape when it is this far (RGB distance) from the background colour.
FOREGROUND_DISTANCE = 60.0
# Fewer foreground pixels than this means no shape was drawn at all.
MIN_FOREGROUND = 4


@dataclass(frozen=True)
class Verdict:
    """What the judge sees: indices into the data set's colour and shape lists (-1: none)."""

    color: int
    shape: int
    background: int


def nearest_color(rgb: np.ndarray, palette: np.ndarray) -> int:
    """Index of the palette colour (n, 3) nearest to `rgb` (3,)."""
    return int(np.argmin(((palette.astype(float) - rgb) ** 2).sum(axis=1)))


def corner_pixels(image: np.ndarray, margin: int) -> np.ndarray:
    """(4 margin², 3) pixels of the four corner squares, which the data set keeps background."""
    m = margin
    corners = [image[:m, :m], image[:m, -m:], image[-m:, :m], image[-m:, -m:]]
    return np.concatenate([c.reshape(-1, 3) for c in corners]).astype(float)


def fit_shape(mask: np.ndarray, shape_names: list[str]) -> int:
    """Index of the shape whose template, fitted to the mask's bounding box, overlaps it most."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    center = ((left + right) / 2, (top + bottom) / 2)
    radius = max(bottom - top, right - left) / 2
    scores = []
    for name in shape_names:
        template = draw_shape(name, mask.shape[0], center, radius, (255, 255, 255), (0, 0, 0))
        filled = template[..., 0] >= 128
        scores.append((mask & filled).sum() / max((mask | filled).sum(), 1))
    return int(np.argmax(scores))


def judge(image: np.ndarray, data: SyntheticShapes) -> Verdict:
    """Read (colour, shape, background) off a uint8 (H, W, 3) image in the data set's style."""
    palette = data.color_values
    background_rgb = np.median(corner_pixels(image, data.margin), axis=0)
    background = nearest_color(background_rgb, palette)
    distance = np.sqrt(((image.astype(float) - background_rgb) ** 2).sum(axis=-1))  # (H, W)
    mask = distance > FOREGROUND_DISTANCE
    if mask.sum() < MIN_FOREGROUND:
        return Verdict(-1, -1, background)
    color = nearest_color(np.median(image[mask].astype(float), axis=0), palette)
    return Verdict(color, fit_shape(mask, data.shape_names), background)


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


@torch.no_grad()
def generate(model, captions: list[str], steps: int, scale: float, seed: int) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for `captions`, from EMA weights, DDIM with guidance."""
    generator = torch.Generator(model.device).manual_seed(seed)
    with model.ema_scope():
        cond = model.get_learned_conditioning(captions)
        uncond = model.get_learned_conditioning([""] * len(captions))
        latents = model.sample(cond, len(captions), steps, scale, uncond, generator=generator)
        return model.decode_first_stage(latents)


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
