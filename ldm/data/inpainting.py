"""Training items for inpainting models: any captioned data set, with a mask and a masked image.

    train:
      target: ldm.data.inpainting.InpaintingMasks
      params:
        full_mask_p: 0.25
        dataset: {target: ldm.data.folder.ImageCaptionFolder, params: {root: data/photos}}

Each item gains `mask` (H, W, 1) in {0, 1} (1: to be painted) and `masked_image` (H, W, 3), the
image with the painted part set to 0, the keys `LatentInpaintDiffusion` reads. The masks follow
the SD inpainting recipe (runwayml's model card: synthetic masks, and in 25 % of the items the
whole image): a few thick random strokes or a few boxes, as LaMa's training masks. Where the
data set gives an item a mask of its own (a folder with `masks: file`: a sibling
`name.mask.png`, white where to paint), that mask is used instead (an image without a mask
file, whose mask the folder makes all white, gets a random one). Random masks draw from
`np.random`, seeded per item from (seed, epoch, index), so they differ per epoch but not per
worker or resume.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.models.diffusion.conditioning import LOSS_MASK_KEY
from ldm.util import ConfigError, instantiate_from_config

MAX_STROKES, MAX_BOXES = 4, 3
STROKE_WIDTH = (0.08, 0.2)  # of the shorter side
BOX_SIDE = (0.2, 0.6)  # of each side


def stroke_mask(width: int, height: int) -> Image.Image:
    """1 to MAX_STROKES random walks of thick, round-jointed lines."""
    mask, short = Image.new("L", (width, height), 0), min(width, height)
    draw = ImageDraw.Draw(mask)
    for _ in range(np.random.randint(1, MAX_STROKES + 1)):
        thickness = max(1, int(short * np.random.uniform(*STROKE_WIDTH)))
        points = [(np.random.uniform(0, width), np.random.uniform(0, height))]
        for _ in range(np.random.randint(2, 6)):
            angle, length = np.random.uniform(0, 2 * np.pi), np.random.uniform(0.1, 0.4) * short
            x, y = points[-1]
            points.append((x + length * np.cos(angle), y + length * np.sin(angle)))
        draw.line(points, fill=255, width=thickness, joint="curve")
        for x, y in points:
            r = thickness / 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return mask


def box_mask(width: int, height: int) -> Image.Image:
    """1 to MAX_BOXES random rectangles."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(np.random.randint(1, MAX_BOXES + 1)):
        w, h = (int(side * np.random.uniform(*BOX_SIDE)) for side in (width, height))
        left, top = np.random.randint(0, width - w + 1), np.random.randint(0, height - h + 1)
        draw.rectangle([left, top, left + w, top + h], fill=255)
    return mask


def random_mask(width: int, height: int, full_mask_p: float) -> np.ndarray:
    """(H, W, 1) float32 in {0, 1}: the whole image with probability full_mask_p, else strokes
    or boxes (half and half)."""
    if np.random.random() < full_mask_p:
        return np.ones((height, width, 1), np.float32)
    mask = stroke_mask(width, height) if np.random.random() < 0.5 else box_mask(width, height)
    return (np.asarray(mask, np.float32) / 255.0)[:, :, None]


class InpaintingMasks(Dataset):
    """`dataset`'s items with `mask` and `masked_image` added (random unless the item has one).

    Args:
        dataset: the `{target, params}` of a captioned image data set.
        full_mask_p: the share of items whose mask is the whole image.
    """

    def __init__(self, dataset: Mapping, full_mask_p: float = 0.25):
        if not 0 <= full_mask_p <= 1:
            raise ConfigError(f"InpaintingMasks: full_mask_p {full_mask_p!r} is not in [0, 1]")
        self.dataset, self.full_mask_p = instantiate_from_config(dataset), full_mask_p

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def bucket_sizes(self):
        return getattr(self.dataset, "bucket_sizes", None)

    def merge_buckets(self, merged) -> None:
        self.dataset.merge_buckets(merged)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        image = np.asarray(item["image"], np.float32)  # (H, W, 3) in [-1, 1]
        own = item.pop(LOSS_MASK_KEY, None)  # the data set's mask file: where to paint
        if own is not None and np.asarray(own).min() < 0.5:
            mask = (np.asarray(own) >= 0.5).astype(np.float32)
        else:  # no mask file (the folder's mask keeps everything): a random one
            mask = random_mask(image.shape[1], image.shape[0], self.full_mask_p)
        return {**item, "mask": mask, "masked_image": image * (1.0 - mask)}
